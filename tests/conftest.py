"""Shared test helpers.  BN statistics are always randomised: fresh BN layers are an identity
(mean 0, var 1, weight 1, bias 0) and would hide a wrong fold."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
BNFUSE = Path(sys.executable).parent / "bnfuse"
#: the real entry point, without relying on an installed ``bnfuse`` script
BNFUSE_CMD = [sys.executable, "-m", "bnfuse_cli"]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm-like layer random running stats and affine parameters, in place
    (``bnfuse bench``'s own helper, without calibration); returns ``model`` for chaining."""
    from bnfuse_cli.inputs import randomize_bn as randomize

    randomize(model, seed=seed)
    return model


def run_bnfuse(*args: str, cwd: "Path | str | None" = None, timeout: int = 600,
               columns: int = 80) -> subprocess.CompletedProcess:
    """Run the real entry point (``python -m bnfuse_cli``) as a subprocess, at a fixed width."""
    env = dict(os.environ, COLUMNS=str(columns))
    return subprocess.run([*BNFUSE_CMD, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def flip_bit(path: Path, pos: int, mask: int = 0x01) -> None:
    """Damage ``path`` in place: the byte at ``pos`` with the bits of ``mask`` flipped (a bad disk, a bad copy)."""
    with open(path, "r+b") as fh:
        fh.seek(pos)
        byte = fh.read(1)[0]
        fh.seek(pos)
        fh.write(bytes([byte ^ mask]))


def run_in_process(*args: str, cwd: "Path | str | None" = None, columns: int = 80) -> subprocess.CompletedProcess:
    """:func:`run_bnfuse` in this process: the same Typer app and exit-code table, from ``cwd`` (on ``sys.path``,
    as ``python -m`` puts it), for the steps of a test where a real process proves nothing more.  Anything but
    the app's own exit is raised, as the real process would print a traceback."""
    from typer.testing import CliRunner

    from bnfuse_cli.cli import app

    here, folder = os.getcwd(), str(cwd or os.getcwd())
    os.chdir(folder)
    sys.path.insert(0, folder)
    try:
        res = CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})
    finally:
        sys.path.remove(folder)
        os.chdir(here)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return subprocess.CompletedProcess(["bnfuse", *args], res.exit_code, res.stdout, res.stderr)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def count_calls(model: nn.Module, *args: torch.Tensor) -> tuple[int, int]:
    """(conv calls, BatchNorm calls) in one forward pass of ``model``, by forward hooks."""
    counts = {"conv": 0, "bn": 0}
    hooks = []
    for m in model.modules():
        kind = "conv" if isinstance(m, nn.modules.conv._ConvNd) else (
            "bn" if isinstance(m, nn.modules.batchnorm._BatchNorm) else None)
        if kind:
            hooks.append(m.register_forward_hook(lambda *_, k=kind: counts.__setitem__(k, counts[k] + 1)))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return counts["conv"], counts["bn"]


@pytest.fixture
def tests_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests folder as the current directory and on sys.path: its model modules (``models_*``)
    are found by ``--arch models_x:Name`` in subprocesses and by ``load`` in this one."""
    monkeypatch.chdir(ROOT / "tests")
    monkeypatch.syspath_prepend(str(ROOT / "tests"))


def count_ops(model: nn.Module, x: torch.Tensor, names: "set[str]") -> int:
    """How many torch operations named in ``names`` (``batch_norm``, ``mul``, ...) one forward pass makes."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            Count.n += getattr(func, "__name__", "") in names
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(x)
    return Count.n


def corrupt_after_rewrite(monkeypatch: pytest.MonkeyPatch, corrupt) -> None:  # noqa: ANN001
    """Make :func:`bnfuse_cli.fuse` call ``corrupt(model)`` right after each round's folds and merges are
    applied and before that round's sites are checked: a wrong fold, made by hand, for the judge to find."""
    import bnfuse_cli.workflows.fuse as fusion

    class CorruptThenCheck(fusion.SiteProbe):
        def check(self, fused: nn.Module, site_rtol=None):  # noqa: ANN001, ANN201
            corrupt(fused)
            return super().check(fused, site_rtol)

    monkeypatch.setattr(fusion, "SiteProbe", CorruptThenCheck)


@dataclass
class RoundTrip:
    """A fused file's whole life: the original saved as a state_dict, converted, loaded back by
    ``bnfuse_cli.load`` and verified against the original (:func:`round_trip`)."""

    original: nn.Module
    out: Path
    #: convert's report: a ConvertReport in process, the ``--json`` report's dict through the CLI
    report: Any
    fused: nn.Module
    #: verify's report in process; through the CLI, the finished ``verify`` process
    verified: Any
    #: the CLI's output of convert (None in process)
    stdout: "str | None" = None

    @property
    def ok(self) -> bool:
        """Converted with a positive verdict and verified (exit 0 through the CLI)."""
        if self.stdout is None:
            return self.report.verdict.ok and self.verified.ok
        return self.report["check"]["ok"] and self.verified.returncode == 0

    def rel(self, x: torch.Tensor) -> float:
        """Relative error of the loaded fused model against the original on ``x``, both in float64 (tensors
        a module keeps as plain attributes too)."""
        with torch.no_grad():
            ref = _float64(self.original)(x.double())
            got = _float64(self.fused)(x.double())
        return float((got - ref).norm() / ref.norm())


def _float64(model: nn.Module) -> nn.Module:
    import copy

    model = copy.deepcopy(model).double()
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                setattr(m, k, v.double())
    return model


def round_trip(model: nn.Module, arch: str, shape: str, tmp_path: Path, *, suffix: str = ".safetensors",
               passes: "dict[str, bool] | None" = None, cli: "list[str] | None" = None) -> RoundTrip:
    """Save ``model`` (an instance of ``arch``, a ``models_*`` factory of this folder) as a state_dict, convert
    it on ``shape`` to ``fused<suffix>``, load the output and verify it: in this process with the passes'
    options ``passes``, or through the real entry point with the extra ``cli`` arguments (``[]``: none)."""
    import json

    import bnfuse_cli

    torch.save(model.state_dict(), tmp_path / "orig.pth")
    out, js = tmp_path / f"fused{suffix}", tmp_path / "convert.json"
    source = bnfuse_cli.SourceOptions(arch=arch, input_shape=shape)
    if cli is None:
        report = bnfuse_cli.convert(tmp_path / "orig.pth", out, bnfuse_cli.ConvertOptions(
            bnfuse_cli.FuseOptions(passes=passes or {}), force=True), source)
        verified, stdout = bnfuse_cli.verify(tmp_path / "orig.pth", out, source_options=source), None
    else:
        base = ["--arch", arch, "--input-shape", shape]
        proc = run_bnfuse("convert", str(tmp_path / "orig.pth"), *base, *cli, "-o", str(out), "--json", str(js),
                          "--force", cwd=ROOT / "tests", columns=200)
        assert proc.returncode == 0, proc.stderr
        report, stdout = json.loads(js.read_text()), proc.stdout
        # verify's exit code: the same app in this process (convert above is the real entry point)
        verified = run_in_process("verify", str(tmp_path / "orig.pth"), str(out), *base, cwd=ROOT / "tests",
                                  columns=200)
    sys.path.insert(0, str(ROOT / "tests"))  # load rebuilds the architecture from the models_* module
    try:
        fused = bnfuse_cli.load(out)
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return RoundTrip(model, out, report, fused, verified, stdout)


def build(arch: str, seed: int = 0) -> nn.Module:
    """A fresh ``models_*:Name`` model of this folder in eval mode, its weights from torch seed 0 and its
    BatchNorm statistics random from ``seed``: the same arch and seed give the same model every time."""
    import importlib

    module, _, name = arch.partition(":")
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        cls = getattr(importlib.import_module(module), name)
    finally:
        sys.path.remove(str(ROOT / "tests"))
    torch.manual_seed(0)
    return randomize_bn(cls(), seed=seed).eval()

"""Shared test helpers.  BN statistics are always randomised: fresh BN layers are an identity
(mean 0, var 1, weight 1, bias 0) and would hide a wrong fold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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

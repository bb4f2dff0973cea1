"""``bnfuse convert`` and ``bnfuse inspect`` from the command line.

Three runs use the real ``bnfuse`` entry point in subprocesses (started together, they each
spend seconds importing torch): the README's ``convert NAME --weights none`` to both suffixes,
and ``--weights default`` with no network and an empty cache.  The other cases go through
Typer's ``CliRunner`` in this process.  BN statistics are randomised wherever the check is
about numbers: ``--weights none`` gives fresh BNs (an identity), so that run only proves the
command works and what it reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from torch import nn
from torchvision import models
from typer.testing import CliRunner

import bnfuse_cli
from bnfuse_cli import cli
from conftest import BNFUSE_CMD, randomize_bn

SHAPE = "1,3,64,64"
_BN = nn.modules.batchnorm._BatchNorm
#: no real run takes this long; past it, a run that waits on the network is reported as hanging
HANG_S = 180


def _resnet18_fused_keys() -> set[str]:
    """resnet18's keys without any BN key, plus a bias for each conv that a BN follows."""
    model = models.resnet18(weights=None)
    keys = set(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, _BN):
            keys -= {k for k in keys if k.startswith(name + ".")}
            head, _, last = name.rpartition(".")
            conv = head + ".0" if last == "1" else (head + "." if head else "") + last.replace("bn", "conv")
            keys.add(conv + ".bias")
    return keys


# --------------------------------------------------------------------------- real subprocesses


class _Runs:
    """The real-entry-point runs, started together and collected once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.torch_home = root / "torch_home_empty"
        self.torch_home.mkdir()
        base = dict(os.environ, COLUMNS="200")
        # "offline": every download goes to a closed local port, so this holds on CI machines with
        # network too; TORCH_HOME points at an empty cache
        offline = dict(base, TORCH_HOME=str(self.torch_home), HTTPS_PROXY="http://127.0.0.1:9",
                       https_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
                       http_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")
        specs = {
            "safetensors": (["convert", "resnet18", "--weights", "none", "--input-shape", SHAPE,
                             "-o", "fused.safetensors", "--json", "report.json"], base),
            "pth": (["convert", "resnet18", "--weights", "none", "--input-shape", SHAPE, "-o", "fused.pth"], base),
            "offline": (["convert", "resnet18", "--weights", "default", "--input-shape", SHAPE,
                         "-o", "pretrained.pth"], offline),
        }
        procs = {k: subprocess.Popen([*BNFUSE_CMD, *args], cwd=root, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for k, (args, env) in specs.items()}
        self.results: dict[str, Any] = {}
        deadline = time.monotonic() + HANG_S
        for key, p in procs.items():
            try:
                stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                self.results[key] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
            except subprocess.TimeoutExpired:
                p.kill()
                stdout, stderr = p.communicate()
                self.results[key] = subprocess.TimeoutExpired(p.args, HANG_S, stdout, stderr)

    def __getitem__(self, key: str) -> subprocess.CompletedProcess:
        r = self.results[key]
        if isinstance(r, subprocess.TimeoutExpired):
            pytest.fail(f"bnfuse {' '.join(r.cmd[1:])} still running after {HANG_S} s (hangs); "
                        f"stderr so far: {r.stderr!r}")
        return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> _Runs:
    return _Runs(tmp_path_factory.mktemp("cli_real"))


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_real_convert_name_weights_none(runs: _Runs, suffix: str) -> None:
    r = runs[suffix]
    assert r.returncode == 0, r.stderr
    out = runs.root / f"fused.{suffix}"
    assert out.is_file() and out.stat().st_size > 1_000_000
    assert "Traceback" not in r.stderr
    # the table reports what happened
    assert f"bnfuse convert resnet18 -> fused.{suffix}" in r.stdout
    assert "20 found, 20 folded, 0 left" in r.stdout
    assert "max abs error" in r.stdout and "relative error" in r.stdout
    rel = float(r.stdout.split("relative error", 1)[1].split()[1].strip("│ "))
    assert 0 <= rel < 1e-4
    assert "random initialisation" in r.stderr  # --weights none is said, not silent
    # the file loads back, fused, and runs
    model = bnfuse_cli.load(out)
    assert set(model.state_dict()) == _resnet18_fused_keys()
    assert not any(isinstance(m, _BN) for m in model.modules())
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 1000) and torch.isfinite(y).all()


def test_real_convert_json_report(runs: _Runs) -> None:
    assert runs["safetensors"].returncode == 0
    data = json.loads((runs.root / "report.json").read_text())
    assert data["source"] == "resnet18" and data["arch"] == "resnet18" and data["weights"] == "none"
    assert data["output"] == "fused.safetensors"
    assert data["input"] == {"shape": [1, 3, 64, 64], "kind": "tensor"}
    assert data["dtype"] == "float32"
    assert (data["bn_found"], data["bn_folded"], data["bn_skipped"]) == (20, 20, 0)
    assert {(f["norm"], f["producer"]) for f in data["folds"]} >= {("bn1", "conv1"),
                                                                  ("layer2.0.downsample.1", "layer2.0.downsample.0")}
    assert len(data["folds"]) == 20 and data["skipped"] == []
    assert 0 <= data["rel_error"] < 1e-5 and 0 <= data["max_abs_error"] < 1e-3
    assert data["tolerance"] == 1e-4
    assert data["file_size"] == (runs.root / "fused.safetensors").stat().st_size
    assert data["form"] == "state_dict"
    # resnet18's BNs have 4800 channels in all: their weight and bias go (9600), the convs gain
    # a bias each (4800), and running mean and var go (9600 buffer values)
    assert data["params_before"] - data["params_after"] == 4800
    assert data["buffers_before"] - data["buffers_after"] == 9600 and data["buffers_after"] == 0
    assert data["removed"] == 14400


def test_real_convert_default_weights_offline_fails_clearly(runs: _Runs) -> None:
    r = runs["offline"]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    msg = " ".join(r.stderr.split())
    assert "error:" in msg and "resnet18" in msg
    assert str(runs.torch_home) in msg, "the message should say where the cache is"
    assert "--weights none" in msg, "the message should say what to do"
    assert not (runs.root / "pretrained.pth").exists()
    leftovers = [p for p in runs.torch_home.rglob("*") if p.is_file()]
    assert leftovers == [], f"partial download left behind: {leftovers}"


# --------------------------------------------------------------------------- CliRunner


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Run ``bnfuse ARGS`` in this process with wide consoles (no wrapping mid-message)."""
    monkeypatch.setattr(cli, "out", Console(width=250, soft_wrap=False))
    monkeypatch.setattr(cli, "err", Console(width=250, stderr=True))
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(cli.app, list(args), catch_exceptions=False)

    return run


@pytest.fixture(scope="module")
def unfused_resnet18(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """An unfused resnet18 state_dict with randomised BN statistics."""
    torch.manual_seed(21)
    model = randomize_bn(models.resnet18(weights=None), seed=21).eval()
    path = tmp_path_factory.mktemp("cli_src") / "resnet18_trained.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_convert_named_model_with_local_weights_is_exact(invoke, unfused_resnet18, tmp_path: Path) -> None:  # noqa: ANN001
    src, model = unfused_resnet18
    out = tmp_path / "fused.safetensors"
    r = invoke("convert", "resnet18", "--weights", str(src), "--input-shape", SHAPE, "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "20 found, 20 folded, 0 left" in r.stdout
    fused = bnfuse_cli.load(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, got = model(x), fused(x)
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_existing_output_without_force_exits_2_and_keeps_the_file(invoke, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "fused.pth"
    out.write_bytes(b"previous output, not to be lost")
    r = invoke("convert", "resnet18", "--weights", "none", "--input-shape", SHAPE, "-o", str(out))
    assert r.exit_code == 2
    assert "error:" in r.stderr and str(out) in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"previous output, not to be lost"
    assert [p.name for p in tmp_path.iterdir()] == ["fused.pth"], "a temporary file was left behind"


def test_force_replaces_the_output(invoke, unfused_resnet18, tmp_path: Path) -> None:  # noqa: ANN001
    src, _ = unfused_resnet18
    out = tmp_path / "fused.pth"
    out.write_bytes(b"previous output")
    r = invoke("convert", str(src), "--arch", "resnet18", "--input-shape", SHAPE, "-o", str(out), "--force")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() != b"previous output"
    assert set(bnfuse_cli.load(out).state_dict()) == _resnet18_fused_keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.pth"]


def test_out_dir_with_two_sources(invoke, unfused_resnet18, tmp_path: Path) -> None:  # noqa: ANN001
    src, model = unfused_resnet18
    json_path = tmp_path / "reports.json"
    out_dir = tmp_path / "fused"
    out_dir.mkdir()
    r = invoke("convert", str(src), "mobilenet_v3_small", "--arch", "resnet18", "--weights", "none",
               "--input-shape", SHAPE, "--out-dir", str(out_dir), "--suffix", ".safetensors", "--json", str(json_path))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out_dir.iterdir()) == ["mobilenet_v3_small.fused.safetensors",
                                                        "resnet18_trained.fused.safetensors"]
    assert "20 found, 20 folded, 0 left" in r.stdout
    assert "34 found, 34 folded, 0 left" in r.stdout
    data = json.loads(json_path.read_text())
    assert [d["source"] for d in data] == [str(src), "mobilenet_v3_small"]
    assert [d["bn_folded"] for d in data] == [20, 34]
    loaded = bnfuse_cli.load(out_dir / "resnet18_trained.fused.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert float((loaded(x) - model(x)).norm() / model(x).norm()) < 1e-5


def test_several_sources_need_out_dir(invoke, tmp_path: Path) -> None:  # noqa: ANN001
    r = invoke("convert", "resnet18", "resnet34", "--weights", "none", "-o", str(tmp_path / "x.pth"))
    assert r.exit_code == 2
    assert "--out-dir" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_inspect_prints_reasons(invoke, tmp_path: Path) -> None:  # noqa: ANN001
    json_path = tmp_path / "plan.json"
    r = invoke("inspect", "densenet121", "--weights", "none", "--input-shape", SHAPE, "--json", str(json_path))
    assert r.exit_code == 0, r.output
    data = json.loads(json_path.read_text())
    assert data["bn_found"] == 121
    n_fold, n_skip = len({f["norm"] for f in data["folds"]}), len(data["skipped"])
    assert n_fold + n_skip == 121 and n_fold > 0 and n_skip > 0
    assert f"densenet121: 121 BatchNorm layers, {n_fold} would fold, {n_skip} would stay" in r.stdout
    assert "Left in place" in r.stdout
    # every reason is printed next to its layer (its cell may wrap over several lines)
    flat = " ".join(r.stdout.replace("│", " ").split())
    for s in data["skipped"]:
        assert s["reason"], s
        assert f" {s['norm']} {s['reason']} " in flat, s
    assert any("cat" in s["reason"] for s in data["skipped"])
    assert list(tmp_path.iterdir()) == [json_path], "inspect wrote something besides --json"


def test_unknown_model_name_suggests_the_closest(invoke, tmp_path: Path) -> None:  # noqa: ANN001
    r = invoke("convert", "resnet5", "--weights", "none", "-o", str(tmp_path / "x.pth"))
    assert r.exit_code == 2
    msg = " ".join(r.stderr.split())
    assert "resnet5" in msg and "Did you mean resnet50" in msg
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []
    r = invoke("inspect", "resnet5", "--weights", "none")
    assert r.exit_code == 2 and "resnet50" in r.stderr

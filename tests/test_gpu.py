"""On a CUDA GPU, as CI jobs run there: ``bnfuse bench --device cuda`` and ``bnfuse verify --device cuda``
end to end, in float32 with TF32 on (PyTorch's default for cuDNN convolutions) and off, float16,
bfloat16, autocast, channels_last and ``--compile``, on the default models and one timm model.
Each configuration also shows that a deliberately wrong fold exits 1.  Skipped without CUDA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import BNFUSE_CMD, ROOT, randomize_bn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FAST = ["--device", "cuda", "--iters", "10", "--warmup", "3"]
#: the original is a plain state_dict: verify needs its architecture
ARCH = ["--arch", "resnet18"]

#: runs the real CLI with one fold deliberately wrong (conv scaled x1.5 after folding)
_WRONG = """
import sys, torch
import bnfuse_cli.engine.passes.fold as fusion
real = fusion.apply_plan
def wrong(model, plan):
    real(model, plan)
    with torch.no_grad():
        model.get_submodule(plan[len(plan) // 2].producer).weight.mul_(1.5)
fusion.apply_plan = wrong
from bnfuse_cli.cli import app
app(sys.argv[1:], prog_name="bnfuse")
"""


def _run(*args: str, wrong: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _WRONG, *args] if wrong else [*BNFUSE_CMD, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_bench_cuda_defaults_float32_tf32_on(tmp_path: Path) -> None:
    """The mission's CI line: the default models, float32, TF32 left as PyTorch sets it."""
    out = tmp_path / "b.json"
    proc = _run("bench", *FAST, "--json", str(out), "--markdown", str(tmp_path / "b.md"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["passed"] and data["settings"]["device"].startswith("cuda")
    for m in data["models"]:
        assert m["check"]["ok"] and m["check"]["precision"]["cudnn_allow_tf32"] == torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("extra", [
    ["--dtype", "float16"],
    ["--dtype", "bfloat16"],
    ["--dtype", "float16", "--channels-last"],
    ["--autocast", "float16"],
    ["--autocast", "bfloat16", "--channels-last"],
    ["--compile"],
], ids=lambda e: "_".join(a.strip("-") for a in e))
@pytest.mark.parametrize("model", ["resnet18", "timm:efficientnet_b0"])
def test_bench_cuda_precisions(model: str, extra: list[str]) -> None:
    if model.startswith("timm:"):
        pytest.importorskip("timm")
    ok = _run("bench", model, *FAST, *extra)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _run("bench", model, *FAST, *extra, wrong=True)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "fold site" in bad.stderr


def test_bench_cuda_float32_tf32_off() -> None:
    from bnfuse_cli import BenchSettings
    from bnfuse_cli.workflows.bench import bench

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        report = bench(["resnet18", "resnet50"], BenchSettings(device="cuda", iters=10, warmup=3))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    for r in report.results:
        assert r.correct, r.check.reasons
        assert r.check.precision["cudnn_allow_tf32"] is False
        assert r.error.rel < 1e-4  # without TF32, float32 on the GPU is float32


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torchvision

    from bnfuse_cli.files.table import read_checkpoint
    from bnfuse_cli.files.write import write_checkpoint
    from bnfuse_cli import SourceOptions
    from bnfuse_cli.workflows.convert import convert

    d = tmp_path_factory.mktemp("gpu")
    model = torchvision.models.resnet18().eval()
    randomize_bn(model, seed=0)
    torch.save(model.state_dict(), d / "orig.pth")
    convert(d / "orig.pth", d / "fused.safetensors", source_options=SourceOptions(arch="resnet18"))
    ck = read_checkpoint(d / "fused.safetensors")
    sd = dict(ck.state_dict)
    sd["layer2.0.conv1.weight"] = sd["layer2.0.conv1.weight"] * 1.5
    write_checkpoint(d / "wrong.safetensors", state_dict=sd, metadata=ck.metadata)
    return {"orig": d / "orig.pth", "fused": d / "fused.safetensors", "wrong": d / "wrong.safetensors"}


@pytest.mark.parametrize("extra", [[], ["--dtype", "float16"], ["--dtype", "bfloat16"], ["--autocast", "float16"]],
                         ids=["float32", "float16", "bfloat16", "autocast16"])
def test_verify_cuda(resnet_files: dict[str, Path], extra: list[str]) -> None:
    ok = _run("verify", str(resnet_files["orig"]), str(resnet_files["fused"]), *ARCH, "--device", "cuda", *extra)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _run("verify", str(resnet_files["orig"]), str(resnet_files["wrong"]), *ARCH, "--device", "cuda", *extra)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "layer2.0.conv1" in bad.stdout


def _verify_on(device: str, files: dict[str, Path]) -> tuple[Any, set[tuple[str, torch.dtype]]]:
    """``verify(..., device=device)`` in this process, with the (device, dtype) of every input that reached
    the whole ResNet (its forward, by a global forward pre-hook): where the models really ran."""
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torchvision.models import ResNet

    from bnfuse_cli import JudgeOptions, SourceOptions
    from bnfuse_cli.workflows.verify import verify

    seen: set[tuple[str, torch.dtype]] = set()

    def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, ResNet) and args and isinstance(args[0], torch.Tensor):
            seen.add((args[0].device.type, args[0].dtype))

    handle = register_module_forward_pre_hook(record)
    try:
        report = verify(files["orig"], files["fused"], JudgeOptions(device=device), SourceOptions(arch="resnet18"))
    finally:
        handle.remove()
    return report, seen


def test_verify_cuda_really_runs_on_the_gpu(resnet_files: dict[str, Path]) -> None:
    """``--device cuda`` is obeyed, not only accepted: the original, the fused model (float32) and the
    float64 reference all run on the GPU, and the report says so.  Ignoring the device would still
    give a passing verdict on the CPU; this is the test that fails then."""
    report, seen = _verify_on("cuda", resnet_files)
    assert report.ok, report.verdict.reasons
    assert report.device == "cuda" and report.to_dict()["device"] == "cuda"
    assert {("cuda", torch.float32), ("cuda", torch.float64)} <= seen, seen
    proc = _run("verify", str(resnet_files["orig"]), str(resnet_files["fused"]), *ARCH, "--device", "cuda",
                "--json", "-")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["device"] == "cuda"

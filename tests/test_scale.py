"""Per-channel scales next to a Conv/Linear fold into it (the scale pass): module and tensor forms,
backward and forward, through dropout and permutes, after a BatchNorm that folds first; the ones on
another axis, after arithmetic, on a layer read twice, or with a shift before zero padding stay with
their reasons.  Everything exact in float64, judged at its site, saved, rebuilt and verified."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import models_scale as ms
from bnfuse_cli import fuse
from conftest import ROOT, count_ops, randomize_bn, round_trip, run_bnfuse, run_in_process

XT = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
XC = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
MULS = {"mul", "__mul__", "mul_", "addcmul"}


def _fused(build: Any, x: torch.Tensor):  # noqa: ANN202
    model = randomize_bn(build(), seed=5).double().eval()
    with torch.no_grad():
        ref = model(x)
    result = fuse(copy.deepcopy(model), x)
    with torch.no_grad():
        rel = float((result.model(x) - ref).norm() / ref.norm())
    return model, result, rel


@pytest.mark.parametrize("build, x, folded, directions", [
    (ms.Vit, XT, {"block.ls1": "block.proj", "block.gamma_2": "block.fc", "block.norm2": "block.fc"},
     {"backward", "forward"}),
    (ms.Next, XC, {"block.layer_scale": "block.block.5"}, {"backward"}),
], ids=["vit-module-param-affine", "convnext-through-permute"])
def test_scales_fold_into_the_layer_next_to_them(build: Any, x: torch.Tensor, folded: dict, directions: set) -> None:
    model, result, rel = _fused(build, x)
    assert rel < 1e-12 and result.ok, (rel, result.verdict.reasons)
    items = result.plan.of("scale")
    assert {it.scale: it.producer for it in items} == folded
    assert {it.direction for it in items} == directions
    assert count_ops(model, x, MULS) == len(folded) and count_ops(result.model, x, MULS) == 0
    sites = [s for s in result.verdict.sites if s.kind == "scale"]
    assert len(sites) == len(folded) and all(s.skipped is None and s.rel_error < 1e-12 for s in sites)
    params = sum(p.numel() for p in result.model.parameters())
    assert params < sum(p.numel() for p in model.parameters())  # the scales are gone, a bias may come


def test_a_scale_after_a_batchnorm_folds_in_the_next_round_and_the_one_after_arithmetic_stays() -> None:
    _, result, rel = _fused(ms.Former, XC)
    assert rel < 1e-12 and result.ok
    assert [it.scale for it in result.plan.of("scale")] == ["block.ls2"]
    assert len(result.plan.rounds) == 2 and result.plan.rounds[1] == {"scale": 1}
    (left,) = result.plan.left_by("scale")
    assert left.scale == "block.ls1" and "does not read a Conv/Linear output" in left.reason


def test_an_affine_before_global_average_pooling_folds_into_the_head(tmp_path: Path, tests_on_path: None) -> None:
    """ResMLP's end: its final Affine, a mean over the tokens, a dropout and the head Linear: the Affine folds
    forward into the head through the mean, judged at its site on a crop that keeps every channel (12 of
    them, last) and a window of the tokens; saved, rebuilt and verified."""
    x = torch.randn(2, 10, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model, result, rel = _fused(ms.Pooled, x)
    assert rel < 1e-12 and result.ok, (rel, result.verdict.reasons)
    (item,) = result.plan.of("scale")
    assert (item.scale, item.producer, item.direction, item.through) == ("norm", "head", "forward", (("mean", (1,)),))
    assert result.plan.left_by("scale") == [] and count_ops(result.model, x, {"addcmul"}) == 0
    (site,) = [s for s in result.verdict.sites if s.kind == "scale"]
    assert site.skipped is None and site.rel_error < 1e-12
    rt = round_trip(ms.Pooled().eval(), "models_scale:Pooled", "1,10,5", tmp_path)
    assert rt.ok and rt.report.to_dict()["scale_folds"][0]["through"] == [["mean", [1]]] and rt.rel(x) < 1e-6
    assert [s.kind for s in rt.verified.verdict.sites if s.skipped is None] == ["scale"]


@pytest.mark.parametrize("build, x, scale, reason", [
    (ms.Mixing, XT, "block.ls1", "scales axis 1 of block.linear_tokens's output, not its features (axis 2)"),
    (ms.Twice, XT, "block.ls", "the output of block.proj is also read by"),
    (ms.Shift, XC, "block.affine", "block.conv zero-pads its input, and block.affine adds a shift"),
], ids=["token-mixing-axis", "layer-read-twice", "shift-before-zero-padding"])
def test_a_scale_that_must_stay_is_exact_and_says_why(build: Any, x: torch.Tensor, scale: str, reason: str) -> None:
    _, result, rel = _fused(build, x)
    assert rel < 1e-12 and result.ok and result.plan.of("scale") == []
    left = {s.scale: s.reason for s in result.plan.left_by("scale")}
    assert reason in left[scale], left


def test_scale_folds_are_saved_rebuilt_and_verified(tmp_path: Path, tests_on_path: None) -> None:
    for name, shape, x in (("Vit", "2,6,5", XT), ("Next", "1,3,6,6", XC), ("Former", "1,3,6,6", XC)):
        model = randomize_bn(getattr(ms, name)(), seed=6).eval()
        for suffix in (".safetensors", ".pth"):
            rt = round_trip(model, f"models_scale:{name}", shape, tmp_path, suffix=suffix)
            assert rt.ok and rt.report.to_dict()["scale_folds"] and rt.rel(x) < 1e-6, name  # float32 weights
            assert count_ops(rt.fused.double(), x, MULS) < count_ops(model.double(), x, MULS)
            model.float()
            if name == "Former":  # its conv took the BatchNorm in round 1 and the scale in round 2
                assert any("block.mlp.2): checked end to end only" in n for n in rt.verified.notes), rt.verified.notes
            else:
                assert any(s.kind == "scale" and s.skipped is None for s in rt.verified.verdict.sites), name


def test_cli_shows_scales_folded_and_left(tmp_path: Path) -> None:
    args = ("models_scale:Former", "--weights", "none", "--input-shape", "1,3,6,6", "--json", "-")
    proc = run_bnfuse("convert", *args, "-o", str(tmp_path / "f.safetensors"), cwd=ROOT / "tests", columns=160)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [s["scale"] for s in data["scale_folds"]] == ["block.ls2"]
    assert [s["scale"] for s in data["scales_left"]] == ["block.ls1"]
    assert "Per-channel scales left" in proc.stderr and "per-channel scales │ 1 folded" in proc.stderr
    # one round (inspect): the scale after the BatchNorm says it folds next round
    inspected = run_in_process("inspect", *args, cwd=ROOT / "tests").stdout
    left = {s["scale"]: s["reason"] for s in json.loads(inspected)["scales_left"]}
    assert "folds in the next round, once block.mlp.3 has folded" in left["block.ls2"]


#: (model, scales folded, scales left, what the ones left say): every layer scale and Affine on the
#: feature axis of the Conv/Linear next to it folds, ResMLP's final norm through the mean into its head;
#: ResMLP's token mixing and EfficientFormer's ``pool(x) - x`` stay
ZOO = [("tv:convnext_tiny", 18, 0, None), ("convnext_tiny", 18, 0, None), ("deit3_small_patch16_224", 24, 0, None),
       ("cait_xxs24_224", 52, 0, None), ("resmlp_12_224", 25, 24, "reads axis 2 as its features, not the channels"),
       ("efficientformer_l1", 16, 14, "does not read a Conv/Linear output")]


@pytest.mark.zoo
@pytest.mark.parametrize("name, folded, left, reason", ZOO, ids=[z[0] for z in ZOO])
def test_layer_scales_of_real_families_fold_exactly(name: str, folded: int, left: int, reason: "str | None") -> None:
    sys_path = str(ROOT / "scripts")
    import sys

    sys.path.insert(0, sys_path)
    try:
        import bench_scales
    finally:
        sys.path.remove(sys_path)
    if not name.startswith("tv:"):
        pytest.importorskip("timm")
    model, x = bench_scales._build(name)
    m64 = copy.deepcopy(model).double()
    result = fuse(copy.deepcopy(m64), x.double())
    assert result.ok, result.verdict.reasons
    assert (len(result.plan.of("scale")), len(result.plan.left_by("scale"))) == (folded, left)
    assert reason is None or any(reason in s.reason for s in result.plan.left_by("scale"))
    # every scale left names the other axis it scales or the other reader in the way
    assert all("axis" in s.reason or "goes to" in s.reason or "read by" in s.reason
               for s in result.plan.left_by("scale")), result.plan.left_by("scale")
    assert bench_scales._rel64(m64, result.model, x.double()) < 1e-12
    assert bench_scales._muls(result.model, x.double()) <= bench_scales._muls(m64, x.double()) - folded

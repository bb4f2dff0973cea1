"""Weighted sums of linear branches merge into one layer: differences, per-channel layer scales
(a module or a tensor the block holds), means of Linear heads, and one branch plus zero; a scale
that is not per channel stays, with its reason.  Every merge is exact in float64, judged at its
site, saved, rebuilt by ``load`` and checked again by ``verify``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import models_weighted as mw
from bnfuse_cli import fuse
from conftest import ROOT, count_calls, count_ops, randomize_bn, round_trip, run_bnfuse

X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
XH = torch.randn(4, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _fused(build: Any, x: torch.Tensor):  # noqa: ANN202
    model = randomize_bn(build(), seed=3).double().eval()
    with torch.no_grad():
        ref = model(x)
    result = fuse(model, x)
    with torch.no_grad():
        rel = float((result.model(x) - ref).norm() / ref.norm())
    return result, rel


@pytest.mark.parametrize("build, convs", [(mw.Mixer, 2), (mw.WrappedMixer, 2), (mw.Held, 2), (mw.Zero, 2)],
                         ids=["repmixer", "repmixer-wrapped-norm", "held-scale", "one-branch-plus-zero"])
def test_a_weighted_sum_of_conv_branches_is_one_conv(build: Any, convs: int) -> None:
    result, rel = _fused(build, X)
    assert rel < 1e-12, rel
    assert result.ok and len(result.plan.merges) == 1, (result.plan.merge_skips, result.verdict.reasons)
    # the stem and the one merged conv; no BatchNorm, no sub, no mul, no add left in the block
    assert count_calls(result.model, X) == (convs, 0)
    assert count_ops(result.model.block, torch.relu(result.model.stem(X)), {"sub", "mul", "add", "__add__",
                                                                              "__iadd__", "__sub__", "__mul__"}) == 0
    site = [s for s in result.verdict.sites if s.kind == "merge"]
    assert len(site) == 1 and site[0].skipped is None and site[0].rel_error < 1e-12


def test_the_merged_conv_takes_the_place_of_a_list_that_held_only_its_branches() -> None:
    result, rel = _fused(mw.Zero, X)
    (m,) = result.plan.merges
    assert rel < 1e-12 and m.into == "block.conv_kxk.0" and m.place == "block.conv_kxk"
    assert type(result.model.block.conv_kxk) is nn.Conv2d  # one attribute lookup, not conv_kxk[0]
    assert {k for k in result.model.state_dict() if "conv_kxk" in k} == {"block.conv_kxk.weight", "block.conv_kxk.bias"}
    # and the rewritten forward calls no Identity (the block's absent attention is gone)
    assert "attn" not in dict(result.model.block.named_children())
    calls: list[int] = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in result.model.modules()
             if isinstance(m, nn.Identity)]
    with torch.no_grad():
        result.model(X)
    for h in hooks:
        h.remove()
    assert calls == []


def test_the_mean_of_two_linear_heads_is_one_linear() -> None:
    result, rel = _fused(mw.Heads, XH)
    assert rel < 1e-12 and result.ok, (rel, result.plan.merge_skips)
    (m,) = result.plan.merges
    assert {b.module for b in m.branches} == {"classifier.head", "classifier.head_dist"}
    assert all(b.scale == (("div", 2.0),) for b in m.branches)
    linears = [n for n, mod in result.model.named_modules() if isinstance(mod, nn.Linear)]
    # the classifier's forward was the sum alone: the merged Linear is the classifier itself (one call,
    # no wrapper), as timm's hand-written fuse leaves it
    assert m.place == "classifier" and type(result.model.classifier) is nn.Linear
    assert linears == ["features", "classifier"]  # one head is gone, and both BatchNorm1d
    assert not any(isinstance(mod, nn.BatchNorm1d) for mod in result.model.modules())


def test_a_scale_on_the_wrong_axis_stays_with_its_reason() -> None:
    result, rel = _fused(mw.WrongAxis, X)
    assert rel < 1e-12 and result.ok and result.plan.merges == []
    (skip,) = result.plan.merge_skips
    assert "block.gamma" in skip.reason and "not one value per channel on axis 1" in skip.reason


def test_a_weighted_merge_is_saved_rebuilt_and_verified(tmp_path: Path, tests_on_path: None) -> None:
    for arch, shape, x in (("models_weighted:Mixer", "1,3,6,6", X), ("models_weighted:Heads", "4,12", XH),
                           ("models_weighted:Zero", "1,3,6,6", X)):
        rt = round_trip(randomize_bn(getattr(mw, arch.split(":")[1])(), seed=4).eval(), arch, shape, tmp_path)
        assert rt.ok and len(rt.report.plan.merges) == 1 and rt.rel(x) < 1e-6  # float32 weights
        merge = rt.report.to_dict()["merges"][0]
        assert any(b.get("scale") for b in merge["branches"]) or merge["at"] == "block.conv_kxk", merge
        assert any(s.kind == "merge" and s.skipped is None for s in rt.verified.verdict.sites)


def test_cli_json_shows_the_branch_scales() -> None:
    proc = run_bnfuse("inspect", "models_weighted:Mixer", "--weights", "none", "--input-shape", "1,3,6,6",
                      "--json", "-", cwd=ROOT / "tests", columns=160)
    assert proc.returncode == 0, proc.stderr
    branches = json.loads(proc.stdout)["merges"][0]["branches"]
    assert {tuple(map(tuple, b.get("scale", []))) for b in branches} == {
        (("mul", -1.0), ("module", "block.layer_scale")), (("module", "block.layer_scale"),), ()}

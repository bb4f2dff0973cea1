"""Merging parallel branches into one conv (structural re-parameterisation), by data flow.

Every mergeable block must give one conv call where it ran several convs, BatchNorms and adds,
exactly (float64); every must-not-merge block stays as it is, exact, with its reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import models_merge as mm
from bnfuse_cli import FuseOptions, fuse
from conftest import ROOT, corrupt_after_rewrite, count_calls, randomize_bn, round_trip, run_bnfuse

TESTS = ROOT / "tests"


def _fused(cls: Any, x: torch.Tensor, seed: int = 0):  # noqa: ANN202
    model = randomize_bn(cls(), seed=seed).double().eval()
    with torch.no_grad():
        ref = model(x)
    result = fuse(model, x)
    with torch.no_grad():
        out = result.model(x)
    outs = [(out, ref)] if isinstance(ref, torch.Tensor) else list(zip(out, ref))
    rel = max(float((o - r).norm() / r.norm()) for o, r in outs)
    return model, result, rel


X8 = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
X6 = X8[:, :6]


@pytest.mark.parametrize("cls, x, merges, convs_after", [
    (mm.RepVGG, torch.randn(2, 3, 8, 8, dtype=torch.float64), 1, 2),  # stem + the merged conv
    (mm.ACNet, X6, 1, 1),
    (mm.Residual, X8, 2, 2),
    (mm.PostSumBN, X8, 1, 1),
], ids=["repvgg", "acnet", "residual-and-dilation", "post-sum-bn"])
def test_branches_merge_into_one_conv_exactly(cls: Any, x: torch.Tensor, merges: int, convs_after: int) -> None:
    model, result, rel = _fused(cls, x)
    assert rel < 1e-10, rel
    assert len(result.plan.merges) == merges and result.ok, result.verdict.reasons
    assert count_calls(result.model, x) == (convs_after, 0)  # no BatchNorm runs, one conv per merged sum
    merge_sites = [s for s in result.verdict.sites if s.kind == "merge"]
    assert len(merge_sites) == merges and all(s.skipped is None and s.rel_error < 1e-10 for s in merge_sites)


def test_grouped_repvgg_and_the_post_sum_bn_folds_next_round() -> None:
    _, result, rel = _fused(lambda: mm.RepVGG(groups=2), torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert rel < 1e-10 and len(result.plan.merges) == 1
    _, post, rel = _fused(mm.PostSumBN, X8)
    assert rel < 1e-10 and post.plan.rounds == [{"fold": 1, "merge": 1}, {"fold": 1}]  # conv's BN, the merge; then the outer bn
    assert [f.producer for f in post.plan.folds[1:]] == ["block.conv"]


@pytest.mark.parametrize("cls, x, reason", [
    (mm.Strided, X6, "block.a has stride (2, 2), the main branch (1, 1)"),
    (mm.ReadTwice, X6, "the output of block.b is also read elsewhere"),
    (mm.ReluInBranch, X6, "block.b does more than its conv and BatchNorm"),
    (mm.Misaligned, torch.randn(2, 6, 10, 10, dtype=torch.float64),
     "block.b's kernel centre does not align with the main branch's (padding (1, 1))"),
    (mm.SharedConv, X6, "block.b is called more than once"),
    (mm.ReflectPad, X6, "block.a pads with reflect (1, 1): only explicit zero padding merges"),
    (mm.AvgPoolBranch, X6, "block.pool is a AvgPool2d, not a conv, a BatchNorm or the input itself"),
    (mm.InPlaceAct, X6, "the output of block.block is read by silu, add, not by the sum alone"),
    (mm.InputChanged, X6, "the branches' input is changed in place in block"),
], ids=["strides", "read-twice", "relu-in-branch", "misaligned", "shared-conv", "reflect-pad", "avg-pool",
        "inplace-activation", "input-changed"])
def test_must_not_merge_stays_exact_with_its_reason(cls: Any, x: torch.Tensor, reason: "str | None") -> None:
    model, result, rel = _fused(cls, x)
    assert rel < 1e-10 and result.ok, (rel, result.verdict.reasons)
    assert result.plan.merges == []
    assert [s.reason for s in result.plan.merge_skips] == [f"sum in block: {reason}"]


def test_merge_can_be_switched_off() -> None:
    model = randomize_bn(mm.RepVGG(), seed=1).double().eval()
    result = fuse(model, torch.randn(1, 3, 8, 8, dtype=torch.float64), FuseOptions(passes={"merge": False}))
    assert result.plan.merges == [] and result.ok
    assert [s.norm for s in result.plan.skipped] == ["block.identity"]


def test_merged_file_saves_reloads_and_verifies(tmp_path: Path) -> None:
    from bnfuse_cli import SourceOptions, verify
    from bnfuse_cli.files.table import read_checkpoint
    from bnfuse_cli.files.write import write_checkpoint

    arch = "models_merge:RepVGG"
    for suffix in (".pth", ".safetensors"):
        rt = round_trip(randomize_bn(mm.RepVGG(), seed=3).eval(), arch, "1,3,16,16", tmp_path, suffix=suffix)
        assert rt.ok and len(rt.report.plan.merges) == 1 and rt.report.to_dict()["merges"][0]["into"] == "block.kxk"
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        assert rt.rel(x) < 1e-6 and count_calls(rt.fused, x.float()) == (2, 0)  # float32 weights, compared in float64
        assert any(s.kind == "merge" and s.skipped is None for s in rt.verified.verdict.sites)
    ck = read_checkpoint(rt.out)
    sd = dict(ck.state_dict)
    sd["block.kxk.weight"] = sd["block.kxk.weight"] * 1.01
    write_checkpoint(tmp_path / "bad.safetensors", state_dict=sd, metadata=ck.metadata)
    bad = verify(tmp_path / "orig.pth", tmp_path / "bad.safetensors", source_options=SourceOptions(arch=arch))
    assert not bad.ok and [s.layer for s in bad.verdict.failed_sites] == ["block.kxk"]


def test_a_fold_named_like_a_merged_branch_is_still_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """``block.kxk2`` starts with the name of the merged branch ``block.kxk`` but is not inside it: its
    fold is a site of its own, and a wrong fold there fails at that site."""
    model = randomize_bn(mm.PrefixNamed(), seed=2).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    good = fuse(model, x)
    assert good.ok and [m.into for m in good.plan.merges] == ["block.kxk"], good.verdict.reasons
    assert {s.layer: s.kind for s in good.verdict.sites} == {"block.kxk": "merge", "block.kxk2.0": "fold"}
    assert all(s.skipped is None for s in good.verdict.sites)

    def corrupt(m: nn.Module) -> None:
        with torch.no_grad():
            m.block.kxk2[0].weight[0].mul_(1.01)  # one output channel 1% off

    corrupt_after_rewrite(monkeypatch, corrupt)
    bad = fuse(model, x)
    assert [(s.layer, s.kind) for s in bad.verdict.failed_sites] == [("block.kxk2.0", "fold")]
    assert not bad.ok


def test_cli_inspect_and_convert_show_the_merges(tmp_path: Path) -> None:
    proc = run_bnfuse("inspect", "models_merge:RepVGG", "--weights", "none", "--input-shape", "1,3,16,16",
                      "--json", "-", cwd=TESTS, columns=160)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    kinds = {b["kind"]: b for b in data["merges"][0]["branches"]}
    assert kinds["norm"] == {"kind": "norm", "module": "block.identity", "norm": "block.identity"}
    assert "Merged (parallel branches -> one conv)" in proc.stderr and "kxk" in proc.stderr
    conv = run_bnfuse("convert", "models_merge:Misaligned", "--weights", "none", "--input-shape", "1,6,10,10",
                      "-o", str(tmp_path / "m.safetensors"), cwd=TESTS, columns=160)
    assert conv.returncode == 0, conv.stderr
    assert "Sums of branches left as they are" in conv.stdout and "does not align" in conv.stdout


def test_tracing_a_block_leaves_it_as_it_was() -> None:
    """A block that stores on itself during forward (a feature cache) is traced to look for
    sums; what the trace stored (a proxy) is undone, so the model still runs."""
    from bnfuse_cli.engine.forward import trace_block

    class Caching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)
            self.last = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.last = self.a(x)
            self.register_buffer("seen", torch.ones(1))
            return self.last + x

    block = Caching()
    trace_block(block)
    assert block.last is None and "seen" not in block._buffers
    assert block(torch.randn(1, 3, 4, 4)).shape == (1, 3, 4, 4)


def test_an_in_place_activation_between_sums_is_not_an_identity() -> None:
    model, result, rel = _fused(mm.InPlaceBetween, X6)
    assert rel < 1e-10 and result.ok, (rel, result.verdict.reasons)
    assert [len(m.branches) for m in result.plan.merges] == [2]  # a + b; the sum after the ReLU stays


# ----------------------------------------------------------------------------- branches as flat children


def test_flat_children_merge_in_a_stack_of_three_blocks(tmp_path: Path) -> None:
    """Conv and BN as direct children of the block, the sum nested in another order: each of three
    blocks in a row becomes one conv, exactly, and the file rebuilds and verifies."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model, result, rel = _fused(mm.FlatStack, x)
    assert rel < 1e-10 and result.ok, result.verdict.reasons
    assert [m.into for m in result.plan.merges] == [f"blocks.{i}.conv3" for i in range(3)]
    assert sorted((b.kind, b.module, b.norm) for b in result.plan.merges[0].branches) == [
        ("conv", "blocks.0.conv1", "blocks.0.bn1"), ("conv", "blocks.0.conv3", "blocks.0.bn3"),
        ("norm", "blocks.0.bn_id", "blocks.0.bn_id")]
    assert count_calls(result.model, x) == (4, 0)  # the stem and one conv per block, no BatchNorm
    assert not result.plan.skipped and not result.plan.merge_skips
    merge_sites = [s for s in result.verdict.sites if s.kind == "merge"]
    assert len(merge_sites) == 3 and all(s.rel_error < 1e-10 for s in merge_sites)
    assert round_trip(randomize_bn(mm.FlatStack(), seed=0), "models_merge:FlatStack", "1,3,8,8", tmp_path).ok


def test_a_flat_branch_with_a_relu_inside_stays_with_its_reason() -> None:
    model, result, rel = _fused(mm.FlatRelu, X8)
    assert rel < 1e-10 and not result.plan.merges
    assert [(s.block, s.reason) for s in result.plan.merge_skips] == [
        ("block", "sum in block: not every branch reads the same tensor")]


# ----------------------------------------------------------------------------- sums in the model's own forward


@pytest.mark.parametrize("arch, shape, convs", [("TopLevelSum", (1, 3, 8, 8), 2), ("InputBranches", (1, 4, 8, 8), 1)])
def test_a_sum_in_the_models_own_forward_merges_and_rebuilds(arch: str, shape: tuple[int, ...], convs: int,
                                                              tmp_path: Path) -> None:
    """fuse returns the rewritten root; convert writes it, load rebuilds it, verify checks it; branches
    that read the model's input (a BatchNorm, the input itself) are identity kernels like any other."""
    x = torch.randn(*shape, dtype=torch.float64)
    model, result, rel = _fused(getattr(mm, arch), x)
    assert rel < 1e-10 and result.ok and [m.block for m in result.plan.merges] == [""]
    assert result.model is not model and count_calls(result.model, x) == (convs, 0)
    rt = round_trip(randomize_bn(getattr(mm, arch)(), seed=1), f"models_merge:{arch}", ",".join(map(str, shape)),
                    tmp_path)
    assert rt.ok and [m.block for m in rt.report.plan.merges] == [""] and count_calls(rt.fused, x.float()) == (convs, 0)

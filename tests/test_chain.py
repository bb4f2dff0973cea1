"""Affine chains fold: ``bn(conv(x) * 2 + offset - 0.5) / divisor`` (constants: numbers, or
per-channel tensors the block holds) folds into the conv with the BatchNorm, exactly, and the steps
leave the forward; a chain with a ReLU or a computed value in it stays, with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import bnfuse_cli
from conftest import build, count_ops, round_trip

pytestmark = pytest.mark.usefixtures("tests_on_path")

ARCH = "models_chain:ChainNet"
ARITH = {"mul", "add", "sub", "div", "truediv", "__mul__", "__add__", "__sub__", "__truediv__", "__radd__",
         "__rmul__", "batch_norm"}


def arithmetic(module: nn.Module, x: torch.Tensor) -> int:
    return count_ops(module, x, ARITH)


def _model() -> nn.Module:
    return build(ARCH, seed=5)


def test_an_affine_chain_folds_with_its_batchnorm() -> None:
    model, x = _model(), torch.randn(2, 3, 10, 10)
    assert arithmetic(model.a, x) == 5  # * 2, + offset, - 0.5, / divisor, the BatchNorm
    result = bnfuse_cli.fuse(model, x)
    assert result.ok and result.error.rel < 1e-6
    (fold,) = result.plan.of("chain")
    assert (fold.norm, fold.producer) == ("a.bn", "a.conv")
    assert fold.steps == (("mul", 2.0), ("add", "a.offset"), ("sub", 0.5), ("div", "a.divisor"))
    assert arithmetic(result.model.a, x) == 0 and not hasattr(result.model.a, "bn")
    (site,) = [s for s in result.verdict.sites if s.kind == "chain"]
    assert site.layer == "a.conv" and site.rel_error < 1e-6
    reasons = {s.norm: s.reason for s in result.plan.skipped}
    assert reasons["b.bn"].startswith("follows div in b, not a Conv/Linear output (through the affine steps before "
                                      "it: the chain starts at relu, not at a Conv/Linear child); nor can it fold")
    assert reasons["c.bn"].startswith("follows div in c, not a Conv/Linear output (through the affine steps before "
                                      "it: mul by mean: it is not a constant")
    assert result.plan.to_dict()["bn_found"] == 3 and result.plan.to_dict()["bn_folded"] == 1


def test_an_affine_chain_fold_is_saved_loaded_and_verified(tmp_path: Path) -> None:
    rt = round_trip(_model(), ARCH, "1,3,10,10", tmp_path)
    x = torch.randn(1, 3, 10, 10)
    assert rt.ok and rt.rel(x) < 1e-6 and arithmetic(rt.fused.a, x) == 0
    assert [s.layer for s in rt.verified.verdict.sites if s.kind == "chain" and s.skipped is None] == ["a.conv"]


def test_pytorchs_conv_mul_add_bn_folds_and_round_trips(tmp_path: Path) -> None:
    """PyTorch's Conv_Mul_Add_Bn: ``bn(torch.add(torch.mul(conv(x), self.tensor1), self.tensor2))``, the
    constants plain tensor attributes (a float and an integer), in the model's own forward; saved,
    converted, loaded and verified through the real entry point."""
    arch, x = "models_chain:ConvMulAddBn", torch.randn(2, 3, 10, 10)
    model = build(arch, seed=2)
    result = bnfuse_cli.fuse(model, x)
    assert result.ok and result.error.rel < 1e-6
    (fold,) = result.plan.of("chain")
    assert (fold.block, fold.norm, fold.producer, fold.steps) == ("", "bn", "conv", (("mul", "tensor1"), ("add", "tensor2")))
    assert arithmetic(result.model, x) == 0 and result.plan.skipped == []
    (site,) = [s for s in result.verdict.sites if s.kind == "chain"]
    assert site.skipped is None and site.rel_error < 1e-6
    rt = round_trip(model, arch, "1,3,10,10", tmp_path, cli=[])
    assert rt.ok and rt.rel(x) < 1e-6 and arithmetic(rt.fused, x) == 0
    assert rt.report["chain_folds"] == [{"block": "", "norm": "bn", "producer": "conv",
                                         "steps": [["mul", "tensor1"], ["add", "tensor2"]]}]


LEFT = "models_chain:LeftNet"


def test_a_constant_on_the_left_of_sub_folds_and_of_div_stays(tmp_path: Path) -> None:
    """``c - y`` is ``-y + c``: it folds, with ``c`` a number, a tensor attribute or a buffer; ``c / y`` is
    not affine in ``y``: it stays, and says so."""
    x = torch.randn(2, 3, 10, 10)
    result = bnfuse_cli.fuse(build(LEFT, seed=3), x)
    assert result.ok and result.error.rel < 1e-6
    assert {f.norm: f.steps for f in result.plan.of("chain")} == {
        "blocks.sub_number.bn": (("rsub", 2.5),), "blocks.sub_attribute.bn": (("rsub", "blocks.sub_attribute.c"),),
        "blocks.sub_buffer.bn": (("rsub", "blocks.sub_buffer.c"),)}
    reasons = {s.norm: s.reason for s in result.plan.skipped}
    assert sorted(reasons) == [f"blocks.div_{k}.bn" for k in ("attribute", "buffer", "number")]
    assert "(through the affine steps before it: div of 2.5 by the layer's output (2.5 / y) is not an affine map" \
        in reasons["blocks.div_number.bn"]
    assert all("/ y) is not an affine map of it" in r for r in reasons.values())
    sites = [s for s in result.verdict.sites if s.kind == "chain"]
    assert len(sites) == 3 and all(s.skipped is None and s.rel_error < 1e-6 for s in sites)
    rt = round_trip(build(LEFT, seed=3), LEFT, "1,3,10,10", tmp_path)
    assert rt.ok and rt.rel(x) < 1e-6
    assert len([s for s in rt.verified.verdict.sites if s.kind == "chain" and s.skipped is None]) == 3


def test_a_chain_pass_that_misreads_the_operand_order_fails_at_its_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain pass that reads ``c - y`` and ``c / y`` as ``y - c`` and ``y / c`` folds them wrongly; the judge
    computes each site's original side from the model's own code, not from the pass's steps, so the site
    checks fail, even with a tolerance on the outputs that lets everything through."""
    import bnfuse_cli.engine.passes.chain as chain

    monkeypatch.setattr(chain, "_REVERSED", {"mul": "mul", "add": "add", "sub": "sub", "div": "div", "rsub": "rsub"})
    result = bnfuse_cli.fuse(build(LEFT, seed=3), torch.randn(2, 3, 10, 10),
                             bnfuse_cli.FuseOptions(rtol=1e6, atol=1e6))
    assert sorted(op for f in result.plan.of("chain") for op, _ in f.steps) == ["div"] * 3 + ["sub"] * 3
    assert all(c.ok for c in result.verdict.outputs.values())
    sites = [s for s in result.verdict.sites if s.kind == "chain"]
    assert len(sites) == 6 and all(s.skipped is None and not s.ok and s.rel_error > 0.1 for s in sites), sites
    assert not result.ok

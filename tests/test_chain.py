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

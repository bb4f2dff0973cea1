"""Affine chains fold: ``bn(conv(x) * 2 + offset - 0.5) / divisor`` (constants: numbers, or
per-channel tensors the block holds) folds into the conv with the BatchNorm, exactly, and the steps
leave the forward; a chain with a ReLU or a computed value in it stays, with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import bnfuse_cli
from conftest import count_ops, randomize_bn

pytestmark = pytest.mark.usefixtures("tests_on_path")

ARCH = "models_chain:ChainNet"
ARITH = {"mul", "add", "sub", "div", "truediv", "__mul__", "__add__", "__sub__", "__truediv__", "__radd__",
         "__rmul__", "batch_norm"}


def arithmetic(module: nn.Module, x: torch.Tensor) -> int:
    return count_ops(module, x, ARITH)


def _model() -> nn.Module:
    from models_chain import ChainNet

    torch.manual_seed(0)
    return randomize_bn(ChainNet(), seed=5).eval()


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
    torch.save(_model().state_dict(), tmp_path / "orig.pth")
    out = tmp_path / "fused.safetensors"
    report = bnfuse_cli.convert(tmp_path / "orig.pth", out, arch=ARCH, input_shape="1,3,10,10")
    assert report.verdict.ok
    fused = bnfuse_cli.load(out)
    x = torch.randn(1, 3, 10, 10)
    assert arithmetic(fused.a, x) == 0
    with torch.no_grad():
        ref = _model()(x)
        assert float((fused(x) - ref).norm() / ref.norm()) < 1e-6
    checked = bnfuse_cli.verify(tmp_path / "orig.pth", out, arch=ARCH)
    assert checked.ok and [s.layer for s in checked.verdict.sites if s.kind == "chain" and s.skipped is None] == \
        ["a.conv"]

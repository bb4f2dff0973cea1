"""Weight standardisation computed once: a conv that standardises its own weight with
``F.batch_norm`` in every forward (timm's StdConv2d, NFNets' ScaledStdConv2d) becomes a plain conv
holding the result, exactly; the BatchNorm after it can then fold; one that pads at run time stays,
with its reason.  Counted by the batch-norm calls a forward pass makes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import bnfuse_cli  # noqa: E402
from conftest import build, count_ops, round_trip  # noqa: E402

pytestmark = pytest.mark.usefixtures("tests_on_path")

ARCH = "models_std:StdNet"


def batch_norm_calls(model: nn.Module, x: torch.Tensor) -> int:
    return count_ops(model, x, {"batch_norm"})


def _model() -> nn.Module:
    return build(ARCH, seed=2)


def test_standardised_convs_become_plain_convs_exactly() -> None:
    model, x = _model(), torch.randn(2, 3, 17, 17)
    assert batch_norm_calls(model, x) == 4
    result = bnfuse_cli.fuse(model, x)
    assert result.ok and result.error.rel < 1e-6
    assert [i.layer for i in result.plan.of("standardise")] == ["conv1", "conv2"]
    (left,) = result.plan.left_by("standardise")
    assert left.layer == "conv3" and left.reason.startswith("conv3 pads its input at run time")
    assert [(f.norm, f.producer) for f in result.folds] == [("bn1", "conv1")]  # the next round, on the plain conv
    assert type(result.model.conv1) is nn.Conv2d and type(result.model.conv2) is nn.Conv2d
    assert batch_norm_calls(result.model, x) == 1  # conv3's own
    sites = [s for s in result.verdict.sites if s.kind == "standardise"]
    assert [s.layer for s in sites] == ["conv1", "conv2"] and all(s.rel_error < 1e-6 for s in sites)


def test_standardised_file_loads_and_verifies(tmp_path: Path) -> None:
    rt = round_trip(_model(), ARCH, "1,3,17,17", tmp_path, cli=["-v"])
    assert rt.ok and "Weight standardisation computed once" in rt.stdout
    assert "conv3 pads its input at run time" in rt.stdout
    assert type(rt.fused.conv2) is nn.Conv2d and not hasattr(rt.fused.conv2, "gain")
    assert rt.rel(torch.randn(1, 3, 17, 17)) < 1e-6


def test_nfnet_l0_computes_no_batch_norm_at_inference() -> None:
    """57 weight standardisations per forward in nfnet_l0, each computed once."""
    torch.manual_seed(0)
    model = timm.create_model("nfnet_l0", pretrained=False).eval()
    x = torch.randn(1, 3, 96, 96)
    assert batch_norm_calls(model, x) == 57
    result = bnfuse_cli.fuse(model, x)
    assert result.ok and len(result.plan.of("standardise")) == 57
    assert batch_norm_calls(result.model, x) == 0

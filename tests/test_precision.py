"""Half-precision folding: fold from float64 statistics and cast once.

resnet18 with random weights and randomised BN statistics, 1x3x64x64 input.  Errors are
relative (``||a - b|| / ||a||``) against a float64 evaluation:

* ``unfused``: the model cast to float16/bfloat16, BN left in place;
* ``ours``: bnfuse folds the float32 model (the arithmetic is float64), the fused model is cast
  once;
* ``naive``: the same pairs folded with float16/bfloat16 arithmetic (scale, weight, bias each
  rounded), as a fuser that works in the model's dtype does.

``ours`` must be no worse than ``unfused`` and better than ``naive``.  For a model that is
already in half precision (statistics already rounded) folding adds about one rounding of each
weight: ``fuse`` on it stays within a small factor of the unfused model, and is still better
than the naive fold.  Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from bnfuse_cli.errors import FoldError
from bnfuse_cli.workflows.fuse import fuse
from bnfuse_cli.checks import compare
from conftest import randomize_bn

DTYPES = [torch.float16, torch.bfloat16]


def _naive_fold(model: nn.Module, plan, dtype: torch.dtype) -> nn.Module:
    """Fold ``plan`` into ``model`` (already in ``dtype``) with ``dtype`` arithmetic throughout."""
    with torch.no_grad():
        for f in plan.folds:
            bn, conv = model.get_submodule(f.norm), model.get_submodule(f.producer)
            scale = bn.weight / torch.sqrt(bn.running_var + torch.tensor(bn.eps, dtype=dtype))
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            bias = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            conv.bias = nn.Parameter(bias)
            parent, _, attr = f.norm.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    return model


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = randomize_bn(resnet18(weights=None), seed=7).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x)
    fused32 = fuse(model, x.float())
    assert len(fused32.plan.folds) == 20 and not fused32.plan.skipped
    return model, x, reference, fused32


@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_in_float64_then_cast_is_no_worse_than_unfused(setup, dtype):
    model, x, reference, fused32 = setup
    xd = x.to(dtype)
    with torch.no_grad():
        unfused = copy.deepcopy(model).to(dtype)(xd)
        ours = copy.deepcopy(fused32.model).to(dtype)(xd)
        naive = _naive_fold(copy.deepcopy(model).to(dtype), fused32.plan, dtype)(xd)
    e_unfused, e_ours, e_naive = (compare(reference, out).rel for out in (unfused, ours, naive))
    print(f"\n{dtype}: rel error vs float64: unfused {e_unfused:.3e}, bnfuse {e_ours:.3e}, naive {e_naive:.3e}")
    assert all(math.isfinite(e) for e in (e_unfused, e_ours, e_naive))
    assert e_ours <= e_unfused
    assert e_ours < e_naive


@pytest.mark.parametrize("dtype", DTYPES)
def test_fuse_on_a_half_precision_model(setup, dtype):
    """The statistics are already rounded: judge against float64 on the same rounded parameters."""
    model, x, _, fused32 = setup
    low = copy.deepcopy(model).to(dtype)
    xd = x.to(dtype)
    with torch.no_grad():
        reference = copy.deepcopy(low).double()(xd.double())
        unfused = low(xd)
        res = fuse(low, xd)
        ours = res.model(xd)
        naive = _naive_fold(copy.deepcopy(low), res.plan, dtype)(xd)
    assert res.plan.folds == fused32.plan.folds
    assert res.model.conv1.weight.dtype == dtype and res.model.conv1.bias.dtype == dtype
    e_unfused, e_ours, e_naive = (compare(reference, out).rel for out in (unfused, ours, naive))
    print(f"\n{dtype} model: rel error vs float64: unfused {e_unfused:.3e}, bnfuse {e_ours:.3e}, naive {e_naive:.3e}")
    assert e_ours <= 1.5 * e_unfused
    assert e_ours < e_naive


def test_running_var_overflowing_float16_raises_naming_the_layer():
    model = randomize_bn(resnet18(weights=None), seed=3).eval()
    with torch.no_grad():
        model.layer2[1].bn1.running_var[5] = 1e5  # fine in float32, inf in float16
    low = model.half()
    x = torch.randn(1, 3, 32, 32).half()
    before = copy.deepcopy(low.state_dict())
    with pytest.raises(FoldError, match=r"layer2\.1\.bn1 .*infinite running_var.*float16"):
        fuse(low, x, inplace=True)
    # nothing was written: the first 20-odd folds were computed but not applied
    after = low.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(low.layer1[0].bn1, nn.BatchNorm2d)

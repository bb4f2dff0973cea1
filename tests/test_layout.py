"""A BatchNorm folds forward into a Linear through flatten/transpose/permute when its channels end
up as the Linear's features (FastViT's attention blocks); a flatten that merges its channels with the
positions keeps it, with the fold pass's reason.  Exact, judged at its site, saved, rebuilt, verified."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import models_layout as ml
from bnfuse_cli import fuse
from conftest import count_calls, randomize_bn, round_trip

X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _fused(build: Any):  # noqa: ANN202
    model = randomize_bn(build(), seed=4).double().eval()
    with torch.no_grad():
        ref = model(X)
    result = fuse(copy.deepcopy(model), X)
    with torch.no_grad():
        rel = float((result.model(X) - ref).norm() / ref.norm())
    return result, rel


@pytest.mark.parametrize("build, steps", [
    (ml.Transpose, (("flatten", (2,)), ("transpose", (-2, -1)))),
    (ml.Permute, (("permute", (0, 2, 3, 1)),)),
], ids=["flatten-transpose", "permute"])
def test_a_batchnorm_folds_into_a_linear_through_layout_ops(build: Any, steps: tuple) -> None:
    result, rel = _fused(build)
    assert rel < 1e-12 and result.ok, (rel, result.verdict.reasons)
    (item,) = result.plan.of("layout")
    assert (item.norm, item.producer, item.steps) == ("norm", "qkv", steps)
    assert result.plan.skipped == [] and count_calls(result.model, X)[1] == 0
    (site,) = [s for s in result.verdict.sites if s.kind == "layout"]
    assert site.skipped is None and site.rel_error < 1e-12


def test_a_flatten_that_merges_the_channels_keeps_the_batchnorm() -> None:
    result, rel = _fused(ml.Merged)
    assert rel < 1e-12 and result.ok and result.plan.of("layout") == []
    (skip,) = result.plan.skipped
    assert skip.norm == "norm" and "goes to flatten" in skip.reason


def test_a_layout_fold_is_saved_rebuilt_and_verified(tmp_path: Path, tests_on_path: None) -> None:
    rt = round_trip(randomize_bn(ml.Transpose(), seed=5).eval(), "models_layout:Transpose", "1,3,4,4", tmp_path)
    assert rt.ok and rt.report.to_dict()["layout_folds"][0]["steps"] == [["flatten", [2]], ["transpose", [-2, -1]]]
    assert isinstance(rt.fused.norm, nn.Identity) and rt.rel(X) < 1e-6
    assert any(s.kind == "layout" and s.skipped is None for s in rt.verified.verdict.sites)

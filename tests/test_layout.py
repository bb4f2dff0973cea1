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
    _folds_exactly(build, "qkv", steps)


def _folds_exactly(build: Any, layer: str, steps: tuple) -> None:
    """``norm`` folds forward into ``layer`` through ``steps``, exactly, checked at its site; no BatchNorm runs."""
    result, rel = _fused(build)
    assert rel < 1e-12 and result.ok, (rel, result.verdict.reasons)
    (item,) = result.plan.of("layout")
    assert (item.norm, item.producer, item.steps) == ("norm", layer, steps)
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


@pytest.mark.parametrize("mode, steps", [
    ("pool", (("mean_keepdim", (2, 3)), ("flatten", (1, -1)))),
    ("mean", (("mean", (2, 3)),)),
], ids=["adaptive-avg-pool-flatten", "mean"])
def test_a_batchnorm_folds_into_a_linear_through_global_average_pooling(mode: str, steps: tuple) -> None:
    _folds_exactly(lambda: ml.Pooled(mode), "head", steps)


@pytest.mark.parametrize("mode, reason", [
    ("relu", "nor can it fold into the layer after it: after mean_keepdim(2, 3), flatten(1, -1), its output goes to relu "
             "in the model forward, not to a Linear"),
    ("shared", "after mean_keepdim(2, 3), flatten(1, -1), its output is read 2 times (linear in head, sum in the model "
               "forward), not by one Linear alone"),
    ("conv", "after mean_keepdim(2, 3), its output goes to conv2d in head, not to a Linear"),
], ids=["relu-after-the-pooling", "pooled-also-read", "padded-conv-head"])
def test_a_batchnorm_before_pooling_that_must_stay_names_what_stops_it(mode: str, reason: str) -> None:
    result, rel = _fused(lambda: ml.Pooled(mode))
    assert rel < 1e-12 and result.ok and result.plan.of("layout") == [] and result.plan.folds == []
    (skip,) = result.plan.skipped
    assert skip.norm == "norm" and reason in skip.reason, skip.reason


def test_a_fold_through_pooling_is_saved_rebuilt_and_verified(tmp_path: Path, tests_on_path: None) -> None:
    rt = round_trip(randomize_bn(ml.Pooled(), seed=5).eval(), "models_layout:Pool", "1,3,4,4", tmp_path)
    assert rt.ok and rt.report.to_dict()["layout_folds"][0]["steps"] == [["mean_keepdim", [2, 3]], ["flatten", [1, -1]]]
    assert isinstance(rt.fused.norm, nn.Identity) and rt.rel(X) < 1e-6
    assert any(s.kind == "layout" and s.skipped is None for s in rt.verified.verdict.sites)

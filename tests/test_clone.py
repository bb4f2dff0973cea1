"""``--clone-shared``: a BatchNorm after a conv whose output is also read elsewhere folds into a copy
of the conv made for its path; off (the default), the reason says what it would fold and what it
costs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import bnfuse_cli
from bnfuse_cli import FuseOptions
from conftest import build, count_calls, round_trip

pytestmark = pytest.mark.usefixtures("tests_on_path")

ARCH = "models_clone:SharedConv"


def _model() -> nn.Module:
    return build(ARCH, seed=7)


def test_off_by_default_the_reason_says_what_it_would_do() -> None:
    result = bnfuse_cli.fuse(_model(), torch.randn(1, 3, 8, 8))
    assert result.ok and not result.plan.of("clone")
    (skip,) = result.plan.skipped
    assert skip.norm == "bn" and skip.reason.endswith(
        "; --clone-shared would fold it into a copy of conv for its path (+224 parameters)")


def test_clone_shared_folds_into_a_copy_exactly(tmp_path: Path) -> None:
    model, x = _model(), torch.randn(2, 3, 8, 8)
    assert count_calls(model, x) == (2, 1)
    result = bnfuse_cli.fuse(model, x, FuseOptions(passes={"clone_shared": True}))
    assert result.ok and result.error.rel < 1e-6 and not result.plan.skipped
    (item,) = result.plan.of("clone")
    assert (item.norm, item.producer, item.copy) == ("bn", "conv", "conv_for_bn")
    assert count_calls(result.model, x) == (3, 0)  # conv, its copy, head; no BatchNorm
    (site,) = [s for s in result.verdict.sites if s.kind == "clone"]
    assert site.layer == "conv_for_bn" and site.rel_error < 1e-6
    rt = round_trip(_model(), ARCH, "1,3,8,8", tmp_path, passes={"clone_shared": True})
    assert rt.ok and [c.copy for c in rt.report.plan.of("clone")] == ["conv_for_bn"] and rt.rel(x) < 1e-6

"""Every batch-norm call accounted for: ``F.batch_norm`` in a module's own forward is found by the
recorder, counted with the BatchNorm modules, folded into the conv before it when its statistics
are the module's own and in eval form (the call leaves the forward), and otherwise listed with its
reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import bnfuse_cli
from conftest import build, count_ops, round_trip

pytestmark = pytest.mark.usefixtures("tests_on_path")

ARCH = "models_functional:FunctionalNet"


def _model() -> nn.Module:
    return build(ARCH, seed=3)


def test_functional_batch_norms_fold_or_are_named() -> None:
    model, x = _model(), torch.randn(2, 3, 10, 10)
    assert count_ops(model, x, {"batch_norm"}) == 4
    result = bnfuse_cli.fuse(model, x)
    assert result.ok and result.error.rel < 1e-6
    (fold,) = result.plan.of("functional")
    assert (fold.block, fold.producer) == ("a", "a.conv")
    left = {x.where: x.reason for x in result.plan.left_by("functional")}
    assert left == {
        "F.batch_norm in b": "it normalises with batch statistics (training=True), so it is not a fixed affine map",
        "F.batch_norm in c": "the output of c.conv is also read by add in c",
    }
    assert result.plan.norms == ["bn", "F.batch_norm in a", "F.batch_norm in b", "F.batch_norm in c"]
    assert result.plan.to_dict()["bn_found"] == 4 and result.plan.to_dict()["bn_skipped"] == 2
    assert count_ops(result.model, x, {"batch_norm"}) == 2  # b's and c's; a's left the forward, bn folded
    (site,) = [s for s in result.verdict.sites if s.kind == "functional"]
    assert site.layer == "a.conv" and site.rel_error < 1e-6 and site.norms == ["F.batch_norm in a"]
    from bnfuse_cli.render import plan_summary

    assert plan_summary(result.plan)[:2] == [
        ("BatchNorm layers", "4 found, 1 folded, 1 folded from F.batch_norm calls, 2 left"),
        ("functional batch norms", "3 found, 1 folded, 2 left")]


def test_functional_fold_is_saved_loaded_and_verified(tmp_path: Path) -> None:
    rt = round_trip(_model(), ARCH, "1,3,10,10", tmp_path)
    x = torch.randn(1, 3, 10, 10)
    assert rt.ok and rt.rel(x) < 1e-6 and count_ops(rt.fused, x, {"batch_norm"}) == 2
    assert any(s.kind == "functional" and s.skipped is None for s in rt.verified.verdict.sites)

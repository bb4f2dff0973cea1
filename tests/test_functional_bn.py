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


def _pytorchs(arch: str) -> nn.Module:
    """A model of PyTorch's own folding tests as its code makes it: its statistics are random already,
    and plain tensor attributes, which a state_dict does not carry (``build`` would randomise them)."""
    import importlib

    module, _, name = arch.partition(":")
    torch.manual_seed(0)
    return getattr(importlib.import_module(module), name)().eval()


def test_pytorchs_functional_batch_norm_on_plain_tensor_attributes_folds_and_round_trips(tmp_path: Path) -> None:
    """PyTorch's own ConvFunctionalBN: the call is in the model's own forward and its tensors are plain
    attributes (neither buffers nor parameters); it folds, the judge replays the model's call at the site,
    and ``load`` rebuilds the same model from its code."""
    arch, x = "models_functional:ConvFunctionalBN", torch.randn(2, 3, 9, 9)
    result = bnfuse_cli.fuse(_pytorchs(arch), x)
    assert result.ok and result.error.rel < 1e-6
    (fold,) = result.plan.of("functional")
    assert (fold.block, fold.producer, fold.stats) == ("", "conv", ("running_mean", "running_var", "weight", "bias"))
    assert count_ops(result.model, x, {"batch_norm"}) == 0
    (site,) = [s for s in result.verdict.sites if s.kind == "functional"]
    assert site.skipped is None and site.rel_error < 1e-6
    rt = round_trip(_pytorchs(arch), arch, "1,3,9,9", tmp_path)
    assert rt.ok and rt.rel(x) < 1e-6 and count_ops(rt.fused, x, {"batch_norm"}) == 0
    assert [s.kind for s in rt.verified.verdict.sites if s.skipped is None] == ["functional"]


def test_two_calls_on_one_conv_output_do_not_fold_into_it() -> None:
    result = bnfuse_cli.fuse(_pytorchs("models_functional:SharedConvFunctionalBN"), torch.randn(2, 3, 9, 9))
    assert result.ok and result.plan.of("functional") == []
    assert [(x.where, x.reason) for x in result.plan.left_by("functional")] == [
        ("F.batch_norm in the model", "the output of conv is also read by a second batch norm in the model forward"),
        ("F.batch_norm #2 in the model", "the output of conv is also read by a second batch norm in the model forward")]
    assert result.plan.to_dict()["bn_found"] == 2 and result.plan.to_dict()["bn_skipped"] == 2


def test_a_call_whose_tensors_cannot_be_resolved_says_which_and_why(tmp_path: Path) -> None:
    """A global, a value computed in the forward and a closure's tensor are named as such; the call beside
    them whose mean is a buffer and variance a plain attribute folds, and the fused file loads (the
    rewritten forward keeps reading the global and the closure's tensors)."""
    arch, x = "models_functional:Unresolved", torch.randn(2, 3, 6, 6)
    result = bnfuse_cli.fuse(build(arch, seed=1), x)
    assert result.ok and result.error.rel < 1e-6
    held = ": bnfuse folds only tensors the model holds (a parameter, a buffer or a tensor attribute of a module)"
    assert {x.where: x.reason.partition(", which")[0] for x in result.plan.left_by("functional")} == {
        "F.batch_norm in the model": "its running_mean is a tensor no module of the model holds (a global or a closure)"
                                     + held,
        "F.batch_norm #2 in the model": "its running_var is computed in the forward (by clamp in the model forward)"
                                        + held,
        "F.batch_norm #3 in the model": "its weight is a tensor no module of the model holds (a global or a closure)"
                                        + held}
    (fold,) = result.plan.of("functional")
    assert (fold.label, fold.producer, fold.stats) == ("F.batch_norm #4 in the model", "d", ("mean", "var", "", ""))
    assert result.plan.to_dict()["bn_found"] == 4 and result.plan.to_dict()["bn_skipped"] == 3
    # saved and loaded (its global and closure tensors run only in float32: no float64 verify)
    torch.save(build(arch, seed=1).state_dict(), tmp_path / "orig.pth")
    report = bnfuse_cli.convert(tmp_path / "orig.pth", tmp_path / "fused.pth", bnfuse_cli.ConvertOptions(force=True),
                                bnfuse_cli.SourceOptions(arch=arch, input_shape="1,3,6,6"))
    assert report.verdict.ok
    fused = bnfuse_cli.load(tmp_path / "fused.pth")
    with torch.no_grad():
        want, got = result.model(x), fused(x)
    assert torch.equal(want, got) and count_ops(fused, x, {"batch_norm"}) == 3

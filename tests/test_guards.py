"""Every refusal a pass can make, made by a tiny model (tests/models_guards.py): the pass leaves that
site as it is, its reason names what stops it, and the model stays exact (float64) with every hook it
had still running.  Each pass lists its guards in its module docstring ("Guards:"); scripts/mutants.py
writes a bug into each guard and names the test here (or the older one) that catches it.

The affine-chain pass (engine/passes/chain.py) is refused by, in its order:
  - a step's result also read elsewhere (``z = conv(x) * 2; bn(z) + z.mean()``)
  - a constant on the left of ``-`` or ``/`` (``bn(c - conv(x))``, ``bn(c / conv(x))``: ``c / y`` is not affine)
  - a step by something that is not a number or a tensor the block holds (tests/test_chain.py)
  - a held tensor that is not one value, or one per channel (``conv(x) * mask``, one value per position)
  - a chain that does not start at a Conv child (tests/test_chain.py: a ReLU in the chain), or one whose output
    is also read elsewhere
  - a layer that is not a Conv (a Linear on (N, C, L): the chain is folded on axis 1)
  - a conv called more than once
  - a conv output returned by the model or kept in an attribute
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import build

from bnfuse_cli import FuseOptions, fuse
from bnfuse_cli.checks import compare
from bnfuse_cli.engine.passes import by_name

X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
#: (N, C, L) with C == L, for a BatchNorm1d beside a Linear
XS = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
#: (N, C, L) with C != L
XL = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
#: rows of 4 features; tokens of 5
XR = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
XT = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


@dataclass(frozen=True)
class Case:
    """``arch`` (models_guards) fused on ``x`` with ``passes`` on: the pass ``acts`` plans nothing, and
    the pass ``left`` (``acts`` unless given) leaves ``where`` with a reason holding ``words``."""

    id: str
    arch: str
    acts: str
    where: str
    words: str
    x: Any = field(default=X, compare=False)
    passes: "tuple[str, ...]" = ()
    left: str = ""
    timm: bool = False


CASES = [
    # fold, backward
    Case("fold-norm-pre-hooks", "NormPreHooked", "fold", "bn", "it has forward pre-hooks"),
    Case("fold-norm-hooks", "NormHooked", "fold", "bn", "it has forward hooks"),
    Case("fold-reshape-axis", "ReshapeAcross", "fold", "bn", "which does not keep its channel axis as the BatchNorm's"),
    Case("fold-cat-read-elsewhere", "CatReadElsewhere", "fold", "bn", "the cat of c1, c2 is also read by mean"),
    Case("fold-cat-returned", "CatReturned", "fold", "bn", "the cat of c1, c2 is also returned by the model"),
    Case("fold-channels-per-call", "CatSwapped", "fold", "bn",
         "c2 gives different channels of this BatchNorm on different calls"),
    Case("fold-layer-pre-hooks", "LayerPreHooked", "fold", "bn", "conv has forward pre-hooks"),
    Case("fold-layer-hooks", "LayerHooked", "fold", "bn", "conv has forward hooks"),
    # fold, forward (a BatchNorm on the model's input)
    Case("fold-fwd-norm-act", "InputNormAct", "fold", "0", "the model input", timm=True),
    Case("fold-fwd-different-layers", "InputNormTwoLayers", "fold", "bn", "its outputs feed different layers"),
    Case("fold-fwd-other-reader", "InputNormRead", "fold", "bn", "its output also feeds mean"),
    Case("fold-fwd-returned", "InputNormReturned", "fold", "bn", "its output is also returned by the model"),
    Case("fold-fwd-called-elsewhere", "InputNormConvTwice", "fold", "bn", "conv is called on other inputs too"),
    Case("fold-fwd-transposed", "InputNormTransposed", "fold", "bn",
         "folding forward into ConvTranspose2d up is not supported"),
    Case("fold-fwd-linear-3d", "InputNorm1dLinear", "fold", "bn", "the Linear after it, fc, reads a 3-D tensor", XS),
    # standardise
    Case("std-same-pad", "StdSame", "standardise", "conv", "pads its input at run time", timm=True),
    Case("std-never-called", "StdUnused", "standardise", "conv", "never called", timm=True),
    Case("std-hooks", "StdHooked", "standardise", "conv", "conv has forward hooks, which would be dropped",
         timm=True),
    # chain
    Case("chain-read-elsewhere", "ChainRead", "chain", "bn", "the result of mul is also read elsewhere", left="fold"),
    Case("chain-layer-read-elsewhere", "ChainLayerRead", "chain", "bn", "the chain starts at conv", left="fold"),
    Case("chain-not-per-channel", "ChainMask", "chain", "bn", "does not broadcast on the channel axis", left="fold"),
    Case("chain-not-conv", "ChainLinear", "chain", "bn", "fc is not a Conv", XL, left="fold"),
    Case("chain-called-twice", "ChainTwice", "chain", "bn", "conv is called 2 times", left="fold"),
    Case("chain-kept", "ChainKept", "chain", "bn", "the output of conv is also kept in the attribute last",
         left="fold"),
    # layout
    Case("layout-norm-hooks", "TokensNormHook", "layout", "norm", "it has forward hooks", left="fold"),
    Case("layout-training", "TokensTrain", "layout", "norm", "runs in training mode", left="fold"),
    Case("layout-read-elsewhere", "TokensRead", "layout", "norm",
         "its output is read 2 times (flatten in the model forward, mean in the model forward)", left="fold"),
    Case("layout-step-read-elsewhere", "TokensReadFlat", "layout", "norm",
         "after flatten(2), its output is read 2 times (transpose in the model forward, mean in", left="fold"),
    Case("layout-returned", "TokensReturned", "layout", "norm", "transpose(1, 2), its output is also returned by the model",
         left="fold"),
    Case("layout-called-elsewhere", "TokensTwice", "layout", "norm", "qkv is called 2 times", left="fold"),
    Case("layout-layer-problem", "TokensTied", "layout", "norm", "qkv.weight is shared with other.weight", left="fold"),
    Case("layout-not-features", "TokensPositions", "layout", "norm", "mix reads axis 2 as its features, not the channels", left="fold"),
    # functional
    Case("fn-stats-not-held", "FStats", "functional", "F.batch_norm in b", "its running_mean is computed in the forward"),
    Case("fn-affine-not-held", "FAffine", "functional", "F.batch_norm in b", "its weight is computed in the forward"),
    Case("fn-not-layer-output", "FRelu", "functional", "F.batch_norm in b", "not the output of a Conv/Linear"),
    Case("fn-linear-3d", "FNetLinear", "functional", "F.batch_norm in b", "b.fc's output is 3-D", XL),
    Case("fn-returned", "FReturned", "functional", "F.batch_norm in b", "the output of b.conv is also returned"),
    Case("fn-called-twice", "FTwice", "functional", "F.batch_norm in b", "b.conv is called more than once"),
    Case("fn-layer-problem", "FLayerHook", "functional", "F.batch_norm in b", "b.conv has forward pre-hooks"),
    Case("fn-block-hooks", "FBlockHook", "functional", "F.batch_norm in b", "b has forward hooks, which would be"),
    Case("fn-untraceable", "FNetUntraceable", "functional", "F.batch_norm in b", "cannot be traced by torch.fx"),
    # merge
    Case("merge-tied", "MergeTied", "merge", "block", "block.b's weight is also block.other.weight"),
    Case("merge-layer-problem", "MergeLayerHook", "merge", "block", "block.b.conv has forward hooks"),
    Case("merge-branch-hooks", "MergeWrapperHook", "merge", "block", "block.b has forward hooks, which would be"),
    Case("merge-norm-problem", "MergeNormHook", "merge", "block", "block.id: it has forward pre-hooks"),
    Case("merge-norm-training", "MergeNormTrain", "merge", "block", "block.id: it runs in training mode"),
    Case("merge-linear-3d", "MergeLinear3d", "merge", "block", "Linear branches merge on a 2-D input", XS),
    # scale
    Case("scale-layer-called-twice", "ScaleLayerTwice", "scale", "ls", "proj is called 2 times", XR),
    Case("scale-layer-problem", "ScaleLayerHook", "scale", "ls", "proj has forward hooks", XR),
    Case("scale-layer-returned", "ScaleLayerReturned", "scale", "ls", "the output of proj is also returned", XR),
    Case("scale-axis", "ScaleTokens", "scale", "ls", "ls scales axis 1, not the features of proj", XT),
    Case("scale-hooks", "ScaleHooked", "scale", "ls", "ls has forward hooks, which would be dropped", XR),
    Case("scale-fwd-returned", "ScaleForwardReturned", "scale", "ls", "its output is also returned by the model", XR),
    Case("scale-fwd-called-elsewhere", "ScaleForwardTwice", "scale", "ls",
         "fc does not read the output of ls as its input, once", XR),
    Case("scale-fwd-layer-problem", "ScaleForwardTied", "scale", "ls", "fc.weight is shared with other.weight", XR),
    Case("scale-op-block-hooks", "GammaBlockHook", "scale", "block.gamma", "block has forward hooks", XT),
    Case("scale-op-path-read", "GammaPathRead", "scale", "block.gamma", "a tensor on the way is also read elsewhere",
         XT),
    Case("scale-op-layer-read", "GammaLayerRead", "scale", "block.gamma",
         "the output of block.inner.fc is also read elsewhere", XT),
    Case("scale-op-not-per-channel", "GammaNotChannel", "scale", "block.full", "is not one value per channel", XT),
    # horizontal
    Case("horiz-layer-problem", "SiblingsLayerHook", "horizontal", "b", "b has forward hooks", passes=("horizontal",)),
    Case("horiz-block-hooks", "SiblingsWrapped", "horizontal", "a, b.0", "b has forward hooks, which would be",
         passes=("horizontal",)),
    # clone
    Case("clone-norm-problem", "SharedNormHook", "clone", "blk.bn", "it has forward hooks", passes=("clone_shared",),
         left="fold"),
    Case("clone-training", "SharedTrain", "clone", "blk.bn", "runs in training mode", passes=("clone_shared",),
         left="fold"),
    Case("clone-layer-problem", "SharedLayerHook", "clone", "blk.bn",
         "nor can it fold into a copy of the layer before it: blk.conv has forward hooks", passes=("clone_shared",),
         left="fold"),
    Case("clone-block-hooks", "SharedBlockHook", "clone", "blk.bn",
         "nor can it fold into a copy of the layer before it: blk has forward hooks", passes=("clone_shared",),
         left="fold"),
    Case("clone-changed-in-place", "SharedInPlace", "clone", "blk.bn", "also read by relu", passes=("clone_shared",),
         left="fold"),
    Case("clone-linear-3d", "SharedLinear3d", "clone", "bn", "output of fc is also read by mean", XL,
         passes=("clone_shared",), left="fold"),
    Case("clone-other-block", "SharedOtherBlock", "clone", "bn", "output of enc.0 is also read by mean",
         passes=("clone_shared",), left="fold"),
    # unwrap
    Case("unwrap-hooks", "WrapperHook", "unwrap", "cn", "cn has forward hooks, which would be dropped",
         passes=("unwrap",)),
    Case("unwrap-pre-hooks", "WrapperPreHook", "unwrap", "cn", "cn has forward pre-hooks", passes=("unwrap",)),
    Case("unwrap-backward-hooks", "WrapperBackwardHook", "unwrap", "cn", "cn has backward hooks", passes=("unwrap",)),
]


def _seen(model: torch.nn.Module, x: torch.Tensor) -> "tuple[dict[str, int], Any]":
    """How many calls each observing hook of ``model`` counts in one forward pass, by module name."""
    for m in model.modules():
        if hasattr(m, "seen"):
            m.seen = 0
    with torch.no_grad():
        out = model(x)
    return {n: m.seen for n, m in model.named_modules() if hasattr(m, "seen")}, out


def _fused(arch: str, x: torch.Tensor, passes: "tuple[str, ...]" = ()):  # noqa: ANN202
    """The model and its fusion (float64); the fused model computes what the model does, hooks and all."""
    model = build(f"models_guards:{arch}", seed=3).double()
    seen, ref = _seen(model, x)
    result = fuse(model, x, FuseOptions(passes={p: True for p in passes}))
    assert result.ok, result.verdict.reasons
    seen_after, out = _seen(result.model, x)
    assert compare(ref, out).rel < 1e-12 and seen_after == seen, (compare(ref, out), seen, seen_after)
    return model, result


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_each_guard_refuses_with_its_reason_and_the_model_stays_exact(case: Case) -> None:
    if case.timm:
        pytest.importorskip("timm")
    _, result = _fused(case.arch, case.x, case.passes)
    assert result.plan.of(case.acts) == [], result.plan.of(case.acts)
    p = by_name(case.left or case.acts)
    left = dict(p.left_row(x) for x in result.plan.left_by(p.name))
    assert case.words in left.get(case.where, ""), left


# ----------------------------------------------------------------------------- chain: the operand order


@pytest.mark.parametrize("arch", ["ChainRsub", "ChainRsubHeld", "ChainRdiv"])
def test_a_constant_on_the_left_of_minus_or_divide_is_never_read_as_on_the_right(arch: str) -> None:
    """``bn(c - conv(x))`` may fold only as ``-conv(x) + c`` (or stay); ``bn(c / conv(x))`` is not affine and
    stays.  Either way the model stays exact, and a folded chain passes its own site."""
    _, result = _fused(arch, X)
    if arch == "ChainRdiv":
        assert result.plan.of("chain") == [] and "bn" in {s.norm for s in result.plan.skipped}
    assert all(s.ok for s in result.verdict.sites)


# ----------------------------------------------------------------------------- horizontal: activations alike


@pytest.mark.parametrize("arch", ["SiblingsLeaky", "SiblingsElu", "SiblingsGelu", "SiblingsHardtanh",
                                  "FunctionalSiblings", "SiblingsActRead", "SiblingsActHook"])
def test_sibling_activations_alike_by_type_but_not_in_their_parameters_run_per_slice(arch: str) -> None:
    """LeakyReLU slopes 0.1 and 0.5, ELU alpha, GELU approximate, Hardtanh bounds, F.leaky_relu's slope; an
    output also read elsewhere; activations with hooks: the siblings become one wider layer, each slice
    through its own activation, exactly (a wrong one is off by 0.2 to 0.7)."""
    _, result = _fused(arch, X, ("horizontal",))
    (wide,) = result.plan.of("horizontal")
    assert wide.layers == ("a", "b") and wide.acts == ()


@pytest.mark.parametrize("arch", ["SiblingsTwice", "SiblingsTied"])
def test_a_layer_called_twice_or_with_tied_weights_is_no_sibling(arch: str) -> None:
    """Not a candidate at all: nothing planned, nothing to say."""
    _, result = _fused(arch, X, ("horizontal",))
    assert result.plan.of("horizontal") == [] and result.plan.left_by("horizontal") == []


def test_alike_activations_run_once_and_the_site_checks_each_sibling_with_its_own() -> None:
    _, result = _fused("Siblings", X, ("horizontal",))
    (wide,) = result.plan.of("horizontal")
    assert wide.acts == ("act_a", "act_b")
    (site,) = [s for s in result.verdict.sites if s.kind == "horizontal"]
    assert site.layer == "a" and site.skipped is None and site.rel_error < 1e-12


@pytest.mark.parametrize("arch", ["SiblingsLeaky", "SiblingsElu", "SiblingsHardtanh"])
def test_activations_taken_as_alike_by_type_alone_fail_the_horizontal_site(arch: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The judge does not share the pass's reading: with the parameters left out of the comparison (a bug),
    the wider layer's site, which runs each sibling through its own activation, fails."""
    from bnfuse_cli.engine.passes import horizontal

    real = horizontal._activation
    monkeypatch.setattr(horizontal, "_activation", lambda block, node: (k := real(block, node)) and k[:2])
    model = build(f"models_guards:{arch}", seed=3).double()
    result = fuse(model, X, FuseOptions(passes={"horizontal": True}))
    assert not result.ok and [(s.kind, s.layer) for s in result.verdict.failed_sites] == [("horizontal", "a")]

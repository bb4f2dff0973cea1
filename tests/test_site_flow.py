"""The judge's own reading of the data flow at a site (bnfuse_cli/checks/flow.py).

A site's float64 check proves the fused layer computes what the site's chain computed; it cannot see that
the chain's removed value was also read elsewhere, or that the layer also runs where the chain does not.
The judge watches one plain run of the original with its own hooks, so a pass that misreads the data flow
fails at its site, by name, whatever the outputs say.  Here: the site a pass without its guard would plan
is handed to the judge directly (it fails), the sites real passes plan on models that accumulate in place,
reuse one activation module or read a value's shape only pass, and a copy made for its path (clone) keeps
the original's values where they were.  scripts/mutants.py runs the last test below with each data-flow
guard broken in the real passes, and requires that it fail there: each such bug fails its own site check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import models_guards
import pytest
import torch
from conftest import build
from torch import nn

from bnfuse_cli import FuseOptions, fuse
from bnfuse_cli.checks import SiteProbe
from bnfuse_cli.engine.steps import Forward, Layout, Norm, RunLayer, RunModule, SiteSpec, Sum

X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
X4 = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
X6 = torch.randn(2, 6, 6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
XR = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
XT = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _judged(model: nn.Module, x: torch.Tensor, spec: SiteSpec) -> Any:
    """``spec`` judged as verify judges a site: a plain run of the original, then the check (of the original
    itself, nothing fused: what matters here is the site's ``flow``)."""
    probe = SiteProbe()
    probe.use([spec])
    with torch.no_grad(), probe.hooks(model):
        model(x)
    probe.reference(model)
    (site,) = probe.check(model)
    return site


def _fold(layer: str, norm: str) -> SiteSpec:
    return SiteSpec("fold", layer, layer, (norm,), (RunLayer(layer), Norm(norm)), (RunLayer(layer),))


def _forward(norm: str, *moves: Any, layer: str, module: bool = False) -> SiteSpec:
    first = RunModule(norm) if module else Norm(norm)
    return SiteSpec("fold", layer, norm, (norm,), (first, *moves, RunLayer(layer)), (*moves, RunLayer(layer)))


WRONG = {
    # a fold into a layer whose output a residual also reads
    "fold-other-reader": ("models_edge:ResidualRead", X, _fold("layer1.0.conv1", "layer1.0.bn1"),
                          "read layer1.0.conv1's output 1 more time"),
    # a fold into a conv called twice, the BatchNorm after one call (pytorch#104593)
    "fold-called-elsewhere": ("models_edge:ConvTwiceBNOnce", X, _fold("conv", "bn"), "ran conv 2 times, bn 1 time: conv also runs where"),
    "fold-fwd-other-reader": ("models_guards:InputNormRead", X, _forward("bn", layer="conv"), "read bn's output 1 more time"),
    "fold-fwd-returned": ("models_guards:InputNormReturned", X, _forward("bn", layer="conv"), "read bn's output 1 more time"),
    "fold-fwd-called-elsewhere": ("models_guards:InputNormConvTwice", X, _forward("bn", layer="conv"),
                                  "ran conv 2 times, bn 1 time"),
    # a BatchNorm folded through flatten/transpose into a Linear, its output also read by a mean
    "layout-read-elsewhere": ("models_guards:TokensRead", X, _forward("norm", Layout("flatten", (2,)), Layout(
        "transpose", (1, 2)), layer="qkv", module=True), "read norm's output 1 more time"),
    "layout-called-elsewhere": ("models_guards:TokensTwice", X, _forward("norm", Layout("flatten", (2,)), Layout(
        "transpose", (1, 2)), layer="qkv", module=True), "ran qkv 2 times, norm 1 time"),
    # a scale folded forward into a Linear the model also calls on its input
    "scale-fwd-called-elsewhere": ("models_guards:ScaleForwardTwice", XR, _forward("ls", layer="fc", module=True),
                                   "ran fc 2 times, ls 1 time"),
    "scale-layer-returned": ("models_guards:ScaleLayerReturned", XR, SiteSpec(
        "scale", "proj", "proj", ("ls",), (RunLayer("proj"), RunModule("ls")), (RunLayer("proj"),)),
        "read proj's output 1 more time"),
    # a functional F.batch_norm folded into a conv called twice, the call after the second only
    "fn-called-twice": ("models_guards:FTwice", X, SiteSpec(
        "functional", "b.conv", "b.conv", ("F.batch_norm in b",), (RunLayer("b.conv"), Forward("b", "conv_1", "batch_norm")),
        (RunLayer("b.conv"),)), "ran b.conv 2 times, b 1 time"),
    # a merge of a branch whose output is also returned
    "merge-read-elsewhere": ("models_merge:ReadTwice", X6, SiteSpec(
        "merge", "block.a.0", "block.a", ("block.a", "block.b"), (Sum(((RunModule("block.a"),), (RunModule("block.b"),))),),
        (RunLayer("block.a.0"),)), "read block.b's output 1 more time"),
    # a merge of two branches, one of which the block also calls on the sum
    "merge-branch-twice": ("models_merge:SharedConv", X6, SiteSpec(
        "merge", "block.a.0", "block.a", ("block.a", "block.b"), (Sum(((RunModule("block.a"),), (RunLayer("block.b"),))),),
        (RunLayer("block.a.0"),)), "ran block.a 1 time, block.b 2 times: the branches"),
}


@pytest.mark.parametrize("kind", sorted(WRONG))
def test_a_site_the_original_does_not_run_as_claimed_fails_by_name(kind: str) -> None:
    """The wrong site a pass without its data-flow guard would plan fails at the judge, saying what the
    original's own run did."""
    arch, x, spec, words = WRONG[kind]
    site = _judged(build(arch, seed=3).double(), x, spec)
    assert not site.ok and site.flow is not None and words in site.flow, site


def test_the_same_sites_on_models_that_run_as_claimed_pass() -> None:
    """No flow problem where the claim holds: the conv called twice with the BatchNorm after each call, one
    BatchNorm after two convs, one conv output read by two calls of its BatchNorm (and by nothing else),
    and a BatchNorm read only on its way to the layer."""
    for arch, layer in [("ConvTwiceBNTwice", "conv"), ("SharedBN", "c1"), ("SharedBN", "c2"), ("BNReadTwice", "conv")]:
        site = _judged(build(f"models_edge:{arch}", seed=3).double(), X, _fold(layer, "bn"))
        assert site.flow is None, (arch, site)
    site = _judged(build("test_site_flow:Tokens", seed=3).double(), X, _forward(
        "norm", Layout("flatten", (2,)), Layout("transpose", (1, 2)), layer="qkv", module=True))
    assert site.flow is None, site


def Tokens() -> nn.Module:  # noqa: N802
    """norm -> flatten(2).transpose(1, 2) -> qkv, and nothing else."""
    return models_guards.Tokens("plain")


# ----------------------------------------------------------------------------- what real models do


class Accumulating(nn.Module):
    """timm's MobileOne: the first branch's output is the accumulator (``out = a(x); out += b(x)``), the
    block's output read by the next block's three convs; one ReLU module used twice; a LeViT-like
    ``bn(linear(x).flatten(0, 1)).reshape_as(y)`` and a ``zeros_like(y)`` reading ``y`` for its shape only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.c = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.d = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.act = nn.ReLU(inplace=True)
        self.fc, self.bn = nn.Linear(4, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x)
        out += self.b(x)
        y = self.act(out)
        out = self.c(y)
        out += self.d(y)
        t = self.act(out).flatten(2).transpose(1, 2)
        z = self.fc(t)
        return self.bn(z.flatten(0, 1)).reshape_as(z) + torch.zeros_like(z)  # zeros_like reads z's shape only


def test_accumulating_in_place_sharing_an_activation_and_reading_a_shape_pass() -> None:
    model = build("test_site_flow:Accumulating", seed=3).double()
    with torch.no_grad():
        ref = model(X)
    result = fuse(model, X)
    assert result.ok, result.verdict.reasons
    assert {s.kind for s in result.verdict.sites} >= {"merge", "fold"}
    assert all(s.flow is None for s in result.verdict.sites)
    with torch.no_grad():
        assert torch.allclose(result.model(X), ref, rtol=1e-10, atol=1e-12)


def test_a_copy_for_its_path_keeps_the_originals_values() -> None:
    """clone_shared folds a BatchNorm into a copy of a conv whose output a residual also reads: the conv
    stays as it was for the residual, so its second reader is no flow problem."""
    model = build("models_edge:ResidualRead", seed=3).double()
    result = fuse(model, X, FuseOptions(passes={"clone_shared": True}))
    assert result.ok and result.plan.of("clone"), result.verdict.reasons
    assert all(s.flow is None for s in result.verdict.sites if s.kind == "clone")


# ----------------------------------------------------------------------------- for scripts/mutants.py


@dataclass(frozen=True)
class Guarded:
    arch: str
    x: Any = field(default=X, compare=False)
    passes: "tuple[str, ...]" = ()


#: each data-flow guard (its name in scripts/mutants.py) and a model that trips it
GUARDED = {
    "fold-other-reader": Guarded("models_edge:ResidualRead"),
    "fold-called-elsewhere": Guarded("models_edge:ConvTwiceBNOnce"),
    "fold-fwd-other-reader": Guarded("models_guards:InputNormRead"),
    "fold-fwd-returned": Guarded("models_guards:InputNormReturned"),
    "fold-fwd-called-elsewhere": Guarded("models_guards:InputNormConvTwice"),
    "chain-layer-read-elsewhere": Guarded("models_guards:ChainLayerRead"),
    "chain-called-twice": Guarded("models_guards:ChainTwice"),
    "layout-read-elsewhere": Guarded("models_guards:TokensRead"),
    "layout-called-elsewhere": Guarded("models_guards:TokensTwice"),
    "fn-returned": Guarded("models_guards:FReturned"),
    "fn-called-twice": Guarded("models_guards:FTwice"),
    "merge-read-elsewhere": Guarded("models_merge:ReadTwice", X6),
    "scale-layer-called-twice": Guarded("models_guards:ScaleLayerTwice", XR),
    "scale-layer-returned": Guarded("models_guards:ScaleLayerReturned", XR),
    "scale-fwd-returned": Guarded("models_guards:ScaleForwardReturned", XR),
    "scale-fwd-called-elsewhere": Guarded("models_guards:ScaleForwardTwice", XR),
    "scale-op-layer-read": Guarded("models_guards:GammaLayerRead", XT),
    "horiz-activation-read-elsewhere": Guarded("models_guards:SiblingsActRead", X, ("horizontal",)),
}


@pytest.mark.parametrize("guard", sorted(GUARDED))
def test_the_sites_alone_refuse_what_a_data_flow_guard_refuses(guard: str) -> None:
    """With the outputs' tolerance out of the way, only the site checks can fail.  With the guard in place
    the pass refuses and the verdict passes; scripts/mutants.py breaks the guard and requires this test to
    fail: the bug is then caught at its site, by the judge's own reading of the data flow."""
    g = GUARDED[guard]
    model = build(g.arch, seed=3).double()
    result = fuse(model, g.x, FuseOptions(rtol=1e6, atol=1e6, passes={p: True for p in g.passes}))
    assert result.ok, result.verdict.reasons


def test_every_data_flow_guard_here_is_a_mutant_that_must_fail_here() -> None:
    import importlib.util
    import sys

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
    mutants = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = mutants  # its dataclasses look their module up
    try:
        spec.loader.exec_module(mutants)
    finally:
        del sys.modules["mutants"]
    at_site = {m.name for m in mutants.MUTANTS if m.site}
    assert at_site == set(GUARDED), at_site ^ set(GUARDED)


def test_the_verdict_says_what_the_run_did_and_keeps_its_worst_error_numeric() -> None:
    """A data-flow failure fails the verdict with its own words; the worst site shown beside the errors is
    still the one furthest past its float64 limit, and a summary of several failures does not call the data
    flow a float64 check."""
    from bnfuse_cli.checks import SiteCheck, Tolerance, Verdict

    flow = SiteCheck("conv", ["bn"], rel_error=1e-9, tolerance=1e-5, flow="the original ran conv 2 times, bn 1 time")
    far = SiteCheck("fc", ["bn2"], rel_error=1e-3, tolerance=1e-5)
    near = SiteCheck("head", ["bn3"], rel_error=1e-6, tolerance=1e-5)
    verdict = Verdict(Tolerance.for_dtype(torch.float32), {}, [flow, near])
    assert not verdict.ok and [s.layer for s in verdict.failed_sites] == ["conv"]
    assert "fold site conv (bn): the original ran conv 2 times, bn 1 time" in verdict.reasons
    assert verdict.worst_site is near and verdict.to_dict()["sites"]["failed"][0]["flow"] == flow.flow
    (line,) = Verdict(Tolerance.for_dtype(torch.float32), {}, [flow, far, near]).summary()[-1:]
    assert line.startswith("2 of 3 fold sites fail their check: conv, fc; the worst, conv: the original ran"), line

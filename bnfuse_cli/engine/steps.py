"""What a pass tells the judge about a site: two chains of steps, the original and the fused, that
:mod:`bnfuse_cli.checks.sites` computes in float64 on a crop of the activation reaching the site.

A step names what the model holds (a layer, a module, a BatchNorm, a tensor) rather than carrying
values, so the judge reads them from the model before and after the rewrite.  Where it can, a pass
describes a site's original side by where it lies in the model's own code (:class:`Forward`) rather
than by its own reading of that code, so that a pass that misreads the model cannot describe the
same mistake to the judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RunLayer", "RunModule", "Norm", "Elementwise", "Sum", "Cat", "Layout", "Mean", "Forward",
           "SiteSpec", "modules_read"]


@dataclass(frozen=True)
class RunLayer:
    """Run the Conv/Linear ``name`` in float64 (block by block, as the fold does)."""

    name: str


@dataclass(frozen=True)
class RunModule:
    """Run a float64 copy of the module ``name`` (a branch: a conv and its BatchNorm, a BatchNorm)."""

    name: str


@dataclass(frozen=True)
class Norm:
    """The eval-mode affine map of the BatchNorm ``name`` on ``axis`` (1: channels first; -1: a
    Linear's features), restricted to its channels ``[start, stop)`` when given."""

    name: str
    axis: int = 1
    channels: "tuple[int, int] | None" = None


@dataclass(frozen=True)
class Elementwise:
    """``y op value`` per channel on ``axis`` (``mul``, ``add``, ``sub``, ``div``): ``value`` a number,
    or the qualified name of a tensor the model holds (one value, or one per channel)."""

    op: str
    value: Any
    axis: int = 1


@dataclass(frozen=True)
class Sum:
    """The sum of several chains, each applied to the same input (an empty chain: the input itself)."""

    chains: "tuple[tuple[Any, ...], ...]"


@dataclass(frozen=True)
class Layout:
    """``y.op(*args)``: a ``flatten``, ``transpose`` or ``permute`` on the way to a layer."""

    op: str
    args: "tuple[int, ...]"


@dataclass(frozen=True)
class Mean:
    """The mean over ``axes`` (global average pooling on the way to a Linear), keeping them with size 1
    when ``keepdim``."""

    axes: "tuple[int, ...]"
    keepdim: bool = False


@dataclass(frozen=True)
class Forward:
    """What ``block``'s own forward computes from node ``start`` to node ``end`` of its torch.fx graph
    (each child one call: :func:`bnfuse_cli.engine.forward.trace_block`), given ``start``'s value: the
    judge replays the model's own operations there (an affine chain, a functional batch norm) rather
    than a pass's reading of them."""

    block: str
    start: str
    end: str


@dataclass(frozen=True)
class Cat:
    """Several chains, each applied to the same input, side by side on ``axis`` (1: channels; -1: a
    Linear's features)."""

    chains: "tuple[tuple[Any, ...], ...]"
    axis: int = 1


@dataclass(frozen=True)
class SiteSpec:
    """One site the judge checks: ``original`` and ``fused`` are chains of the steps above, run in
    float64 on a crop of the first input of ``capture`` (the original chain on the model before the
    rewrite, the fused one after)."""

    #: the pass that made it (``Pass.name``)
    kind: str
    #: the layer the site's result lives in (its name in reports; its dtype picks the tolerance)
    layer: str
    #: the module whose first input is cropped for the check
    capture: str
    #: what the site absorbed, for the report (BatchNorms, branches)
    parts: "tuple[str, ...]"
    original: "tuple[Any, ...]"
    fused: "tuple[Any, ...]"
    #: modules whose own sites this one checks as well (a merge's branches): other passes' sites
    #: inside them are not checked separately
    covers: "tuple[str, ...]" = ()

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.layer}"


def modules_read(spec: SiteSpec) -> "set[str]":
    """Every module a site reads on the model before the rewrite (its fused side may name a module
    the rewrite makes: a copy)."""
    out = {spec.capture}
    todo = list(spec.original)
    while todo:
        step = todo.pop()
        if isinstance(step, (Sum, Cat)):
            todo += [s for chain in step.chains for s in chain]
        elif isinstance(step, Elementwise):
            if isinstance(step.value, str):
                out.add(step.value.rpartition(".")[0])
        elif isinstance(step, Forward):
            out.add(step.block)
        elif isinstance(step, (Layout, Mean)):
            continue
        else:
            out.add(step.name)
    return out

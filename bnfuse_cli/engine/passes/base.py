"""What a pass is: the protocol every row of the table of passes follows, and the site description
it hands the judge.

A pass is one kind of rewrite (fold a BatchNorm into a layer, merge a sum of branches into one
conv, ...).  It finds its sites in one recorded forward pass, plans items (each refusal a
sentence), applies them in place, writes them as rows of the fused file's record and reads them
back, rebuilds them on a freshly built model (``load``), describes each site so that the judge
(:mod:`bnfuse_cli.checks.sites`) can compute it in float64 before and after, and gives its rows to
the report.  Nothing here knows which passes exist: :data:`bnfuse_cli.engine.passes.PASSES` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..forward import held

if TYPE_CHECKING:
    from torch import nn

    from ..plan import Plan
    from ..record import Recorder

__all__ = ["Pass", "SiteSpec", "layer_axis", "held", "touched", "inside", "RunLayer", "RunModule", "Norm", "Stats", "Elementwise",
           "Sum", "Cat", "Layout", "Rows"]


# ----------------------------------------------------------------------------- site descriptions

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
class Stats:
    """The eval-mode batch norm of the tensors the model holds under these qualified names ("" for
    one not given: a weight of 1, a bias of 0), with ``eps``, on ``axis``."""

    mean: str
    var: str
    weight: str
    bias: str
    eps: float = 1e-5
    axis: int = 1


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


def touched(plan: "Plan", own: str) -> "set[str]":
    """The layers and modules the other passes rewrite in this round (their items' ``producer``,
    ``into``, branches and branch scales): a pass that would rewrite one of them again leaves it for
    the next round, so that each site is judged on its own."""
    out: set[str] = set()
    for name, items in plan.items.items():
        if name == own:
            continue
        for it in items:
            out |= {v for v in (getattr(it, "producer", None), getattr(it, "into", None)) if isinstance(v, str)}
            for b in getattr(it, "branches", ()):
                out |= {v for v in (b.module, b.norm) if v} | {v for _, v in b.scale if isinstance(v, str)}
    return out


def inside(name: str, names: "set[str]") -> bool:
    """Whether the module ``name`` is one of ``names`` or inside one of them."""
    return name in names or any(name.startswith(f"{n}.") for n in names)


def layer_axis(model: "nn.Module", name: str) -> int:
    """The channel axis of layer ``name``'s output: -1 for a Linear (its features), else 1 (a conv, or
    a layer the model does not have: the site is then left out by the table)."""
    from ..patterns import producer_rule

    try:
        rule, _ = producer_rule(model.get_submodule(name))
    except AttributeError:
        return 1
    return -1 if rule is not None and rule.kind == "linear" else 1


# ----------------------------------------------------------------------------- report rows

@dataclass
class Rows:
    """A pass's part of the report: a table of what it did (shown with --verbose) and one of what
    it left, each row a where and a reason."""

    title: str
    columns: "tuple[str, ...]"
    done: "list[tuple[str, ...]]"
    left_title: str
    left_what: str
    left: "list[tuple[str, str]]"
    #: one line for the summary table (label, text), or None when the pass has nothing to say
    summary: "tuple[str, str] | None" = None


# ----------------------------------------------------------------------------- the protocol

class Pass(Protocol):
    """One row of the table of passes."""

    #: the pass's name: its items' key in a :class:`~bnfuse_cli.engine.plan.Plan`, its sites' kind
    name: str
    #: the key of its items in JSON reports and in a fused file's record (``folds``, ``merges``)
    key: str
    #: the key of what it leaves, with reasons, in JSON reports (``skipped``, ``merge_skips``)
    left_key: str
    #: a round that applied items of this pass may let the next round find more (a BatchNorm after
    #: a merged conv): rounds go on while such a pass finds something
    again: bool

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: "Plan") -> None:
        """Add this pass's items and refusals to ``plan`` (``plan.of(name)``, ``plan.left_by(name)``)
        from the recorded forward pass; the passes before it in the table have added theirs."""

    def apply(self, model: "nn.Module", items: "list[Any]") -> "nn.Module | None":
        """Carry out ``items`` on ``model`` in place; the new root module when the rewrite had to
        replace the model itself (a sum in its own forward), else None."""

    def rebuild(self, model: "nn.Module", items: "list[Any]") -> "nn.Module | None":
        """Give a freshly built model the structure ``items`` leave (values come from the state_dict
        loaded next); the new root as for :meth:`apply`."""

    def to_row(self, item: Any) -> Any:
        """``item`` as a JSON value of the fused file's record."""

    def from_row(self, row: Any) -> Any:
        """The item a record's row holds (a malformed row raises TypeError, KeyError or ValueError)."""

    def to_json(self, item: Any) -> "dict[str, Any]":
        """``item`` in JSON reports."""

    def left_json(self, left: Any) -> "dict[str, Any]":
        """A refusal in JSON reports."""

    def absorbed(self, item: Any) -> "list[str]":
        """The BatchNorm-like layers ``item`` removes from the model."""

    def sites(self, model: "nn.Module", items: "list[Any]") -> "list[SiteSpec]":
        """The sites of ``items`` on ``model`` (before they are applied) for the judge."""

    def rows(self, plan: "Plan") -> Rows:
        """What the report shows of this pass's part of ``plan``."""

"""The table of passes: every rewrite bnfuse makes is one row.

Each row extends :class:`~.base.Pass`: it finds its sites in the recorded data flow (a reason for
each refusal), plans items, applies them, records them in the fused file, rebuilds them in ``load``,
names its sites for the judge and gives its rows to the report; an opt-in pass declares its
:class:`~.base.Option`.  Everything that handles a plan (:func:`bnfuse_cli.engine.analyse.analyse`,
the rounds of :mod:`bnfuse_cli.workflows.fuse`, the fused file's record, ``load``, the site checks,
the report, the CLI's flags) walks this table when it runs, so a new pass is one module and one row
here.  The order matters: a pass sees what the passes before it planned in the same round (a merge
absorbs the BatchNorms the fold pass left).  No pass imports another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from ..steps import SiteSpec, modules_read
from .base import Option, Pass, Rows
from .chain import CHAIN
from .clone import CLONE
from .fold import FOLD
from .functional import FUNCTIONAL
from .horizontal import HORIZONTAL
from .layout import LAYOUT
from .merge import MERGE
from .scale import SCALE
from .standardise import STANDARDISE
from .unwrap import UNWRAP

if TYPE_CHECKING:
    from torch import nn

__all__ = ["PASSES", "Pass", "Option", "Rows", "by_name", "options", "rebuild", "site_specs"]

#: the passes, in the order they find and apply their items within a round
PASSES: "list[Pass]" = [FOLD, STANDARDISE, CHAIN, LAYOUT, FUNCTIONAL, MERGE, SCALE, HORIZONTAL, CLONE, UNWRAP]


def by_name(name: str) -> Pass:
    """The pass called ``name`` (KeyError if none is)."""
    for p in PASSES:
        if p.name == name:
            return p
    raise KeyError(name)


def options() -> "list[Option]":
    """The options of the passes of the table, in its order: each is a library keyword, a CLI flag and
    a key of ``plan.options``."""
    return [p.option for p in PASSES if p.option is not None]


def rebuild(model: "nn.Module", steps: "Iterable[Any]") -> "nn.Module":
    """Give a freshly built model the structure a fused file records: each round's items, pass by
    pass in the table's order (``steps`` are :class:`bnfuse_cli.files.meta.Step` rows).  Returns the
    model, a new root when a pass rewrote the model's own forward."""
    for step in steps:
        for p in PASSES:
            items = list(step.of(p.name))
            if items:
                model = p.rebuild(model, items) or model
    return model


def site_specs(model: "nn.Module", items: "dict[str, Any]") -> "tuple[list[SiteSpec], int]":
    """The judge's sites for ``items`` (pass name -> items) described on ``model``, pass by pass;
    and how many sites name a module ``model`` does not have (left out: an earlier conversion's)."""
    names = {n for n, _ in model.named_modules()}
    specs: list[SiteSpec] = []
    missing = 0
    for p in PASSES:
        for spec in p.sites(model, list(items.get(p.name, ()))):
            if all(n in names for n in modules_read(spec)):
                specs.append(spec)
            else:
                missing += 1
    return specs, missing

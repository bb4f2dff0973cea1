"""The layout pass: a BatchNorm whose output reaches a Linear only through ``flatten``, ``transpose``,
``permute`` and global average pooling (FastViT's attention: ``bn(x).flatten(2).transpose(-2, -1)``
before ``qkv``; ``fc(flatten(avgpool(bn(x))))``) folds forward into that Linear when its channel axis
ends up as the Linear's feature axis, exactly (:mod:`bnfuse_cli.engine.reach`); the layout ops and
the pooling stay, the BatchNorm goes.  Found on the recorded data flow, for the BatchNorms the fold
pass left; where another reader or a non-linear op stands on the way after a pooling or layout op,
the BatchNorm's reason names it.

Guards (each tripped by a test in tests/test_guards.py and tests/test_layout.py; each broken by a mutant
in scripts/mutants.py):
  - a BatchNorm the fold pass refused for itself (hooks, parameters read elsewhere, training mode)
  - its output, or the result of a layout or pooling step, also read elsewhere, returned or kept
  - a flatten that merges the channels with other axes; a mean over the channels
  - a Linear whose features are not the BatchNorm's channels (a Linear over the positions)
  - a Linear called more than once
  - a Linear the fold pass would refuse (:func:`bnfuse_cli.engine.guards.producer_problem`: tied weights,
    hooks, ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..guards import norm_problem, producer_problem
from ..patterns import norm_rule, producer_rule
from ..plan import Plan, Skip
from ..reach import OPS, follow, site_steps
from ..steps import RunLayer, RunModule, SiteSpec
from .base import AffineFold, inside, norm_affine, touched

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..record import Recorder

__all__ = ["LAYOUT", "LayoutPass", "LayoutFold"]


@dataclass(frozen=True)
class LayoutFold:
    """``norm`` folded forward into the Linear ``producer`` through ``steps`` ((op, int args), in order:
    layout ops, and means over axes, :data:`bnfuse_cli.engine.reach.OPS`)."""

    norm: str
    producer: str
    steps: "tuple[tuple[str, tuple[int, ...]], ...]"
    direction = "forward"

    def __post_init__(self) -> None:
        if any(op not in OPS for op, _ in self.steps):
            raise ValueError(f"unknown layout step in {self.steps!r}")


class LayoutPass(AffineFold, name="layout", key="layout_folds", left_key="layout_left", item=LayoutFold):
    verb = "folded through layout ops"
    title, columns = "Folded forward through layout ops", ("BatchNorm", "into", "through")

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        busy = touched(plan, self.name)
        keep = []
        for skip in plan.skipped:
            norm = model.get_submodule(skip.norm)
            calls = rec.calls.get(id(norm), [])
            rule, _ = norm_rule(norm)
            if rule is None or rule.replacement != "identity" or len(calls) != 1 or calls[0].output is None \
                    or calls[0].training or norm_problem(norm, rec) or not rec.moved or id(calls[0].output) in escapes:
                keep.append(skip)
                continue
            found = follow(rec, calls[0].output, 1, escapes)
            reader, why = found.reader, found.why
            if reader is not None and found.steps:
                why = _linear_problem(reader, rec)
            if reader is None or not found.steps or why is not None:
                keep.append(_forward_reason(skip, why) if why else skip)
                continue
            if inside(reader.name, busy):
                plan.more = True
                keep.append(skip)
                continue
            plan.of(self.name).append(LayoutFold(skip.norm, reader.name, tuple(found.steps)))
        plan.skipped = keep

    def affine(self, model: "nn.Module", it: LayoutFold) -> "tuple[torch.Tensor, torch.Tensor]":
        return norm_affine(model, it.norm)

    def remove(self, model: "nn.Module", items: "list[LayoutFold]", values: bool) -> None:
        from torch import nn

        for it in items:
            model.set_submodule(it.norm, nn.Identity())

    def sites(self, model: "nn.Module", items: "list[LayoutFold]") -> "list[SiteSpec]":
        """The BatchNorm's own forward, the ops on the way and the Linear, against those ops and the
        fused Linear."""
        out = []
        for it in items:
            moves = site_steps(it.steps)
            out.append(SiteSpec(self.name, it.producer, it.norm, (it.norm,),
                                (RunModule(it.norm), *moves, RunLayer(it.producer)), (*moves, RunLayer(it.producer))))
        return out

    def row(self, it: LayoutFold) -> "tuple[str, ...]":
        return it.norm, it.producer, " -> ".join(f"{op}{args}" for op, args in it.steps)


def _linear_problem(reader: Any, rec: "Recorder") -> "str | None":
    """Why the Linear a BatchNorm's output reaches cannot take its fold (None: it can)."""
    n = len(rec.calls.get(id(reader.module), []))
    if n != 1:
        return f"{reader.name} is called {n} times"
    rule, why = producer_rule(reader.module)
    if rule is None:
        return why or f"{reader.name} is not a layer bnfuse folds into"
    return producer_problem(reader.module, rec)


def _forward_reason(skip: Skip, why: str) -> Skip:
    """The fold pass's refusal with what stops the fold into the layer after it replaced by ``why``."""
    back, forward = skip.parts
    return Skip.of(skip.norm, back, why) if forward is not None else \
        Skip(skip.norm, f"{skip.reason}; nor can it fold into a Linear after it: {why}")


LAYOUT = LayoutPass()

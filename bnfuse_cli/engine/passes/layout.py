"""The layout pass: a BatchNorm whose output reaches a Linear only through ``flatten``, ``transpose``
and ``permute`` (FastViT's attention: ``bn(x).flatten(2).transpose(-2, -1)`` before ``qkv``) folds
forward into that Linear when its channel axis ends up as the Linear's feature axis, exactly; the
layout ops stay, the BatchNorm goes.  Found on the recorded data flow, for the BatchNorms the fold
pass left.

Guards (each tripped by a test in tests/test_guards.py; each broken by a mutant in scripts/mutants.py):
  - a BatchNorm the fold pass refused for itself (hooks, parameters read elsewhere, training mode)
  - its output, or the result of a layout step, also read elsewhere
  - its output, or the result of a layout step, returned or kept
  - a flatten that merges the channels with other axes
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
from ..record import where
from ..steps import Layout, Norm, RunLayer, SiteSpec
from .base import AffineFold, inside, norm_affine, touched

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..record import Recorder

__all__ = ["LAYOUT", "LayoutPass", "LayoutFold"]


@dataclass(frozen=True)
class LayoutFold:
    """``norm`` folded forward into the Linear ``producer`` through ``steps`` ((op, int args), in order)."""

    norm: str
    producer: str
    steps: "tuple[tuple[str, tuple[int, ...]], ...]"
    direction = "forward"

    def __post_init__(self) -> None:
        if any(op not in ("flatten", "transpose", "permute") for op, _ in self.steps):
            raise ValueError(f"unknown layout step in {self.steps!r}")


def _move(axis: int, rank: int, op: str, args: "tuple[int, ...]") -> "tuple[int | None, int]":
    """Where ``axis`` of a rank-``rank`` tensor goes under one layout op, and the new rank (None: the
    op merges the axis with others)."""
    if op == "transpose" and len(args) == 2:
        a, b = (d % rank for d in args)
        return (b if axis == a else a if axis == b else axis), rank
    if op == "permute" and sorted(d % rank for d in args) == list(range(rank)):
        return [d % rank for d in args].index(axis), rank
    if op == "flatten" and len(args) <= 2:
        start, end = (args + (0, -1)[len(args):])[:2] if args else (0, -1)
        start, end = start % rank, end % rank
        if start <= axis <= end and start != end:
            return None, rank - (end - start)
        return (axis - (end - start) if axis > end else axis), rank - (end - start)
    return None, rank


def _follow(rec: "Recorder", y: Any, escapes: "dict[int, str]"
            ) -> "tuple[Any, list[tuple[str, tuple[int, ...]]], str | None]":
    """From a BatchNorm's output through layout ops, each result read once and by nothing else, to
    the one Linear call that reads the last of them with the BatchNorm's channels as its features:
    (that call, the ops, None); or (None, [], why) where the path is there but something else takes
    its values too, or (None, [], None) where there is no such path (the fold pass's reason stays)."""
    steps: list[tuple[str, tuple[int, ...]]] = []
    axis, rank, x = 1, len(y.shape), y
    while True:
        path = rec.moved[id(x)][1] if id(x) in rec.moved else "linear" if steps else None
        if path is None:
            return None, [], None
        what = f"the result of {steps[-1][0]}" if steps else "its output"
        reads = rec.reads.get(id(x), [])
        if len(reads) > 1 and any(op == path for _, op in reads):
            r, op = next(((r, op) for r, op in reads if op != path), reads[1])
            return None, [], f"{what} is also read by {op} in {where(r)}"
        if len(reads) != 1:
            return None, [], None
        if id(x) in escapes:
            return None, [], f"{what} is also {escapes[id(x)]}"
        reader, op = reads[0]
        if op == "linear" and reader is not None and reader.input is x:
            return (reader, steps, None) if axis == rank - 1 else (None, [], None)
        nxt = rec.moved.get(id(x))
        if nxt is None or nxt[1] != op:
            return None, [], None
        x, op, args = nxt
        axis, rank = _move(axis, rank, op, args)
        if axis is None:
            return None, [], None
        steps.append((op, args))


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
                    or calls[0].training or norm_problem(norm, rec) or not rec.moved:
                keep.append(skip)  # the fold pass's reason names what stops it
                continue
            reader, steps, why = _follow(rec, calls[0].output, escapes)
            if reader is not None and steps:
                n = len(rec.calls.get(id(reader.module), []))
                why = (f"{reader.name} is called {n} times" if n != 1 else
                       producer_rule(reader.module)[1] or producer_problem(reader.module, rec))
            if why is not None:
                keep.append(Skip(skip.norm, f"{skip.reason} (nor through the layout ops after it: {why})"))
                continue
            if reader is None or not steps:
                keep.append(skip)
                continue
            if inside(reader.name, busy):
                plan.more = True
                keep.append(skip)
                continue
            plan.of(self.name).append(LayoutFold(skip.norm, reader.name, tuple(steps)))
        plan.skipped = keep

    def affine(self, model: "nn.Module", it: LayoutFold) -> "tuple[torch.Tensor, torch.Tensor]":
        return norm_affine(model, it.norm)

    def remove(self, model: "nn.Module", items: "list[LayoutFold]", values: bool) -> None:
        from torch import nn

        for it in items:
            model.set_submodule(it.norm, nn.Identity())

    def sites(self, model: "nn.Module", items: "list[LayoutFold]") -> "list[SiteSpec]":
        out = []
        for it in items:
            moves = tuple(Layout(op, args) for op, args in it.steps)
            out.append(SiteSpec(self.name, it.producer, it.norm, (it.norm,), (Norm(it.norm), *moves, RunLayer(it.producer)),
                                (*moves, RunLayer(it.producer))))
        return out

    def row(self, it: LayoutFold) -> "tuple[str, ...]":
        return it.norm, it.producer, " -> ".join(f"{op}{args}" for op, args in it.steps)


LAYOUT = LayoutPass()

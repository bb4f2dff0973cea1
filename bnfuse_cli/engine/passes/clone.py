"""The clone pass (``--clone-shared``): a BatchNorm after a Conv/Linear whose output something else
reads too (``bn(conv(x))`` beside ``conv(x)`` used elsewhere) cannot fold into that layer; it folds
into a copy of it made for the BatchNorm's path, as torch.jit.freeze does per call site.  That
trades the copy's parameters for one operation less, so it is the user's choice: off by default,
and then the BatchNorm's reason says what it would fold and how many parameters it would add.

Guards (each tripped by a test in tests/test_guards.py; each broken by a mutant in scripts/mutants.py):
  - a BatchNorm the fold pass refused for itself (hooks, parameters read elsewhere, training mode)
  - a layer output changed in place before the BatchNorm reads it
  - a layer in another block than its BatchNorm
  - a BatchNorm1d on a Linear's output of more than 2 dimensions
  - a layer the fold pass would refuse (:func:`bnfuse_cli.engine.guards.producer_problem`: a copy would
    share its hooks and tied weights)
  - a block with hooks (its forward is rewritten)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import BnfuseError
from ..forward import child_name, rewrite_forward
from ..guards import hooks, norm_problem, producer_problem
from ..patterns import norm_rule, producer_rule
from ..plan import Plan, Skip
from ..steps import Norm, RunLayer, SiteSpec
from .base import Option, Pass, by_block, layer_axis, norm_affine

if TYPE_CHECKING:
    from torch import nn

    from ..record import Recorder

__all__ = ["CLONE", "CloneFold"]


@dataclass(frozen=True)
class CloneFold:
    """``norm`` folded into ``copy``, a copy of ``producer`` made for it; all children of ``block``."""

    block: str
    norm: str
    producer: str
    copy: str


def _candidate(model: "nn.Module", name: str, rec: "Recorder") -> "tuple[CloneFold | None, int | str]":
    """The clone fold for BatchNorm ``name`` (None if its layer is not a sibling it alone should copy),
    and the parameters the copy adds; or (None, why) for a candidate that must not be copied."""
    norm = model.get_submodule(name)
    rule, _ = norm_rule(norm)
    calls = rec.calls.get(id(norm), [])
    if rule is None or rule.replacement != "identity" or len(calls) != 1 or calls[0].training \
            or norm_problem(norm, rec):
        return None, 0
    pcall = rec.produced.get(id(calls[0].input)) if calls[0].input is not None else None
    if pcall is None or len(rec.calls.get(id(pcall.module), [])) != 1:
        return None, 0
    prod, _ = producer_rule(pcall.module)
    block, _, child = name.rpartition(".")
    pblock, _, pchild = pcall.name.rpartition(".")
    reads = rec.reads.get(id(calls[0].input), [])
    # the BatchNorm must read the layer's output first: a read before it may have changed it in place
    if prod is None or pblock != block or len(reads) < 2 or reads[0][0] is None or reads[0][0].module is not norm:
        return None, 0
    if prod.kind == "linear" and len(calls[0].input.shape) != 2:
        return None, 0
    why = producer_problem(pcall.module, rec) or hooks(model.get_submodule(block) if block else model, block, rec)
    if why:  # a copy would share its hooks or tied weights; the block's forward is rewritten
        return None, why
    added = sum(p.numel() for p in pcall.module.parameters()) + (
        0 if getattr(pcall.module, "bias", None) is not None else int(pcall.module.weight.shape[0]))
    return CloneFold(block, name, pcall.name, child_name(block, f"{pchild}_for_{child}")), added


class ClonePass(Pass, name="clone", key="clone_folds", left_key="clone_left", item=CloneFold):
    verb = "folded into copies of shared layers"
    option = Option("clone_shared", "Fold a BatchNorm into a copy of a layer whose output is also read elsewhere "
                                    "(more parameters, one operation less; off: the report says what it would fold).")
    rewrites = ("producer", "copy")
    title, columns = "Folded into copies of shared layers (--clone-shared)", ("BatchNorm", "copy of", "as")

    def on(self, plan: Plan) -> bool:
        return True  # off, it still finds each candidate, to say in its BatchNorm's reason what it would fold

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        on = super().on(plan)
        left = []
        names = {n for n, _ in model.named_modules()}
        for s in plan.skipped:
            item, added = _candidate(model, s.norm, rec)
            if isinstance(added, str):
                left.append(Skip(s.norm, f"{s.reason}; nor can it fold into a copy of the layer before it: {added}"))
            elif item is None or item.copy in names:
                left.append(s)
            elif on:
                plan.of(self.name).append(item)
            else:
                left.append(Skip(s.norm, f"{s.reason}; --clone-shared would fold it into a copy of {item.producer} "
                                         f"for its path (+{added:,} parameters)"))
        plan.skipped = left

    def apply(self, model: "nn.Module", items: "list[CloneFold]") -> "nn.Module":
        return _rewrite(model, items, values=True)

    def rebuild(self, model: "nn.Module", items: "list[CloneFold]") -> "nn.Module":
        return _rewrite(model, items, values=False)

    def sites(self, model: "nn.Module", items: "list[CloneFold]") -> "list[SiteSpec]":
        return [SiteSpec(self.name, it.copy, it.producer, (it.norm,),
                         (RunLayer(it.producer), Norm(it.norm, layer_axis(model, it.producer))), (RunLayer(it.copy),))
                for it in items]

    def row(self, it: CloneFold) -> "tuple[str, ...]":
        return it.norm, it.producer, it.copy

    def summary(self, plan: Plan) -> "tuple[str, str] | None":
        n = len(plan.of(self.name))
        return ("copies of shared layers", f"{n} made, each with a BatchNorm folded") if n else None


def _rewrite(model: "nn.Module", items: "list[CloneFold]", *, values: bool) -> "nn.Module":
    """Each copy added to its block, the BatchNorm's call replaced by the copy's call on the layer's
    input; the model, a new root for the model's own forward."""
    from ..layers import fold_affine, give_bias

    for name, clones in by_block(items):
        def edit(block: "nn.Module", graph: Any, name: str = name, clones: "list[CloneFold]" = clones) -> None:
            def rel(q: str) -> str:
                return q[len(name) + 1:] if name else q

            for it in clones:
                twin = copy.deepcopy(block.get_submodule(rel(it.producer)))
                if values:
                    s, t = norm_affine(block, rel(it.norm))
                    fold_affine(twin, s, t, it.norm)
                else:
                    give_bias(twin)
                block.add_module(rel(it.copy), twin)
                bn = next((n for n in graph.nodes if n.op == "call_module" and str(n.target) == rel(it.norm)), None)
                src = bn.args[0] if bn is not None and bn.args else None
                if getattr(src, "op", None) != "call_module" or str(src.target) != rel(it.producer):
                    raise BnfuseError(f"cannot find {it.norm} reading {it.producer} in the forward of "
                                      f"{name or 'the model'}")
                with graph.inserting_before(bn):
                    new = graph.call_module(rel(it.copy), src.args, src.kwargs)
                bn.replace_all_uses_with(new)
                graph.erase_node(bn)

        model = rewrite_forward(model, name, edit)
    return model


CLONE = ClonePass()

"""The clone pass (``--clone-shared``): a BatchNorm after a Conv/Linear whose output something else
reads too (``bn(conv(x))`` beside ``conv(x)`` used elsewhere) cannot fold into that layer; it folds
into a copy of it made for the BatchNorm's path, as torch.jit.freeze does per call site.  That
trades the copy's parameters for one operation less, so it is the user's choice: off by default,
and then the BatchNorm's reason says what it would fold and how many parameters it would add."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import BnfuseError
from ..fold import affine_from_stats
from ..forward import child_name, rewrite_forward
from ..patterns import norm_rule, producer_rule
from ..plan import Plan, Skip
from ..rewrite import fold_affine, give_bias
from .base import layer_axis, Norm, Rows, RunLayer, SiteSpec

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


def _candidate(model: "nn.Module", name: str, rec: "Recorder") -> "tuple[CloneFold | None, int]":
    """The clone fold for BatchNorm ``name`` (None if its layer is not a sibling it alone should copy),
    and the parameters the copy adds."""
    norm = model.get_submodule(name)
    rule, _ = norm_rule(norm)
    calls = rec.calls.get(id(norm), [])
    if rule is None or rule.replacement != "identity" or len(calls) != 1 or calls[0].training:
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
    added = sum(p.numel() for p in pcall.module.parameters()) + (
        0 if getattr(pcall.module, "bias", None) is not None else int(pcall.module.weight.shape[0]))
    return CloneFold(block, name, pcall.name, child_name(block, f"{pchild}_for_{child}")), added


class ClonePass:
    name = "clone"
    key = "clone_folds"
    left_key = "clone_left"
    again = False
    verb = "folded into copies of shared layers"

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        on = bool(plan.options.get("clone_shared"))
        left = []
        names = {n for n, _ in model.named_modules()}
        for s in plan.skipped:
            item, added = _candidate(model, s.norm, rec)
            if item is None or item.copy in names:
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

    def to_row(self, item: CloneFold) -> "dict[str, Any]":
        return {"block": item.block, "norm": item.norm, "producer": item.producer, "copy": item.copy}

    def from_row(self, row: Any) -> CloneFold:
        return CloneFold(str(row["block"]), str(row["norm"]), str(row["producer"]), str(row["copy"]))

    def to_json(self, item: CloneFold) -> "dict[str, Any]":
        return self.to_row(item)

    def left_json(self, left: Any) -> "dict[str, Any]":
        return {}

    def absorbed(self, item: CloneFold) -> "list[str]":
        return [item.norm]

    def sites(self, model: "nn.Module", items: "list[CloneFold]") -> "list[SiteSpec]":
        return [SiteSpec(self.name, it.copy, it.producer, (it.norm,),
                         (RunLayer(it.producer), Norm(it.norm, layer_axis(model, it.producer))), (RunLayer(it.copy),))
                for it in items]

    def rows(self, plan: Plan) -> Rows:
        items = plan.of(self.name)
        summary = ("copies of shared layers", f"{len(items)} made, each with a BatchNorm folded") if items else None
        return Rows("Folded into copies of shared layers (--clone-shared)", ("BatchNorm", "copy of", "as"),
                    [(it.norm, it.producer, it.copy) for it in items], "", "", [], summary)


def _rewrite(model: "nn.Module", items: "list[CloneFold]", *, values: bool) -> "nn.Module":
    """Each copy added to its block, the BatchNorm's call replaced by the copy's call on the layer's
    input; the model, a new root for the model's own forward."""
    by_block: dict[str, list[CloneFold]] = {}
    for it in items:
        by_block.setdefault(it.block, []).append(it)
    for name, clones in sorted(by_block.items(), key=lambda kv: (kv[0] == "", -kv[0].count("."))):
        def edit(block: "nn.Module", graph: Any, name: str = name, clones: "list[CloneFold]" = clones) -> None:
            def rel(q: str) -> str:
                return q[len(name) + 1:] if name else q

            for it in clones:
                twin = copy.deepcopy(block.get_submodule(rel(it.producer)))
                if values:
                    norm = block.get_submodule(rel(it.norm))
                    s, t = affine_from_stats(*norm_rule(norm)[0].stats(norm), name=it.norm)
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

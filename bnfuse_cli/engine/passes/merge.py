"""The merge pass: a sum of parallel branches that read one tensor (convs with their BatchNorms
folded, BatchNorms, the tensor itself) becomes one conv, with the reason for every sum left."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..merge import find_merges
from ..merge_rewrite import apply_merge_structure, apply_merges, main_conv_name
from ..plan import Merge, MergeSkip, Plan
from .base import Elementwise, Rows, RunLayer, RunModule, SiteSpec, Sum

if TYPE_CHECKING:
    from torch import nn

    from ..record import Recorder

__all__ = ["MERGE", "MergePass"]


class MergePass:
    name = "merge"
    key = "merges"
    left_key = "merge_skips"
    verb = "merged"
    again = True  # a BatchNorm after the merged sum folds in the next round (RepViT)

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        if plan.options.get("merge", True):  # fuse(..., merge=False) folds only
            find_merges(model, rec, plan)

    def apply(self, model: "nn.Module", items: "list[Merge]") -> "nn.Module":
        return apply_merges(model, items)

    def rebuild(self, model: "nn.Module", items: "list[Merge]") -> "nn.Module":
        return apply_merge_structure(model, items)

    def to_row(self, item: Merge) -> "dict[str, Any]":
        return item.to_dict()

    def from_row(self, row: Any) -> Merge:
        return Merge.from_dict(row)

    def to_json(self, item: Merge) -> "dict[str, Any]":
        return item.to_dict()

    def left_json(self, left: MergeSkip) -> "dict[str, Any]":
        return asdict(left)

    def absorbed(self, item: Merge) -> "list[str]":
        return item.norms

    def sites(self, model: "nn.Module", items: "list[Merge]") -> "list[SiteSpec]":
        """One site per merge: the sum of its original branches against the one conv, on the input
        of the main branch's conv (the shared one)."""
        specs = []
        for m in items:
            try:
                capture = main_conv_name(model, m.into)
            except AttributeError:  # a block this model lacks: the table leaves the site out
                capture = m.into
            # a branch's module, then its BatchNorm when that is a separate child (a flat branch), then
            # what the sum scales it by
            chains = tuple((((RunModule(b.module),) + ((RunModule(b.norm),) if _flat(b) else ()))
                            if b.module else ()) + tuple(_scale_step(op, v) for op, v in b.scale)
                           for b in m.branches)
            specs.append(SiteSpec(self.name, m.place, capture,
                                  tuple(b.module or "input" for b in m.branches), (Sum(chains),), (RunLayer(m.place),),
                                  covers=tuple(n for b in m.branches for n in (b.module, b.norm) if n)))
        return specs

    def rows(self, plan: Plan) -> Rows:
        items, left = plan.of(self.name), plan.left_by(self.name)
        branches = sum(len(m.branches) for m in items)
        summary = ("branches merged", f"{len(items)} sums of {branches} branches -> one conv each") if items else None
        return Rows("Merged (parallel branches -> one conv)", ("one conv at", "branches summed"),
                    [(m.place, ", ".join(_branch_text(b) for b in m.branches)) for m in items],
                    "Sums of branches left as they are", "block", [(s.block or "(the model)", s.reason) for s in left],
                    summary)


def _flat(b: Any) -> bool:
    """A branch whose BatchNorm is a separate child after its conv (not inside its module)."""
    return bool(b.norm) and b.norm != b.module and not b.norm.startswith(f"{b.module}.")


def _scale_step(op: str, value: Any) -> Any:
    return RunModule(value) if op == "module" else Elementwise(op, value)


def _branch_text(b: Any) -> str:
    text = b.module or "the input itself"
    for op, v in b.scale:
        text += f" * {v}" if op == "module" else f" {'/' if op == 'div' else '*'} {v if isinstance(v, str) else f'{v:g}'}"
    return text


MERGE = MergePass()

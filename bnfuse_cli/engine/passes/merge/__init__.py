"""The merge pass: a sum of parallel branches that read one tensor (convs with their BatchNorms
folded, BatchNorms, the tensor itself, each times a number, a held tensor or a scale module)
becomes one conv or Linear, with the reason for every sum left.

Its finder (:mod:`.find`) reads each block's forward as linear trees and each leaf as a branch
(:mod:`.branches`, which also holds its item types); the kernels are summed in float64 by
:mod:`.kernels` (tensors only) and placed by :mod:`.rewrite`.

Guards (each tripped by a test in tests/test_merge.py, tests/test_weighted_sums.py and
tests/test_guards.py; each broken by a mutant in scripts/mutants.py):
  - the branches' input changed in place in the block; branches that do not all read one tensor
  - a branch output also read elsewhere, or read first by something else than the sum
  - a branch called more than once; a branch module doing more than its conv and BatchNorm
  - convs of other stride, dilation, groups or channels; padding other than explicit zeros; kernel
    centres that do not align
  - Linear branches on more than 2 dimensions (a BatchNorm branch normalises axis 1)
  - a factor that is not one value, or one per channel on axis 1
  - a branch conv with tied weights, or one the fold pass would refuse
    (:func:`bnfuse_cli.engine.guards.producer_problem`: hooks, weights read elsewhere)
  - a BatchNorm branch with hooks or read elsewhere, or in training mode
  - a branch module with hooks (the merged conv replaces it)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...plan import Plan
from ...steps import Elementwise, RunLayer, RunModule, SiteSpec, Sum
from ..base import Option, Pass
from .branches import Branch, Merge, MergeSkip
from .find import find_merges
from .rewrite import apply_merge_structure, apply_merges, main_conv_name

if TYPE_CHECKING:
    from torch import nn

    from ...record import Recorder

__all__ = ["MERGE", "MergePass", "Branch", "Merge", "MergeSkip"]


class MergePass(Pass, name="merge", key="merges", left_key="merge_skips", item=Merge):
    verb = "merged"
    again = True  # a BatchNorm after the merged sum folds in the next round (RepViT)
    option = Option("merge", "Merge each sum of parallel branches that read one tensor (RepVGG, MobileOne, "
                             "RepViT...) into one conv or Linear; --no-merge folds BatchNorms only.", default=True)
    title, columns = "Merged (parallel branches -> one conv)", ("one conv at", "branches summed")
    left_title, left_what = "Sums of branches left as they are", "block"

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        find_merges(model, rec, plan)

    def apply(self, model: "nn.Module", items: "list[Merge]") -> "nn.Module":
        return apply_merges(model, items)

    def rebuild(self, model: "nn.Module", items: "list[Merge]") -> "nn.Module":
        return apply_merge_structure(model, items)

    def absorbed(self, item: Merge) -> "list[str]":
        return item.norms

    def touches(self, item: Merge) -> "set[str]":
        out = {item.into}
        for b in item.branches:
            out |= {v for v in (b.module, b.norm) if v} | {v for _, v in b.scale if isinstance(v, str)}
        return out

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

    def row(self, m: Merge) -> "tuple[str, ...]":
        return m.place, ", ".join(_branch_text(b) for b in m.branches)

    def left_row(self, left: MergeSkip) -> "tuple[str, str]":
        return left.block or "(the model)", left.reason

    def summary(self, plan: Plan) -> "tuple[str, str] | None":
        items = plan.of(self.name)
        branches = sum(len(m.branches) for m in items)
        return ("branches merged", f"{len(items)} sums of {branches} branches -> one conv each") if items else None


def _flat(b: Branch) -> bool:
    """A branch whose BatchNorm is a separate child after its conv (not inside its module)."""
    return bool(b.norm) and b.norm != b.module and not b.norm.startswith(f"{b.module}.")


def _scale_step(op: str, value: Any) -> Any:
    return RunModule(value) if op == "module" else Elementwise(op, value)


def _branch_text(b: Branch) -> str:
    text = b.module or "the input itself"
    for op, v in b.scale:
        text += f" * {v}" if op == "module" else f" {'/' if op == 'div' else '*'} {v if isinstance(v, str) else f'{v:g}'}"
    return text


MERGE = MergePass()

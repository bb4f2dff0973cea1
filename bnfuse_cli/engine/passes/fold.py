"""The fold pass: each BatchNorm folded into the Conv/Linear before it (backward) or after it
(forward), exactly, with the reason for every one left."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..fold_find import find_folds
from ..plan import Fold, Plan, Skip
from ..rewrite import apply_plan, apply_structure
from .base import layer_axis, Norm, Rows, RunLayer, SiteSpec

if TYPE_CHECKING:
    from torch import nn

    from ..record import Recorder

__all__ = ["FOLD", "FoldPass"]

#: how the report says each direction
DIRECTION_TEXT = {"backward": "backward, into the layer before it", "forward": "forward, into the layer after it"}


class FoldPass:
    name = "fold"
    key = "folds"
    left_key = "skipped"
    again = False
    verb = "folded"

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        find_folds(model, rec, escapes, plan)

    def apply(self, model: "nn.Module", items: "list[Fold]") -> None:
        apply_plan(model, items)

    def rebuild(self, model: "nn.Module", items: "list[Fold]") -> None:
        apply_structure(model, items)

    def to_row(self, item: Fold) -> "list[str]":
        return item.to_list()

    def from_row(self, row: Any) -> Fold:
        return Fold.from_list([str(x) for x in row])

    def to_json(self, item: Fold) -> "dict[str, Any]":
        return asdict(item)

    def left_json(self, left: Skip) -> "dict[str, Any]":
        return asdict(left)

    def absorbed(self, item: Fold) -> "list[str]":
        return [item.norm]

    def sites(self, model: "nn.Module", items: "list[Fold]") -> "list[SiteSpec]":
        """One site per layer: the layer with the BatchNorm folded forward into it (before) and the
        one folded backward into it (after), on the input of the first of them."""
        by_layer: dict[str, dict[str, Fold]] = {}
        for f in items:
            by_layer.setdefault(f.producer, {})[f.direction] = f
        specs = []
        for layer, folds in by_layer.items():
            fwd, bwd = folds.get("forward"), folds.get("backward")
            axis = layer_axis(model, layer)
            original = ((Norm(fwd.norm, 1, fwd.channels),) if fwd else ()) + (RunLayer(layer),) + \
                ((Norm(bwd.norm, axis, bwd.channels),) if bwd else ())
            specs.append(SiteSpec(self.name, layer, fwd.norm if fwd else layer,
                                  tuple(f.norm for f in (fwd, bwd) if f is not None), original, (RunLayer(layer),)))
        return specs

    def rows(self, plan: Plan) -> Rows:
        """The summary line counts every batch norm found (modules and functional calls) and says
        which pass removed how many; what is left is what no pass removed."""
        from . import PASSES

        items, left = plan.of(self.name), plan.left_by(self.name)
        parts = [f"{len(plan.norms)} found"]
        for p in PASSES:
            n = len({a for i in plan.of(p.name) for a in p.absorbed(i)})
            if n or p is self:
                parts.append(f"{n} {getattr(p, 'verb', 'removed')}")
        parts.append(f"{len(plan.norms) - len(plan.folded_norms)} left")
        return Rows("Folded", ("BatchNorm", "into", "direction", "left in its place"),
                    [(f.norm, f.producer, DIRECTION_TEXT.get(f.direction, f.direction), f.replacement) for f in items],
                    "Left in place", "BatchNorm", [(s.norm, s.reason) for s in left], ("BatchNorm layers", ", ".join(parts)))


FOLD = FoldPass()

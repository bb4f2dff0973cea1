"""The fold pass: each BatchNorm folded into the Conv/Linear before it (backward) or after it
(forward), exactly, with the reason for every one left.

Its finder (:mod:`.find`, with the guards of :mod:`bnfuse_cli.engine.guards`) walks the recorded data flow; its
rewrite (:mod:`.rewrite`) folds every layer's statistics in float64, checked before anything is
written.

Guards (each tripped by a test in tests/test_graph_cases.py and tests/test_guards.py; each broken by a
mutant in scripts/mutants.py):
  - a BatchNorm never called on the example input
  - a BatchNorm the model switches to training mode (batch statistics)
  - a BatchNorm whose parameters or statistics are read outside its own call
  - a BatchNorm with forward pre-hooks, or with forward hooks
  - backward: a reshape of the layer's output that does not keep its channel axis as axis 1
  - backward: a cat of layer outputs along another axis than the channels
  - backward: the reshape or cat also read elsewhere, or returned or kept
  - backward: the layer's output also read elsewhere (a residual), or returned or kept
  - backward: a layer giving other channels of one BatchNorm on different calls
  - backward: a layer called more often than its outputs feed this BatchNorm
  - backward: a BatchNorm1d on axis 1 of a Linear's output of more than 2 dimensions
  - forward: a norm with an activation after it (timm's BatchNormAct2d)
  - forward: a BatchNorm whose calls feed different layers
  - forward: a BatchNorm output also read elsewhere, or returned or kept
  - forward: a layer after it that also reads other inputs
  - forward: a ConvTranspose after it, a conv after it that pads with zeros, a Linear after it on more
    than 2 dimensions (its features are the last axis)
  - either way, the layer (:func:`bnfuse_cli.engine.guards.producer_problem`): re-parametrised
    (parametrize, weight_norm), a subclass with its own forward, forward pre-hooks or hooks, weights
    tied to another layer's or sharing its memory, weights read outside its own call
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...plan import Plan, Skip
from ...steps import Norm, RunLayer, SiteSpec
from ..base import Pass, layer_axis
from .find import Fold, find_folds
from .rewrite import apply_plan, apply_structure

if TYPE_CHECKING:
    from torch import nn

    from ...record import Recorder

__all__ = ["FOLD", "FoldPass", "Fold", "Skip", "apply_plan", "apply_structure"]

#: how the report says each direction
DIRECTION_TEXT = {"backward": "backward, into the layer before it", "forward": "forward, into the layer after it"}


class FoldPass(Pass, name="fold", key="folds", left_key="skipped", item=Fold):
    verb = "folded"
    title, columns = "Folded", ("BatchNorm", "into", "direction", "left in its place")
    left_title, left_what = "Left in place", "BatchNorm"

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

    def row(self, f: Fold) -> "tuple[str, ...]":
        return f.norm, f.producer, DIRECTION_TEXT.get(f.direction, f.direction), f.replacement

    def summary(self, plan: Plan) -> "tuple[str, str]":
        """Every batch norm found (modules and functional calls), how many each pass of the table
        removed, and how many are left: what no pass removed."""
        parts = [f"{len(plan.norms)} found"]
        for p in plan.passes:
            n = len({a for i in plan.of(p.name) for a in p.absorbed(i)})
            if n or p is self:
                parts.append(f"{n} {p.verb}")
        parts.append(f"{len(plan.norms) - len(plan.folded_norms)} left")
        return "BatchNorm layers", ", ".join(parts)


FOLD = FoldPass()

"""The scale pass: a per-channel scale next to a Conv/Linear (a layer scale, ResMLP's ``Affine``,
torchvision ConvNeXt's ``layer_scale``) folds into it, exactly, and leaves the forward; every scale
left says why (:mod:`bnfuse_cli.engine.scale_find` finds them)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ...errors import BnfuseError
from ..forward import rewrite_forward
from ..plan import Plan
from ..rewrite import fold_affine, give_bias
from ..scale_find import ScaleFold, ScaleSkip, find_scales
from ..sums import channel_affine, constant_operand
from .base import Elementwise, held, inside, Rows, RunLayer, RunModule, SiteSpec, touched

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..record import Recorder

__all__ = ["SCALE", "ScalePass"]


class ScalePass:
    name = "scale"
    key = "scale_folds"
    left_key = "scales_left"
    again = False
    verb = "folded"

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        step = Plan()
        find_scales(model, rec, escapes, step, self.name)
        busy = touched(plan, self.name)
        folded = {f.norm for f in plan.folds if f.direction == "backward"}
        for it in step.of(self.name):
            if inside(it.producer, busy) or inside(it.scale, busy):
                plan.more = True  # one rewrite of a layer per round, each judged at its site: the next round sees it
            else:
                plan.of(self.name).append(it)
                busy.add(it.producer)
        for skip in step.left_by(self.name):
            if skip.after in folded:  # what a round shows (inspect); the next round folds it
                plan.more = True
                skip = ScaleSkip(skip.scale, f"it folds in the next round, once {skip.after} has folded into the layer "
                                 "before it", skip.after)
            plan.left_by(self.name).append(skip)

    def apply(self, model: "nn.Module", items: "list[ScaleFold]") -> "nn.Module":
        for it in items:
            layer = model.get_submodule(it.producer)
            a, b = _values(model, it, layer)
            fold_affine(layer, a, b, it.scale, it.direction)
        return _remove(model, items)

    def rebuild(self, model: "nn.Module", items: "list[ScaleFold]") -> "nn.Module":
        for it in items:
            give_bias(model.get_submodule(it.producer))
        return _remove(model, items)

    def to_row(self, item: ScaleFold) -> "dict[str, Any]":
        return asdict(item)

    def from_row(self, row: Any) -> ScaleFold:
        item = ScaleFold(str(row["block"]), str(row["node"]), str(row["scale"]), str(row["producer"]),
                         str(row["direction"]), int(row["axis"]), int(row["rank"]))
        if item.direction not in ("backward", "forward") or not item.module_form and item.direction != "backward":
            raise ValueError(f"unknown scale fold {row!r}")
        return item

    def to_json(self, item: ScaleFold) -> "dict[str, Any]":
        return asdict(item)

    def left_json(self, left: ScaleSkip) -> "dict[str, Any]":
        return {"scale": left.scale, "reason": left.reason}

    def absorbed(self, item: ScaleFold) -> "list[str]":
        return []  # not a BatchNorm

    def sites(self, model: "nn.Module", items: "list[ScaleFold]") -> "list[SiteSpec]":
        specs = []
        for it in items:
            layer = model.get_submodule(it.producer) if it.producer in dict(model.named_modules()) else None
            axis = -1 if layer is not None and hasattr(layer, "in_features") else 1
            scale = RunModule(it.scale) if it.module_form else Elementwise("mul", it.scale, axis)
            if it.direction == "backward":
                specs.append(SiteSpec(self.name, it.producer, it.producer, (it.scale,),
                                      (RunLayer(it.producer), scale), (RunLayer(it.producer),)))
            else:
                specs.append(SiteSpec(self.name, it.producer, it.scale, (it.scale,),
                                      (scale, RunLayer(it.producer)), (RunLayer(it.producer),)))
        return specs

    def rows(self, plan: Plan) -> Rows:
        items, left = plan.of(self.name), plan.left_by(self.name)
        summary = (("per-channel scales", f"{len(items)} folded (one elementwise op less each), {len(left)} left")
                   if items or left else None)
        return Rows("Per-channel scales folded", ("scale", "into", "direction"),
                    [(it.scale, it.producer, it.direction) for it in items],
                    "Per-channel scales left", "scale", [(s.scale, s.reason) for s in left], summary)


def _values(model: "nn.Module", it: ScaleFold, layer: "nn.Module") -> "tuple[torch.Tensor, torch.Tensor]":
    """The scale's per-channel ``(a, b)`` in float64, on the layer's output (backward) or input (forward)."""
    import torch

    channels = (getattr(layer, "out_features", None) or layer.out_channels) if it.direction == "backward" \
        else (getattr(layer, "in_features", None) or layer.in_channels)
    if it.module_form:
        shape = [1] * it.rank
        shape[it.axis] = channels
        found, why = channel_affine(model.get_submodule(it.scale), tuple(shape), it.axis)
        if found is None:
            raise BnfuseError(f"cannot fold {it.scale}: {why}")
        return found
    a = held(model, it.scale).detach().to(torch.float64).reshape(-1)
    a = a.expand(channels) if a.numel() == 1 else a
    if a.numel() != channels:
        raise BnfuseError(f"cannot fold {it.scale}: {a.numel()} values for {channels} channels of {it.producer}")
    return a, torch.zeros_like(a)


def _remove(model: "nn.Module", items: "list[ScaleFold]") -> "nn.Module":
    """Each folded scale gone from the forward: a scale module becomes ``nn.Identity``; a
    multiplication leaves its block's forward (the block becomes a ``torch.fx.GraphModule``)."""
    from torch import nn

    blocks: dict[str, list[ScaleFold]] = {}
    for it in items:
        if it.module_form:
            model.set_submodule(it.scale, nn.Identity())
        else:
            blocks.setdefault(it.block, []).append(it)
    for name in sorted(blocks, key=lambda n: (n == "", -n.count("."))):
        def edit(block: "nn.Module", graph: Any, name: str = name) -> None:
            nodes = {n.name: n for n in graph.nodes}
            for it in blocks[name]:
                found = constant_operand(nodes[it.node]) if it.node in nodes else None
                if found is None:
                    raise BnfuseError(f"cannot find the multiplication by {it.scale} in the forward of {name or 'the model'}")
                nodes[it.node].replace_all_uses_with(found[0])
                graph.erase_node(nodes[it.node])

        model = rewrite_forward(model, name, edit)
    return model


SCALE = ScalePass()

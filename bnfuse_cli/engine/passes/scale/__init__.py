"""The scale pass: a per-channel scale next to a Conv/Linear (a layer scale, ResMLP's ``Affine``,
torchvision ConvNeXt's ``layer_scale``) folds into it, exactly, and leaves the forward, as does a scale
module whose output reaches a Linear only through layout ops and global average pooling (ResMLP's
final ``norm`` before its pooled head); every scale left says why (:mod:`.find` finds them).

Guards (each tripped by a test in tests/test_scale.py and tests/test_guards.py; each broken by a mutant
in scripts/mutants.py):
  - a layer called more than once, or whose output is also read elsewhere, returned or kept
  - a layer the fold pass would refuse (:func:`bnfuse_cli.engine.guards.producer_problem`: hooks, tied
    weights, ...), before or after the scale
  - a scale on another axis than the layer's features (its tokens, say)
  - a scale module with hooks (it becomes an ``nn.Identity``)
  - forward: a scale whose output is also read or returned, or a Linear after it called elsewhere
  - forward: a shift before a zero-padded conv
  - a multiplication in a block with hooks (its forward is rewritten)
  - a multiplication through a permuted result also read elsewhere
  - a multiplication by a tensor that is not one value, or one per channel
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ....errors import BnfuseError
from ...forward import child_name, held, rewrite_forward, trace_block
from ...plan import Plan
from ...reach import site_steps
from ...steps import Elementwise, Forward, RunLayer, RunModule, SiteSpec
from ...sums import channel_affine, constant_operand
from ..base import AffineFold, by_block, inside, touched
from .find import ScaleFold, ScaleSkip, find_scales

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ...record import Recorder

__all__ = ["SCALE", "ScalePass", "ScaleFold", "ScaleSkip"]


class ScalePass(AffineFold, name="scale", key="scale_folds", left_key="scales_left", item=ScaleFold):
    verb = "folded"
    absorbs = ()  # not a BatchNorm
    title, columns = "Per-channel scales folded", ("scale", "into", "direction")
    left_title, left_what = "Per-channel scales left", "scale"

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        step = Plan(passes=plan.passes)
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

    def label(self, item: ScaleFold) -> str:
        return item.scale

    def affine(self, model: "nn.Module", it: ScaleFold) -> "tuple[torch.Tensor, torch.Tensor]":
        """The scale's per-channel ``(a, b)`` in float64, on the layer's output (backward) or input (forward)."""
        import torch

        layer = model.get_submodule(it.producer)
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

    def remove(self, model: "nn.Module", items: "list[ScaleFold]", values: bool) -> "nn.Module":
        """Each folded scale gone from the forward: a scale module becomes ``nn.Identity``; a
        multiplication leaves its block's forward (the block becomes a ``torch.fx.GraphModule``)."""
        from torch import nn

        for it in items:
            if it.module_form:
                model.set_submodule(it.scale, nn.Identity())
        for name, found in by_block([it for it in items if not it.module_form]):
            def edit(block: "nn.Module", graph: Any, name: str = name, found: "list[ScaleFold]" = found) -> None:
                nodes = {n.name: n for n in graph.nodes}
                for it in found:
                    operand = constant_operand(nodes[it.node]) if it.node in nodes else None
                    if operand is None:
                        raise BnfuseError(f"cannot find the multiplication by {it.scale} in the forward of "
                                          f"{name or 'the model'}")
                    nodes[it.node].replace_all_uses_with(operand[0])
                    graph.erase_node(nodes[it.node])

            model = rewrite_forward(model, name, edit)
        return model

    def sites(self, model: "nn.Module", items: "list[ScaleFold]") -> "list[SiteSpec]":
        """A scale module runs its own forward; a multiplication in a block's forward is replayed from the
        block's own code when it scales its child layer's output directly (else the judge multiplies by
        the tensor this pass names)."""
        specs = []
        for it in items:
            layer = model.get_submodule(it.producer) if it.producer in dict(model.named_modules()) else None
            axis = -1 if layer is not None and hasattr(layer, "in_features") else 1
            scale = RunModule(it.scale) if it.module_form else _replayed(model, it) or Elementwise("mul", it.scale, axis)
            if it.direction == "backward":
                specs.append(SiteSpec(self.name, it.producer, it.producer, (it.scale,),
                                      (RunLayer(it.producer), scale), (RunLayer(it.producer),)))
            else:
                moves = site_steps(it.through)
                specs.append(SiteSpec(self.name, it.producer, it.scale, (it.scale,),
                                      (scale, *moves, RunLayer(it.producer)), (*moves, RunLayer(it.producer))))
        return specs

    def row(self, it: ScaleFold) -> "tuple[str, ...]":
        through = " -> ".join(f"{op}{args}" for op, args in it.through)
        return it.scale, it.producer, f"{it.direction} through {through}" if through else it.direction

    def left_json(self, left: ScaleSkip) -> "dict[str, Any]":
        return {"scale": left.scale, "reason": left.reason}

    def summary(self, plan: Plan) -> "tuple[str, str] | None":
        items, left = plan.of(self.name), plan.left_by(self.name)
        return (("per-channel scales", f"{len(items)} folded (one elementwise op less each), {len(left)} left")
                if items or left else None)


def _replayed(model: "nn.Module", it: ScaleFold) -> "Forward | None":
    """The block's own forward from its call of the layer to the multiplication, when the multiplication
    reads that call's output itself; else None."""
    try:
        graph = trace_block(model.get_submodule(it.block))
    except Exception:  # noqa: BLE001 - not traced: the tensor this pass names is multiplied instead
        return None
    node = next((n for n in graph.nodes if n.name == it.node), None)
    operand = constant_operand(node) if node is not None else None
    src = operand[0] if operand is not None else None
    if getattr(src, "op", None) != "call_module" or child_name(it.block, src.target) != it.producer:
        return None
    return Forward(it.block, src.name, it.node)


SCALE = ScalePass()

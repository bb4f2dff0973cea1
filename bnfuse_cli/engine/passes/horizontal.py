"""The horizontal pass (``--horizontal``, off by default): sibling Conv or Linear layers that read the
same tensor and agree in kernel, stride, padding, dilation, padding mode and input become one wider
layer; each sibling's consumers read its slice of the wider output (a view: ``torch.narrow`` on the
channel axis).  ResNet-50's first ``conv1`` and ``downsample``, the 1x1 convs on an Inception block's
input, attention's separate ``query``/``key``/``value`` Linear layers.

The siblings are found in the recorded data flow (each called once, on the very same tensor, weights
not shared); the module that holds them all is traced down to torch's own layers and becomes a
``torch.fx.GraphModule`` with the wider layer at the first sibling's name (its weight is the
siblings' weights stacked, so that name's weight grows) and the other siblings gone.  Off by default:
in eager PyTorch a slice of a wider output is not always cheaper than the separate layers it replaces
(measured in ``scripts/bench_horizontal.py``; the README has the table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ...errors import BnfuseError
from ..forward import rewrite_forward, trace_block
from ..merge_branches import plain_layer
from ..merge_rewrite import new_layer
from ..patterns import producer_rule
from ..plan import Plan
from .base import Cat, inside, Rows, RunLayer, SiteSpec, touched

if TYPE_CHECKING:
    from torch import nn

    from ..record import Recorder

__all__ = ["HORIZONTAL", "HorizontalPass", "Wide", "WideLeft"]


@dataclass(frozen=True)
class Wide:
    """``layers`` (siblings reading one tensor, in the order of their slices) as one wider layer at
    ``layers[0]``, inside ``block`` (the module whose forward calls them all)."""

    block: str
    layers: "tuple[str, ...]"


@dataclass(frozen=True)
class WideLeft:
    """Siblings left as they are, and why."""

    layers: "tuple[str, ...]"
    reason: str


def _signature(layer: "nn.Module") -> Any:
    """What siblings must share to be one wider layer (None: a layer this pass does not widen)."""
    rule, _ = producer_rule(layer)
    if rule is None or rule.transposed or not plain_layer(layer):
        return None
    w = layer.weight
    if rule.kind == "linear":
        return ("linear", layer.in_features, w.dtype, w.device)
    if layer.groups != 1 or isinstance(layer.padding, str):
        return None
    return (type(layer), layer.in_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            layer.padding_mode, w.dtype, w.device)


def _common(names: "list[str]") -> str:
    parts = [n.split(".")[:-1] for n in names]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def _width(layer: "nn.Module") -> int:
    return int(layer.weight.shape[0])


class HorizontalPass:
    name = "horizontal"
    key = "horizontal"
    left_key = "horizontal_left"
    again = False
    verb = "fused side by side"

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        if not plan.options.get("horizontal"):
            return
        busy = touched(plan, self.name)
        groups: dict[Any, list[str]] = {}
        for name, layer in model.named_modules():
            calls = rec.calls.get(id(layer), [])
            sig = _signature(layer) if len(calls) == 1 and calls[0].input is not None else None
            if sig is not None and len(rec.holders.get(id(layer.weight), [])) == 1:
                groups.setdefault((id(calls[0].input), sig), []).append(name)
        for names in groups.values():
            if len(names) < 2:
                continue
            if any(inside(n, busy) for n in names):
                plan.more = True  # another pass rewrites one of them this round: the next round sees it
                continue
            item, why = self._place(model, names)
            if item is not None:
                plan.of(self.name).append(item)
            else:
                plan.left_by(self.name).append(WideLeft(tuple(names), why))

    @staticmethod
    def _place(model: "nn.Module", names: "list[str]") -> "tuple[Wide | None, str]":
        block_name = _common(names)
        block = model.get_submodule(block_name) if block_name else model
        try:
            graph = trace_block(block, deep=True)
        except Exception as exc:  # noqa: BLE001 - a forward fx cannot follow: the siblings stay
            return None, f"the forward of {block_name or 'the model'} cannot be traced ({type(exc).__name__})"
        rel = {n[len(block_name) + 1:] if block_name else n: n for n in names}
        calls = [n for n in graph.nodes if n.op == "call_module" and str(n.target) in rel]
        if len(calls) != len(names) or len({c.args[0] for c in calls if c.args}) != 1 or any(c.kwargs for c in calls):
            return None, f"the forward of {block_name or 'the model'} does not call them on one tensor, once each"
        return Wide(block_name, tuple(rel[str(c.target)] for c in calls)), ""

    def apply(self, model: "nn.Module", items: "list[Wide]") -> "nn.Module":
        return _rewrite(model, items, values=True)

    def rebuild(self, model: "nn.Module", items: "list[Wide]") -> "nn.Module":
        return _rewrite(model, items, values=False)

    def to_row(self, item: Wide) -> "dict[str, Any]":
        return {"block": item.block, "layers": list(item.layers)}

    def from_row(self, row: Any) -> Wide:
        layers = tuple(str(n) for n in row["layers"])
        if len(layers) < 2:
            raise ValueError(f"a horizontal fusion of {len(layers)} layer(s)")
        return Wide(str(row["block"]), layers)

    def to_json(self, item: Wide) -> "dict[str, Any]":
        return self.to_row(item)

    def left_json(self, left: WideLeft) -> "dict[str, Any]":
        return asdict(left)

    def absorbed(self, item: Wide) -> "list[str]":
        return []

    def sites(self, model: "nn.Module", items: "list[Wide]") -> "list[SiteSpec]":
        """The siblings' outputs side by side (on the channel axis: the last for a Linear) against the
        wider layer, on the siblings' shared input."""
        out = []
        for it in items:
            axis = -1 if hasattr(model.get_submodule(it.layers[0]), "in_features") else 1
            out.append(SiteSpec(self.name, it.layers[0], it.layers[0], it.layers,
                                (Cat(tuple((RunLayer(n),) for n in it.layers), axis),), (RunLayer(it.layers[0]),)))
        return out

    def rows(self, plan: Plan) -> Rows:
        items, left = plan.of(self.name), plan.left_by(self.name)
        summary = (("side by side", f"{len(items)} groups of {sum(len(i.layers) for i in items)} layers -> one "
                    f"wider layer each") if items else None)
        return Rows("Fused side by side (siblings on one input -> one wider layer)", ("wider layer at", "siblings"),
                    [(it.layers[0], ", ".join(it.layers)) for it in items],
                    "Siblings left side by side", "layers", [(", ".join(w.layers), w.reason) for w in left], summary)


def _wide_layer(model: "nn.Module", it: Wide, values: bool) -> "tuple[nn.Module, list[int]]":
    """The wider layer (the siblings' weights stacked on the output axis when ``values``) and each
    sibling's width."""
    import torch

    layers = [model.get_submodule(n) for n in it.layers]
    widths = [_width(m) for m in layers]
    first = layers[0]
    wide = new_layer(first, sum(widths))
    if values:
        with torch.no_grad():
            wide.weight.copy_(torch.cat([m.weight for m in layers], 0))
            wide.bias.copy_(torch.cat([m.bias if m.bias is not None else torch.zeros(w, dtype=m.weight.dtype,
                                                                                    device=m.weight.device)
                                       for m, w in zip(layers, widths)]))
    wide.weight.requires_grad_(first.weight.requires_grad)
    wide.bias.requires_grad_(first.weight.requires_grad)
    return wide, widths


def _rewrite(model: "nn.Module", items: "list[Wide]", values: bool) -> "nn.Module":
    import torch

    for it in sorted(items, key=lambda i: (i.block == "", -i.block.count("."))):
        wide, widths = _wide_layer(model, it, values)
        axis = -1 if hasattr(wide, "in_features") else 1

        def edit(block: "nn.Module", graph: Any, it: Wide = it, wide: Any = wide, widths: "list[int]" = widths) -> None:
            rel = [n[len(it.block) + 1:] if it.block else n for n in it.layers]
            nodes = {str(n.target): n for n in graph.nodes if n.op == "call_module" and str(n.target) in rel}
            if len(nodes) != len(rel):
                raise BnfuseError(f"cannot find the layers {', '.join(it.layers)} in the forward of "
                                  f"{it.block or 'the model'}")
            first = min(nodes.values(), key=lambda n: list(graph.nodes).index(n))
            with graph.inserting_before(first):
                out = graph.call_module(rel[0], (first.args[0],))
            start = 0
            for r, w in zip(rel, widths):
                with graph.inserting_after(out):
                    part = graph.call_function(torch.narrow, (out, axis, start, w))
                nodes[r].replace_all_uses_with(part)
                graph.erase_node(nodes[r])
                start += w
            block.set_submodule(rel[0], wide)

        model = rewrite_forward(model, it.block, edit, deep=True)
    return model


HORIZONTAL = HorizontalPass()

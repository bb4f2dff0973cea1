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
(measured in ``scripts/bench_horizontal.py``: docs/measured/bench_horizontal.md).

Guards (each tripped by a test in tests/test_horizontal.py and tests/test_guards.py; each broken by a
mutant in scripts/mutants.py):
  - siblings differ in kernel, stride, padding, dilation, padding mode, dtype or device
  - a layer called more than once, or with tied weights, is no sibling
  - a sibling the fold pass would refuse (:func:`bnfuse_cli.engine.guards.producer_problem`: hooks, ...)
  - the block, or a module traced through it, with hooks (a GraphModule takes its place)
  - a forward torch.fx cannot trace
  - activations run once on the wider output only when they are alike in type and in every parameter
    (LeakyReLU's slope, ELU's alpha, GELU's approximation, a function's arguments), have no hooks,
    and each sibling's output goes to its activation alone; the site runs each sibling with its own
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import BnfuseError
from ..forward import child_name, rewrite_forward, skip_identities, trace_block
from ..guards import hooks, producer_problem
from ..patterns import producer_rule
from ..plan import Plan
from ..steps import Cat, RunLayer, RunModule, SiteSpec
from .base import OMIT_EMPTY, Option, Pass, inside, touched

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
    #: the activation module each sibling's output goes through, when they are alike and the rewrite
    #: applies the first one to the wider output (the site checks each sibling with its own)
    acts: "tuple[str, ...]" = field(default=(), metadata=OMIT_EMPTY)

    def __post_init__(self) -> None:
        if len(self.layers) < 2 or self.acts and len(self.acts) != len(self.layers):
            raise ValueError(f"a horizontal fusion of {len(self.layers)} layer(s) with activations {self.acts!r}")


@dataclass(frozen=True)
class WideLeft:
    """Siblings left as they are, and why."""

    layers: "tuple[str, ...]"
    reason: str


def _signature(layer: "nn.Module") -> Any:
    """What siblings must share to be one wider layer (None: a layer this pass does not widen)."""
    from ..layers import plain_layer

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


class HorizontalPass(Pass, name="horizontal", key="horizontal", left_key="horizontal_left", item=Wide):
    verb = "fused side by side"
    option = Option("horizontal", "Make sibling Conv/Linear layers that read one tensor one wider layer (off by "
                                  "default: not always faster in eager PyTorch; see docs/passes.md).")
    rewrites = absorbs = ()
    title, columns = "Fused side by side (siblings on one input -> one wider layer)", ("wider layer at", "siblings")
    left_title, left_what = "Siblings left side by side", "layers"

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
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
            problems = {n: why for n in names if (why := producer_problem(model.get_submodule(n), rec))}
            for n, why in problems.items():  # its calls are replaced by a slice of the wider layer
                plan.left_by(self.name).append(WideLeft((n,), why))
            names = [n for n in names if n not in problems]
            if len(names) < 2:
                continue
            item, why = self._place(model, names, rec)
            if item is not None:
                plan.of(self.name).append(item)
            else:
                plan.left_by(self.name).append(WideLeft(tuple(names), why))

    @staticmethod
    def _place(model: "nn.Module", names: "list[str]", rec: "Recorder") -> "tuple[Wide | None, str]":
        block_name = _common(names)
        block = model.get_submodule(block_name) if block_name else model
        try:
            graph = trace_block(block, deep=True)
        except Exception as exc:  # noqa: BLE001 - a forward fx cannot follow: the siblings stay
            return None, f"the forward of {block_name or 'the model'} cannot be traced ({type(exc).__name__})"
        # the block becomes one GraphModule of its forward traced down to torch's layers: the modules
        # traced through are not called any more
        called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
        for rel, m in block.named_modules():
            why = None if rel in called else hooks(m, child_name(block_name, rel) if rel else block_name, rec)
            if why:
                return None, why
        rel = {n[len(block_name) + 1:] if block_name else n: n for n in names}
        calls = [n for n in graph.nodes if n.op == "call_module" and str(n.target) in rel]
        if len(calls) != len(names) or len({c.args[0] for c in calls if c.args}) != 1 or any(c.kwargs for c in calls):
            return None, f"the forward of {block_name or 'the model'} does not call them on one tensor, once each"
        skip_identities(block, graph)  # as the rewrite sees it (a folded BatchNorm before an activation)
        acts = _alike_activations(block, calls)
        named = tuple(child_name(block_name, a.target) for a in acts) if all(a.op == "call_module" for a in acts) else ()
        return Wide(block_name, tuple(rel[str(c.target)] for c in calls), named), ""

    def apply(self, model: "nn.Module", items: "list[Wide]") -> "nn.Module":
        return _rewrite(model, items, values=True)

    def rebuild(self, model: "nn.Module", items: "list[Wide]") -> "nn.Module":
        return _rewrite(model, items, values=False)

    def sites(self, model: "nn.Module", items: "list[Wide]") -> "list[SiteSpec]":
        """The siblings' outputs side by side (on the channel axis: the last for a Linear) against the
        wider layer, on the siblings' shared input."""
        out = []
        for it in items:
            axis = -1 if hasattr(model.get_submodule(it.layers[0]), "in_features") else 1
            acts = it.acts or ("",) * len(it.layers)  # each sibling's own activation, and the one applied once
            chains = tuple((RunLayer(n),) + ((RunModule(a),) if a else ()) for n, a in zip(it.layers, acts))
            out.append(SiteSpec(self.name, it.layers[0], it.layers[0], it.layers, (Cat(chains, axis),),
                                (RunLayer(it.layers[0]),) + ((RunModule(acts[0]),) if acts[0] else ())))
        return out

    def row(self, it: Wide) -> "tuple[str, ...]":
        return it.layers[0], ", ".join(it.layers)

    def left_row(self, left: WideLeft) -> "tuple[str, str]":
        return ", ".join(left.layers), left.reason

    def summary(self, plan: Plan) -> "tuple[str, str] | None":
        items = plan.of(self.name)
        return (("side by side", f"{len(items)} groups of {sum(len(i.layers) for i in items)} layers -> one "
                 f"wider layer each") if items else None)


def _wide_layer(model: "nn.Module", it: Wide, values: bool) -> "tuple[nn.Module, list[int]]":
    """The wider layer (the siblings' weights stacked on the output axis when ``values``) and each
    sibling's width."""
    import torch

    from ..layers import new_layer

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
    for it in sorted(items, key=lambda i: (i.block == "", -i.block.count("."))):
        wide, widths = _wide_layer(model, it, values)
        model = rewrite_forward(model, it.block, functools.partial(_edit, it=it, wide=wide, widths=widths), deep=True)
    return model


def _edit(block: "nn.Module", graph: Any, *, it: Wide, wide: "nn.Module", widths: "list[int]") -> None:
    """One call of the wider layer in place of the siblings' calls; an activation each sibling's output
    went through alike, applied once to the wider output; each sibling's consumers read its slice, and
    a concatenation of all the slices in order reads the wider output itself."""
    import torch

    axis = -1 if hasattr(wide, "in_features") else 1
    rel = [n[len(it.block) + 1:] if it.block else n for n in it.layers]
    skip_identities(block, graph)  # a folded BatchNorm between a sibling and its activation
    nodes = {str(n.target): n for n in graph.nodes if n.op == "call_module" and str(n.target) in rel}
    if len(nodes) != len(rel):
        raise BnfuseError(f"cannot find the layers {', '.join(it.layers)} in the forward of {it.block or 'the model'}")
    order = list(graph.nodes)
    first = min(nodes.values(), key=order.index)
    calls = [nodes[r] for r in rel]
    with graph.inserting_before(first):
        out = graph.call_module(rel[0], (first.args[0],))
    acts = _alike_activations(block, calls)
    src = out
    if acts:
        with graph.inserting_after(out):
            src = graph.node_copy(acts[0], lambda n: out if n is calls[0] else n)
    parts, start = [], 0
    for w in widths:
        with graph.inserting_before(first):
            parts.append(graph.call_function(torch.narrow, (src, axis, start, w)))
        start += w
    for i, (call, part) in enumerate(zip(calls, parts)):
        if acts:
            acts[i].replace_all_uses_with(part)
            graph.erase_node(acts[i])
        call.replace_all_uses_with(part)
        graph.erase_node(call)
    _read_whole(graph, parts, src, axis)
    block.set_submodule(rel[0], wide)


def _activation(block: "nn.Module", node: Any) -> Any:
    """What makes ``node`` an elementwise activation of its first argument, as a comparable key (an
    ``inplace`` flag aside), or None."""
    from ..ops import ACTIVATIONS

    rest = (node.args[1:], tuple(sorted((k, v) for k, v in node.kwargs.items() if k != "inplace")))
    if any(hasattr(a, "op") for a in rest[0]) or any(hasattr(v, "op") for _, v in rest[1]):
        return None
    if node.op == "call_module":
        m = block.get_submodule(str(node.target))
        if type(m).__name__ not in ACTIVATIONS or next(m.parameters(), None) is not None or m._forward_hooks \
                or m._forward_pre_hooks or not type(m).__module__.startswith("torch.nn"):
            return None
        return ("module", type(m), tuple(sorted((k, repr(v)) for k, v in vars(m).items()
                                                if not k.startswith("_") and k not in ("training", "inplace"))), rest)
    if node.op == "call_function" and getattr(node.target, "__name__", "").rstrip("_") in ACTIVATIONS:
        return ("function", node.target.__name__.rstrip("_"), rest)
    if node.op == "call_method" and str(node.target).rstrip("_") in ACTIVATIONS:
        return ("function", str(node.target).rstrip("_"), rest)
    return None


def _alike_activations(block: "nn.Module", calls: "list[Any]") -> "list[Any]":
    """The activation each sibling's output goes through and nothing else reads, when it is the same
    one for all (a ReLU after each of an Inception block's 1x1 convs); else []."""
    acts = []
    for c in calls:
        users = list(c.users)
        if len(users) != 1 or not users[0].args or users[0].args[0] is not c:
            return []
        acts.append(users[0])
    keys = [_activation(block, a) for a in acts]
    return acts if keys[0] is not None and all(k == keys[0] for k in keys) else []


def _read_whole(graph: Any, parts: "list[Any]", src: Any, axis: int) -> None:
    """Where the slices are concatenated whole and in order on their own axis, and read nowhere else,
    the concatenation reads the wider output instead (no slice, no copy of it)."""
    import torch

    users = {u for p in parts for u in p.users}
    if len(users) != 1 or any(len(p.users) != 1 for p in parts):
        return
    (cat,) = users
    if cat.op != "call_function" or cat.target not in (torch.cat, torch.concat) or not cat.args:
        return
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    seq = list(cat.args[0]) if isinstance(cat.args[0], (list, tuple)) else []
    at = next((i for i in range(len(seq)) if seq[i:i + len(parts)] == parts), None)
    if dim != axis or at is None:
        return
    seq[at:at + len(parts)] = [src]
    if len(seq) == 1:
        cat.replace_all_uses_with(src)
        graph.erase_node(cat)
    else:
        cat.args = (seq, *cat.args[1:])
    for p in parts:
        graph.erase_node(p)


HORIZONTAL = HorizontalPass()

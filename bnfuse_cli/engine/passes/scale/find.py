"""Where a per-channel scale (a layer scale, ResMLP's ``Affine``) folds into the Conv/Linear next to
it, by the recorded data flow, or why not.

Two forms.  A *module* whose forward is ``a * y + b`` per channel (probed:
:func:`bnfuse_cli.engine.sums.channel_affine`) folds backward when its input is a layer's output that
nothing else reads, and forward when its output is read only by a Linear (or a conv that does not
zero-pad, or whose shift is zero), directly or through layout ops and means over other axes (ResMLP's
final ``Affine`` before ``head(x.mean(1))``: :func:`bnfuse_cli.engine.reach.follow`).  A *multiplication* in a block's forward by a tensor the block
holds (``self.layer_scale * self.block(x)``, ``x.mul(self.gamma.reshape(1, -1, 1, 1))``) folds
backward when the other operand is a layer's output, through eval-mode identities and permutes
(torchvision's ConvNeXt permutes a Linear's output back to channels first before scaling it); the
scale must lie on the layer's feature axis once the permutes are undone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...forward import child_name, passthrough, single_call, trace_block
from ...guards import hooks, producer_problem
from ...patterns import is_norm_like, is_producer_like, producer_rule
from ...reach import OPS, follow
from ...sums import channel_affine, constant_operand, held_value, per_channel_axis
from ...plan import Skip
from ..base import OMIT_EMPTY

if TYPE_CHECKING:
    from torch import fx, nn

    from ...plan import Plan
    from ...record import Recorder

__all__ = ["ScaleFold", "ScaleSkip", "find_scales", "feature_axis"]


@dataclass(frozen=True)
class ScaleFold:
    """The scale ``scale`` (a module, or a held tensor multiplied in ``block``'s forward at fx node
    ``node``) folded into ``producer``: ``backward`` (the scale after it) or ``forward`` (before it),
    on ``axis`` of a rank-``rank`` activation at the scale."""

    block: str
    node: str
    scale: str
    producer: str
    direction: str
    axis: int
    rank: int
    #: a forward fold into a Linear through layout ops and means over other axes (global average
    #: pooling; :data:`bnfuse_cli.engine.reach.OPS`): those ops, in order
    through: "tuple[tuple[str, tuple[int, ...]], ...]" = field(default=(), metadata=OMIT_EMPTY)

    module_form = property(lambda self: not self.node)

    def __post_init__(self) -> None:
        if self.direction not in ("backward", "forward") or not self.module_form and self.direction != "backward" \
                or any(op not in OPS for op, _ in self.through) or self.through and self.direction != "forward":
            raise ValueError(f"unknown scale fold {self!r}")


@dataclass(frozen=True)
class ScaleSkip:
    """A per-channel scale left as it is, and why; ``after``: the BatchNorm it follows, when that is
    what stops it (it folds once that BatchNorm has folded into the layer before it)."""

    scale: str
    reason: str
    after: str = ""


def feature_axis(layer: "nn.Module", rank: int) -> "int | None":
    """The axis of a layer's output (or input) that holds its features: the last for a Linear, 1 for a
    conv; None for anything else."""
    rule, _ = producer_rule(layer)
    if rule is None:
        return None
    return rank - 1 if rule.kind == "linear" else 1


def _affine_module(module: "nn.Module", shape: "tuple[int, ...]") -> "tuple[int | None, Any]":
    """(axis, (a, b)) of a module that scales per channel on axis 1 or on the last axis; (None, why)."""
    why = None
    for axis in dict.fromkeys((len(shape) - 1, 1)):
        found, why = channel_affine(module, shape, axis)
        if found is not None:
            return axis, found
    return None, why


def _after_norm(norm: str) -> str:
    return f"it follows {norm}, which stays (a BatchNorm, not a Conv/Linear)"


def _layer_ok(model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", pname: str) -> "str | None":
    layer = model.get_submodule(pname)
    calls = rec.calls.get(id(layer), [])
    if len(calls) != 1:
        return f"{pname} is called {len(calls)} times"
    rule, why = producer_rule(layer)
    if rule is None:
        return why
    why = producer_problem(layer, rec)
    if why:
        return why
    out = calls[0].output
    if out is not None and id(out) in escapes:
        return f"the output of {pname} is also {escapes[id(out)]}"
    return None


def _module_scales(model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: "Plan", name: str) -> None:
    """Every scale module: folded backward or forward, or left with its reason."""
    for mname, module in model.named_modules():
        if id(module) not in rec.scales or is_producer_like(module) or is_norm_like(module):
            continue
        call = single_call(module, rec)
        if call is None or call.input is None or call.output is None or call.output is call.input:
            continue
        axis, found = _affine_module(module, tuple(call.input.shape))
        if axis is None:
            continue
        rank = len(call.input.shape)
        why = hooks(module, mname, rec)
        if why:  # it would become an nn.Identity
            plan.left_by(name).append(ScaleSkip(mname, why))
            continue
        why = _backward(model, rec, escapes, mname, call, axis, rank)
        if why is None:
            plan.of(name).append(ScaleFold("", "", mname, rec.produced[id(call.input)].name, "backward", axis, rank))
            continue
        fwd, fwhy, through = _forward(model, rec, escapes, mname, call, axis, rank, found)
        if fwd is not None:
            plan.of(name).append(ScaleFold("", "", mname, fwd, "forward", axis, rank, through))
        else:
            before = rec.produced.get(id(call.input))
            after = before.name if before is not None and is_norm_like(before.module) else ""
            plan.left_by(name).append(ScaleSkip(mname, Skip.of(mname, why, fwhy).reason, after))


def _backward(model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", mname: str, call: Any, axis: int,
              rank: int) -> "str | None":
    pcall = rec.produced.get(id(call.input))
    if pcall is not None and is_norm_like(pcall.module):
        return _after_norm(pcall.name)
    if pcall is None or not is_producer_like(pcall.module):
        return f"{mname} does not read a Conv/Linear output"
    why = _layer_ok(model, rec, escapes, pcall.name)
    if why:
        return why
    reads = rec.reads.get(id(call.input), [])
    if len(reads) != 1 or reads[0][0] is not call:
        ops = ", ".join(f"{op} in {c.name if c else 'the model'}" for c, op in reads)
        return f"the output of {pcall.name} is also read by {ops}"
    if feature_axis(pcall.module, rank) != axis:
        return f"{mname} scales axis {axis}, not the features of {pcall.name}"
    return None


def _forward(model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", mname: str, call: Any, axis: int,
             rank: int, found: Any) -> "tuple[str | None, str, tuple[tuple[str, tuple[int, ...]], ...]]":
    """The layer the scale folds forward into, why not, and the layout ops and means over other axes on
    the way to it (a Linear reached through them: :func:`bnfuse_cli.engine.reach.follow`)."""
    reads = rec.reads.get(id(call.output))
    through: "tuple[tuple[str, tuple[int, ...]], ...]" = ()
    if reads is not None and len(reads) == 1 and id(call.output) in rec.moved and id(call.output) not in escapes:
        reach = follow(rec, call.output, axis, escapes)
        if reach.why is not None:
            return None, reach.why, ()
        if reach.reader is not None:  # its channels are the Linear's features, the last axis of its input
            reads, through, rank = [(reach.reader, "linear")], tuple(reach.steps), len(reach.reader.input.shape)
            axis = rank - 1
    if reads is None or len(reads) != 1 or reads[0][0] is None or not is_producer_like(reads[0][0].module):
        ops = ", ".join(f"{op} in {c.name if c else 'the model forward'}" for c, op in reads or [])
        return None, f"its output goes to {ops or 'nothing bnfuse saw'}, not to one Conv/Linear alone", ()
    if id(call.output) in escapes:
        return None, f"its output is also {escapes[id(call.output)]}", ()
    layer_call = reads[0][0]
    layer = layer_call.module
    if not through and layer_call.input is not call.output or len(rec.calls.get(id(layer), [])) != 1:
        return None, f"{layer_call.name} does not read the output of {mname} as its input, once", ()
    if feature_axis(layer, rank) != axis:
        return None, f"{mname} scales axis {axis}, not the input features of {layer_call.name}", ()
    rule, why = producer_rule(layer)
    if rule is None:
        return None, why or f"{layer_call.name} is not a layer bnfuse folds into", ()
    why = producer_problem(layer, rec)
    if why:
        return None, why, ()
    pads = any(getattr(layer, "padding", (0,)) if not isinstance(getattr(layer, "padding", 0), str) else (1,))
    if rule.kind != "linear" and (rule.transposed or pads and bool(found[1].any())):
        return None, f"{layer_call.name} zero-pads its input, and {mname} adds a shift the padding would not get", ()
    return layer_call.name, "", through


def _walk(node: Any, block: "nn.Module", rec: "Recorder") -> "tuple[Any, list[tuple[str, tuple[int, ...]]], str | None]":
    """From a multiplication's operand back to the child call that made it, through eval-mode identities
    and permutes: (the child node, the permutes from that child's output to the operand, why not)."""
    perms: list[tuple[str, tuple[int, ...]]] = []
    while hasattr(node, "op"):
        if len(node.users) != 1:
            return None, [], "a tensor on the way is also read elsewhere"
        if node.op == "call_module" and passthrough(node, block, rec) and node.args:
            node = node.args[0]
        elif node.op in ("call_method", "call_function") and _name(node.target) in ("permute", "transpose"):
            dims = tuple(node.args[1:] if len(node.args) > 2 or _name(node.target) == "transpose" else node.args[1])
            if not dims or not all(isinstance(d, int) for d in dims):
                return None, [], f"a {_name(node.target)} with computed axes"
            perms.insert(0, (_name(node.target), dims))
            node = node.args[0]
        elif node.op == "call_module":
            return node, perms, None
        else:  # arithmetic (a weighted sum's factor: the merge pass's), an input: not a layer scale
            return None, [], None
    return None, [], "it does not scale a tensor the block computes"


def _name(target: Any) -> str:  # noqa: D103
    return str(getattr(target, "__name__", target))


def _back(axis: int, perms: "list[tuple[str, tuple[int, ...]]]", rank: int) -> int:
    """An axis of the tensor after ``perms`` as an axis of the tensor before them."""
    for kind, dims in reversed(perms):
        if kind == "permute":
            axis = dims[axis] % rank
        else:
            a, b = (d % rank for d in dims)
            axis = b if axis == a else a if axis == b else axis
    return axis


def _through_child(module: "nn.Module", name: str, rec: "Recorder", perms: "list[tuple[str, tuple[int, ...]]]"
                   ) -> "tuple[str | None, list[tuple[str, tuple[int, ...]]]]":
    """The layer whose output a child returns (itself, a layer inside whose output it returns as is, or
    the layer before a closing permute of a Sequential), with the permutes on the way."""
    from torch import nn

    if is_producer_like(module):
        return name, perms
    call = single_call(module, rec)
    if call is not None and call.output is not None and id(call.output) in rec.produced:
        return rec.produced[id(call.output)].name, perms
    if type(module).forward is nn.Sequential.forward and len(module) >= 2:
        last_name, last = list(module.named_children())[-1]
        dims = getattr(last, "dims", None)
        if isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims) and not any(True for _ in last.parameters()):
            prev_name, prev = list(module.named_children())[-2]
            return _through_child(prev, f"{name}.{prev_name}", rec, [("permute", tuple(dims))] + perms)
    return None, perms


def _op_scales(model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: "Plan", name: str) -> None:
    """Every multiplication by a held per-channel tensor in a block's forward: folded backward, or left."""
    import torch

    for bname, block in model.named_modules():
        own = [t for t in (*block._parameters.values(), *block._buffers.values()) if isinstance(t, torch.Tensor)]
        if not own or is_producer_like(block) or is_norm_like(block) or id(block) in rec.scales:
            continue
        if single_call(block, rec) is None and bname:
            continue
        try:
            graph = trace_block(block)
        except Exception:  # noqa: BLE001 - a forward fx cannot follow: its scales stay (not reported)
            continue
        hooked = hooks(block, bname, rec)  # its forward would be rewritten
        for node in graph.nodes:
            found = constant_operand(node)
            if found is None:
                continue
            operand, (target, reshapes) = found
            item, skip = _op_scale(model, rec, escapes, bname, block, node, operand, target, reshapes)
            if item is not None and hooked:
                item, skip = None, ScaleSkip(item.scale, hooked)
            if item is not None:
                plan.of(name).append(item)
            elif skip is not None:
                plan.left_by(name).append(skip)


def _op_scale(model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", bname: str, block: "nn.Module",
              node: "fx.Node", operand: Any, target: str, reshapes: Any) -> "tuple[ScaleFold | None, ScaleSkip | None]":
    """The multiplication ``node`` by the held ``target`` as a fold; else what it leaves (None: not a
    layer scale at all, such as a factor of a weighted sum)."""
    t = held_value(block, target, reshapes)
    if t is None:
        return None, None
    qual = child_name(bname, target)
    child, perms, why = _walk(operand, block, rec)
    if child is None:
        return None, ScaleSkip(qual, f"{qual}: {why}") if why else None
    layer, perms = _through_child(block.get_submodule(str(child.target)), child_name(bname, child.target), rec, perms)
    if layer is not None and is_norm_like(model.get_submodule(layer)):
        return None, ScaleSkip(qual, _after_norm(layer), layer)
    if layer is None:
        return None, ScaleSkip(qual, f"{qual} scales the output of {child_name(bname, child.target)}, "
                                     "not a Conv/Linear output")
    why = _layer_ok(model, rec, escapes, layer)
    pcall = rec.calls[id(model.get_submodule(layer))][0] if why is None else None
    if why is None and len(rec.reads.get(id(pcall.output), [])) != 1:
        why = f"the output of {layer} is also read elsewhere"
    if why:
        return None, ScaleSkip(qual, why)
    rank = len(pcall.output.shape)
    at = per_channel_axis(t, rank)
    if t.numel() != 1 and at is None:
        return None, ScaleSkip(qual, f"{qual} {tuple(t.shape)} is not one value per channel")
    axis = _back(at, perms, rank) if at is not None else None  # back through the permutes, to the layer's output
    feat = feature_axis(model.get_submodule(layer), rank)
    if axis is not None and axis != feat:
        return None, ScaleSkip(qual, f"{qual} scales axis {axis} of {layer}'s output, not its features (axis {feat})")
    return ScaleFold(bname, node.name, qual, layer, "backward", feat, rank), None


def find_scales(model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: "Plan", name: str) -> None:
    """Add every per-channel scale that folds to ``plan`` under the pass ``name``, and every one that
    cannot with its reason."""
    _module_scales(model, rec, escapes, plan, name)
    _op_scales(model, rec, escapes, plan, name)

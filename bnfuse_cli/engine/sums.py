"""Linear combinations in a block's forward: trees of additions, subtractions and scalings by
constants, each leaf with the factors that scale it.

``x + s * (conv(x) - bn(x))`` (FastViT's RepMixer, ``s`` a layer scale) is the tree with leaves
``x`` (no factor), ``conv(x)`` (times ``s``) and ``bn(x)`` (times -1, then ``s``);
``(head(x) + head_dist(x)) / 2`` (RepViT's classifier) scales both leaves by 1/2.  A factor is a
number, a tensor the block holds (a parameter, a buffer or a tensor attribute, perhaps reshaped),
or a child module that multiplies its input by a per-channel constant (timm's ``LayerScale2d``:
:func:`channel_scale` probes it).  An inner node of a tree is read by the tree alone; anything else is a leaf.  Whether
the leaves are branches that merge, and whether a factor broadcasts per channel, is for the caller
(:mod:`bnfuse_cli.engine.merge`) to decide.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

__all__ = ["linear_trees", "channel_scale", "channel_affine", "constant_operand", "held_value", "per_channel_axis",
           "Factor"]

#: one factor on a leaf: ("mul", number), ("mul", (held tensor's name in the block, the reshapes the
#: forward applies to it)), ("div", number) or ("module", a child's name): innermost first
Factor = "tuple[str, Any]"

_ADD = (operator.add, operator.iadd, "add", "add_", "__add__", "__iadd__", "__radd__")
_SUB = (operator.sub, operator.isub, "sub", "sub_", "__sub__", "__isub__")
_MUL = (operator.mul, operator.imul, "mul", "mul_", "__mul__", "__imul__", "__rmul__")
_DIV = (operator.truediv, operator.itruediv, "div", "div_", "__truediv__", "__itruediv__")
_NEG = (operator.neg, "neg", "__neg__")
_RESHAPE = ("reshape", "view", "unsqueeze")


def _kind(node: "fx.Node") -> "str | None":
    import torch

    if node.op not in ("call_function", "call_method") or node.kwargs.get("out") is not None:
        return None
    t = node.target
    for kind, targets, fn in (("add", _ADD, torch.add), ("sub", _SUB, torch.sub), ("mul", _MUL, torch.mul),
                              ("div", _DIV, torch.div), ("neg", _NEG, torch.neg)):
        if t in targets or t is fn:
            return kind
    return None


def _constant(arg: Any) -> "tuple[Any, bool]":
    """A factor's value: a number, or the block's held tensor behind a ``get_attr`` with the reshapes
    the forward applies to it (``(name, ((method, args), ...))``); and whether ``arg`` is a constant."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg), True
    node, reshapes = arg, []
    while getattr(node, "op", None) == "call_method" and node.target in _RESHAPE and node.args and not node.kwargs:
        if not all(isinstance(a, int) for a in node.args[1:]):
            return None, False
        reshapes.insert(0, (str(node.target), tuple(node.args[1:])))
        node = node.args[0]
    if getattr(node, "op", None) == "get_attr":
        return (str(node.target), tuple(reshapes)), True
    return None, False


def held_value(block: "nn.Module", target: str, reshapes: "tuple[tuple[str, tuple[int, ...]], ...]" = ()
               ) -> "torch.Tensor | None":
    """The tensor ``block`` holds under ``target`` (a parameter, a buffer, or a module's plain tensor
    attribute: the model's code makes it again when the model is rebuilt), after the reshapes its
    forward applies to it; None when it holds none there (a tensor torch.fx met as a constant of the
    forward: a global, a closure), or a reshape fails."""
    import torch

    mod, _, attr = target.rpartition(".")
    try:
        owner = block.get_submodule(mod)
        t = owner._parameters.get(attr, owner._buffers.get(attr, vars(owner).get(attr)))
        t = t if isinstance(t, torch.Tensor) else None
        for method, args in reshapes if t is not None else ():
            t = getattr(t, method)(*args)
    except (AttributeError, RuntimeError):
        return None
    return t


def per_channel_axis(t: "torch.Tensor", rank: int) -> "int | None":
    """The axis of a rank-``rank`` activation along which ``t`` holds one value per position (aligned
    from the right, as torch broadcasts); None when ``t`` is one value or varies along several axes."""
    big = [rank - t.dim() + i for i, d in enumerate(t.shape) if d != 1]
    return big[0] if t.dim() <= rank and len(big) == 1 else None


def constant_operand(node: "fx.Node") -> "tuple[fx.Node, tuple[str, Any]] | None":
    """For ``y * t`` with ``t`` a tensor the block holds (through reshapes): ``(y's node, (t's name, the
    reshapes))``; else None."""
    if _kind(node) != "mul" or len(node.args) != 2 or node.kwargs:
        return None
    for i in (0, 1):
        value, const = _constant(node.args[1 - i])
        if const and isinstance(value, tuple) and hasattr(node.args[i], "op") and not _constant(node.args[i])[1]:
            return node.args[i], value
    return None


def linear_trees(graph: "fx.Graph", is_scale: "Callable[[fx.Node], bool]", is_passthrough: "Callable[[fx.Node], bool]"
                 ) -> "list[tuple[fx.Node, list[tuple[Any, tuple[Any, ...]]]]]":
    """Each linear tree holding at least one addition or subtraction, as (root, leaves): a leaf is an
    fx node or a number, with its factors innermost first.  ``is_scale(node)``: a child call that
    scales per channel; ``is_passthrough(node)``: an eval-mode identity (dropout, drop-path)."""
    trees = []
    inside: set[Any] = set()
    for root in reversed(list(graph.nodes)):
        if root in inside or not _linear(root, is_scale):
            continue
        leaves: list[tuple[Any, tuple[Any, ...]]] = []
        inner: list[Any] = []
        todo: list[tuple[Any, tuple[Any, ...], bool]] = [(root, (), True)]
        while todo:
            a, factors, top = todo.pop()
            while hasattr(a, "op") and len(a.users) == 1 and is_passthrough(a) and a.args:
                a = a.args[0]
            step = _step(a, is_scale) if hasattr(a, "op") and (top or len(a.users) == 1) else None
            if step is None:
                leaves.append((a, factors))
                continue
            inner.append(a)
            todo += [(arg, f + factors, False) for arg, f in step]
        if any(_kind(n) in ("add", "sub") for n in inner):
            inside.update(inner)
            trees.append((root, leaves))
    return trees


def _linear(node: "fx.Node", is_scale: "Callable[[fx.Node], bool]") -> bool:
    return _step(node, is_scale) is not None


def _step(node: "fx.Node", is_scale: "Callable[[fx.Node], bool]") -> "list[tuple[Any, tuple[Any, ...]]] | None":
    """The operands of one linear node, each with the factor it puts on that operand; None when the
    node is not linear in one operand (or a sum of two)."""
    if node.op == "call_module":
        return [(node.args[0], (("module", str(node.target)),))] if len(node.args) == 1 and not node.kwargs \
            and is_scale(node) else None
    kind = _kind(node)
    args = list(node.args)
    if kind == "neg" and len(args) == 1:
        return [(args[0], (("mul", -1.0),))]
    if kind in ("add", "sub") and len(args) == 2:
        alpha = node.kwargs.get("alpha", 1)
        if set(node.kwargs) - {"alpha"} or not isinstance(alpha, (int, float)):
            return None
        second = float(alpha) * (-1.0 if kind == "sub" else 1.0)
        return [(args[0], ()), (args[1], () if second == 1.0 else (("mul", second),))]
    if kind in ("mul", "div") and len(args) == 2 and not node.kwargs:
        for i in ((0, 1) if kind == "mul" else (0,)):
            value, const = _constant(args[1 - i])
            if const and hasattr(args[i], "op") and not _constant(args[i])[1]:
                if kind == "div" and not isinstance(value, float):
                    return None
                return [(args[i], ((kind, value),))]
    return None


def channel_scale(module: "nn.Module", shape: "tuple[int, ...]", axis: int = 1
                  ) -> "tuple[torch.Tensor | None, str | None]":
    """The per-channel factor ``g`` (float64, one per channel on ``axis``) with ``module(y) == y * g``
    for inputs of ``shape``, probed on a float64 copy; or why the module is not such a scale."""
    found, why = channel_affine(module, shape, axis)
    if found is None:
        return None, why
    if bool(found[1].any()):
        return None, f"{type(module).__name__} adds a shift: not a scale alone"
    return found[0], None


def channel_affine(module: "nn.Module", shape: "tuple[int, ...]", axis: int = 1
                   ) -> "tuple[tuple[torch.Tensor, torch.Tensor] | None, str | None]":
    """``(a, b)`` (float64, one per channel on ``axis``) with ``module(y) == a * y + b`` for inputs of
    ``shape`` (timm's ``LayerScale``, ResMLP's ``Affine``), probed on a float64 copy of the module with
    zeros, ones and a random input; or why the module is not such a map."""
    import copy

    import torch

    name = type(module).__name__
    if any(True for _ in module.children()) or module.training:
        return None, f"{name} is not a per-channel scale (it holds modules or is in training mode)"
    if len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape):
        return None, f"{name} is not a per-channel scale (its input has shape {tuple(shape)})"
    m = copy.deepcopy(module).to(torch.float64)
    y = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            ones, zeros, out = (m(t.clone()) for t in (torch.ones_like(y), torch.zeros_like(y), y))
    except Exception as exc:  # noqa: BLE001 - a module that does something else: not a scale
        return None, f"{name} is not a per-channel scale ({type(exc).__name__} on a probe)"
    if not all(isinstance(t, torch.Tensor) and t.shape == y.shape for t in (ones, zeros, out)):
        return None, f"{name} is not a per-channel scale (it changes the shape)"
    ax = axis % len(shape)
    view = [1] * len(shape)
    view[ax] = shape[ax]
    b = zeros.movedim(ax, -1).reshape(-1, shape[ax])[0]
    a = ones.movedim(ax, -1).reshape(-1, shape[ax])[0] - b
    def close(x: "torch.Tensor", y: "torch.Tensor") -> bool:  # float64 rounding (a fused multiply-add) aside
        return bool((x - y).abs().max() <= 1e-12 * max(float(y.abs().max()), 1e-300))

    def same(x: "torch.Tensor", per_channel: "torch.Tensor") -> bool:
        return close(x, per_channel.reshape(view).expand(shape))

    if not (same(zeros, b) and same(ones - zeros, a)):
        return None, f"{name} is not a per-channel scale on axis {axis}"
    if not close(out, y * a.reshape(view) + b.reshape(view)):
        return None, f"{name} is not a per-channel scale on axis {axis} (not linear)"
    return (a, b), None

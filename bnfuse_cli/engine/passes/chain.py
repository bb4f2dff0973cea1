"""The affine-chain pass: multiplications and additions by constants between a Conv/Linear and
its BatchNorm (``bn(conv(x) * a + b)``: scalars, or per-channel tensors the module holds that
broadcast on the channel axis) fold into the layer together with the BatchNorm, exactly, and leave
the block's forward (the block becomes a ``torch.fx.GraphModule`` without them), as torch.jit.freeze
folds such a chain.  A BatchNorm that follows anything else in such a chain stays, with its reason."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import BnfuseError
from ..forward import child_name, held, rewrite_forward, trace_block
from ..patterns import norm_rule, producer_rule
from ..plan import Plan, Skip
from ..steps import Forward, RunLayer, SiteSpec
from ..sums import held_value, per_channel_axis
from .base import AffineFold, by_block, norm_affine

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

    from ..record import Recorder

__all__ = ["CHAIN", "ChainFold"]

#: the affine steps, by the fx target that computes them (``torch.add`` and ``operator.add`` alike)
_OPS = {operator.mul: "mul", operator.add: "add", operator.sub: "sub", operator.truediv: "div",
        "mul": "mul", "add": "add", "sub": "sub", "div": "div", "__mul__": "mul", "__add__": "add",
        "__sub__": "sub", "__truediv__": "div", "multiply": "mul", "subtract": "sub", "divide": "div",
        "true_divide": "div", "rsub": "rsub"}
#: what ``c op y`` is as a step on ``y`` (the constant on the left): ``c - y`` is ``rsub`` (``-y + c``,
#: affine); ``c / y`` is ``rdiv``, which is not affine in ``y``
_REVERSED = {"mul": "mul", "add": "add", "sub": "rsub", "div": "rdiv", "rsub": "sub"}
#: the steps a chain folds: y <- y op c, and y <- c - y (``rsub``)
_STEPS = ("mul", "add", "sub", "div", "rsub")


def _op(node: Any) -> "str | None":
    """The affine step a call node computes on its first operand (``mul``, ``add``, ``sub``, ``div``,
    ``rsub``), or None: an operator, a tensor method or a torch function (``torch.add``)."""
    if getattr(node, "op", None) not in ("call_function", "call_method"):
        return None
    target = node.target
    if node.op == "call_function" and getattr(target, "__module__", None) == "torch":
        target = target.__name__
    return _OPS.get(target)


@dataclass(frozen=True)
class ChainFold:
    """``norm`` after ``producer`` through ``steps`` (op, constant: a number or a held tensor's name),
    all in ``block``'s forward."""

    block: str
    norm: str
    producer: str
    steps: "tuple[tuple[str, str | float], ...]"

    def __post_init__(self) -> None:
        if any(op not in _STEPS for op, _ in self.steps):
            raise ValueError(f"unknown affine step in {self.steps!r}")


def _constant(arg: Any, block: "nn.Module", block_name: str, channels: int, rank: int
              ) -> "tuple[Any, str | None]":
    """A step's constant as recorded (a number, or the dotted name of a tensor the block holds: a
    parameter, a buffer or a tensor attribute), or why not.  A tensor must be one value, or one per
    channel on the channel axis of the rank-``rank`` activation it meets."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg), None
    if getattr(arg, "op", None) == "get_attr":
        target = str(arg.target)
        t = held_value(block, target)
        if t is None:
            return None, ("a tensor the model does not hold (a global or a closure): bnfuse reads a chain's "
                          "constants from the model, by name")
        if t.numel() != 1 and (per_channel_axis(t, rank) != 1 or t.numel() != channels):
            return None, f"{child_name(block_name, target)} {tuple(t.shape)} does not broadcast on the channel axis"
        return child_name(block_name, target), None
    return None, "it is not a constant (a number, or a parameter, buffer or tensor attribute of the block)"


def _computed(arg: Any) -> bool:
    return getattr(arg, "op", None) in ("call_function", "call_method", "call_module")


def _walk(bn_node: "fx.Node", block: "nn.Module", block_name: str, channels: int, rank: int
          ) -> "tuple[fx.Node | None, list[tuple[str, Any]], list[fx.Node], str | None]":
    """From the BN's input back to a layer call: (its node, the steps in order, their nodes, why not)."""
    steps: list[tuple[str, Any]] = []
    nodes: list[Any] = []
    node = bn_node.args[0] if bn_node.args else None
    while (op := _op(node)) is not None:
        if node.kwargs:
            return None, [], [], f"{op} with {', '.join(node.kwargs)}= is not one of the steps bnfuse folds"
        if len(node.users) != 1:
            return None, [], [], f"the result of {op} is also read elsewhere"
        a, b = (list(node.args) + [None, None])[:2]
        if _computed(a):  # y op c
            src, const = a, b
        elif _computed(b):  # c op y
            src, const, op = b, a, _REVERSED[op]
        else:
            return None, [], [], f"{op} does not read the layer's output"
        shown = getattr(const, "target", const)
        if op == "rdiv":
            return None, [], [], f"div of {shown} by the layer's output ({shown} / y) is not an affine map of it"
        value, why = _constant(const, block, block_name, channels, rank)
        if why is not None:
            return None, [], [], f"{'sub' if op == 'rsub' else op} by {shown}: {why}"
        steps.insert(0, (op, value))
        nodes.append(node)
        node = src
    if not steps:
        return None, [], [], None
    if getattr(node, "op", None) != "call_module" or len(node.users) != 1:
        what = getattr(node, "target", node)
        return None, [], [], f"the chain starts at {getattr(what, '__name__', what)}, not at a Conv/Linear child"
    return node, steps, nodes, None


def _value(model: "nn.Module", value: Any) -> "torch.Tensor":
    import torch

    if isinstance(value, str):
        return held(model, value).detach().to(torch.float64).reshape(-1)
    return torch.tensor([float(value)], dtype=torch.float64)


def chain_affine(model: "nn.Module", steps: "tuple[tuple[str, Any], ...]", channels: int
                 ) -> "tuple[torch.Tensor, torch.Tensor]":
    """The chain as one per-channel map ``y -> a * y + b``, in float64."""
    import torch

    a = torch.ones(channels, dtype=torch.float64)
    b = torch.zeros(channels, dtype=torch.float64)
    for op, value in steps:
        c = _value(model, value)
        c = c.expand(channels) if c.numel() == 1 else c
        if op == "mul":
            a, b = a * c, b * c
        elif op == "div":
            a, b = a / c, b / c
        elif op == "add":
            b = b + c
        elif op == "sub":
            b = b - c
        elif op == "rsub":
            a, b = -a, c - b
        else:
            raise BnfuseError(f"unknown affine step {op!r}")
    return a, b


class ChainPass(AffineFold, name="chain", key="chain_folds", left_key="chain_left", item=ChainFold):
    verb = "folded through an affine chain"
    title, columns = "Folded through affine steps", ("BatchNorm", "into", "steps between")

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        """Each BatchNorm the fold pass left after an affine step: folded with its chain, or its
        reason (replacing the fold pass's, which could only say what it follows)."""
        skipped = {s.norm: s for s in plan.skipped}
        for name in [s.norm for s in plan.skipped]:
            norm = model.get_submodule(name)
            calls = rec.calls.get(id(norm), [])
            rule, _ = norm_rule(norm)
            if rule is None or rule.replacement != "identity" or len(calls) != 1 or calls[0].input is None:
                continue
            block_name, _, child = name.rpartition(".")
            block = model.get_submodule(block_name) if block_name else model
            try:
                graph = trace_block(block)
            except Exception:  # noqa: BLE001 - a forward fx cannot follow: the fold pass's reason stands
                continue
            bn_node = next((n for n in graph.nodes if n.op == "call_module" and str(n.target) == child), None)
            if bn_node is None:
                continue
            channels = int(calls[0].input.shape[1]) if len(calls[0].input.shape) > 1 else 0
            layer, steps, _, why = _walk(bn_node, block, block_name, channels, len(calls[0].input.shape))
            if not steps and why is None:
                continue  # no affine step before it: the fold pass's reason stands
            producer = child_name(block_name, layer.target) if layer is not None else None
            if why is None:
                why = self._refusal(model, producer, rec, escapes)
            if why is not None:
                back, forward = skipped[name].parts
                skipped[name] = Skip.of(name, f"{back} (through the affine steps before it: {why})", forward)
                continue
            plan.of(self.name).append(ChainFold(block_name, name, producer, tuple(steps)))
            del skipped[name]
        plan.skipped = list(skipped.values())

    @staticmethod
    def _refusal(model: "nn.Module", producer: str, rec: "Recorder", escapes: "dict[int, str]") -> "str | None":
        layer = model.get_submodule(producer)
        rule, why = producer_rule(layer)
        if rule is None:
            return why
        if rule.kind != "conv" or rule.transposed:
            return f"{producer} is not a Conv (the chain is folded on axis 1)"
        calls = rec.calls.get(id(layer), [])
        if len(calls) != 1:
            return f"{producer} is called {len(calls)} times"
        out = calls[0].output
        if out is not None and id(out) in escapes:
            return f"the output of {producer} is also {escapes[id(out)]}"
        return None

    def affine(self, model: "nn.Module", it: ChainFold) -> "tuple[torch.Tensor, torch.Tensor]":
        """The BatchNorm's map after the chain's: ``s * (a * y + b) + t``."""
        s, t = norm_affine(model, it.norm)
        a, b = chain_affine(model, it.steps, s.numel())
        return s * a, s * b + t

    def remove(self, model: "nn.Module", items: "list[ChainFold]", values: bool) -> "nn.Module":
        return _cut(model, items)

    def sites(self, model: "nn.Module", items: "list[ChainFold]") -> "list[SiteSpec]":
        """The layer, then what the block's own forward computes from its output to the BatchNorm's (the
        judge replays the model's code there, not the steps this pass read)."""
        return [SiteSpec(self.name, it.producer, it.producer, (it.norm,),
                         (RunLayer(it.producer), Forward(it.block, *_ends(model, it))), (RunLayer(it.producer),))
                for it in items]

    def row(self, it: ChainFold) -> "tuple[str, ...]":
        text = {"mul": "*", "add": "+", "sub": "-", "div": "/", "rsub": "rsub"}
        return it.norm, it.producer, " ".join(f"{text[op]} {v:g}" if not isinstance(v, str) else f"{text[op]} {v}"
                                              for op, v in it.steps)


def _ends(model: "nn.Module", it: ChainFold) -> "tuple[str, str]":
    """The fx nodes of the layer's call and of the BatchNorm's in the block's forward ("" where not found)."""
    block = model.get_submodule(it.block) if it.block else model
    try:
        graph = trace_block(block)
    except Exception:  # noqa: BLE001 - not traced: the judge cannot replay the site, and says so
        return "", ""

    def node(name: str) -> str:
        calls = [n.name for n in graph.nodes if n.op == "call_module" and child_name(it.block, n.target) == name]
        return calls[0] if len(calls) == 1 else ""

    return node(it.producer), node(it.norm)


def _cut(model: "nn.Module", items: "list[ChainFold]") -> "nn.Module":
    """Each folded chain and its BatchNorm taken out of the block's forward; the model, a new root
    when the chain was in the model's own forward."""
    for name, folds in by_block(items):
        def edit(block: "nn.Module", graph: Any, name: str = name, folds: "list[ChainFold]" = folds) -> None:
            for it in folds:
                child = it.norm[len(name) + 1:] if name else it.norm
                bn_node = next((n for n in graph.nodes if n.op == "call_module" and str(n.target) == child), None)
                node = bn_node.args[0] if bn_node is not None and bn_node.args else None
                while _op(node) is not None:
                    a, b = (list(node.args) + [None, None])[:2]
                    node = a if _computed(a) else b
                if getattr(node, "op", None) != "call_module" or child_name(name, node.target) != it.producer:
                    raise BnfuseError(f"cannot find the chain before {it.norm} in the forward of {name or 'the model'}")
                bn_node.replace_all_uses_with(node)
                graph.erase_node(bn_node)

        model = rewrite_forward(model, name, edit)
    return model


CHAIN = ChainPass()

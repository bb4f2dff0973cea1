"""Find fold sites by real data flow, recorded during one forward pass.

Nothing here depends on static tracing: the model runs once on an example input while module
hooks record every call of every layer and a ``TorchFunctionMode`` records every torch
operation that reads a tensor, and inside which layer call it ran.  A BatchNorm folds into the
layer before it only when, for every call, its input is exactly that layer's output, nothing
else read that output (no residual, no concat, no return), and every call of that layer feeds
this BatchNorm.  Otherwise it may fold into the layer after it, when that layer alone reads its
output and does not zero-pad.  Everything else is reported with the reason it stays.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import BnfuseError
from .patterns import is_norm_like, norm_rule, producer_rule

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Fold", "Skip", "Plan", "Analysis", "analyse"]

#: reads that look only at a tensor's metadata, never its values
_METADATA = frozenset(
    """size dim shape dtype device ndim numel nelement __len__ is_floating_point is_complex
    stride requires_grad is_cuda layout names is_sparse is_quantized is_meta is_nested grad_fn
    is_leaf element_size get_device is_contiguous storage_offset __hash__ is_mkldnn is_xpu
    is_cpu""".split()
)


@dataclass(frozen=True)
class Fold:
    """One BatchNorm folded into one layer."""

    norm: str
    producer: str
    #: "previous": the BN reads the layer's output; "next": the layer reads the BN's output
    direction: str = "previous"
    #: what stays in the BN's place: "identity", or "activation" (timm BatchNormAct)
    replacement: str = "identity"

    def to_list(self) -> list[str]:
        return [self.producer, self.norm, self.direction, self.replacement]

    @classmethod
    def from_list(cls, row: "list[str]") -> "Fold":
        producer, norm, direction, replacement = row
        return cls(norm=norm, producer=producer, direction=direction, replacement=replacement)


@dataclass(frozen=True)
class Skip:
    """One BatchNorm left in place, and why."""

    norm: str
    reason: str


@dataclass
class Plan:
    """What would fold and what would not.  ``norms`` lists every BatchNorm-like layer found."""

    norms: list[str] = field(default_factory=list)
    folds: list[Fold] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    @property
    def folded_norms(self) -> list[str]:
        return list(dict.fromkeys(f.norm for f in self.folds))


@dataclass
class Analysis:
    plan: Plan
    #: the model's output on the example input, taken during the recording run
    output: Any


@dataclass(eq=False)
class _Call:
    module: "nn.Module"
    name: str
    input: Any = None
    output: Any = None


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name in ("__get__", "__set__"):
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


def _tensors(obj: Any) -> list["torch.Tensor"]:
    import torch
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class _Recorder:
    """Hooks and a torch function mode that record who produced and who read which tensor."""

    def __init__(self, model: "nn.Module") -> None:
        from torch.overrides import TorchFunctionMode

        self.names: dict[int, str] = {}
        for name, mod in model.named_modules():
            self.names.setdefault(id(mod), name)
        self.interesting = {
            id(m) for m in model.modules() if is_norm_like(m) or producer_rule(m)[0] is not None
        }
        self.stack: list[_Call] = []
        self.calls: dict[int, list[_Call]] = {}
        #: tensors produced by a producer or norm call, kept alive so ids stay unique
        self.produced: dict[int, _Call] = {}
        self.keep: list[Any] = []
        #: id(tensor) -> [(reader call or None, op name)] for watched tensors
        self.reads: dict[int, list[tuple["_Call | None", str]]] = {}
        #: id(param) -> owning module, for producers and norms
        self.owner: dict[int, "nn.Module"] = {}
        for m in model.modules():
            if id(m) in self.interesting:
                for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                    self.owner[id(t)] = m
        #: id(param) -> (op, reader name) for params read outside their module's call
        self.foreign_param_reads: dict[int, tuple[str, str]] = {}
        #: id(tensor) -> (weakref, op name, module name), to explain where a BN input came from
        self.origin: dict[int, tuple[Any, str, str]] = {}
        self.handles: list[Any] = []
        recorder = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                kwargs = kwargs or {}
                op = _op_name(func)
                if op not in _METADATA:
                    recorder._on_read(op, args, kwargs)
                out = func(*args, **kwargs)
                if op not in _METADATA:
                    recorder._on_result(op, out)
                return out

        self.mode = _Mode()
        for mod in model.modules():
            self.handles.append(mod.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._post, with_kwargs=True))

    def _pre(self, module: "nn.Module", args: Any, kwargs: Any) -> None:
        call = _Call(module, self.names.get(id(module), type(module).__name__))
        if id(module) in self.interesting:
            first = args[0] if args else next(iter(kwargs.values()), None)
            call.input = first
            self.keep.append(first)
            self.calls.setdefault(id(module), []).append(call)
        self.stack.append(call)

    def _post(self, module: "nn.Module", args: Any, kwargs: Any, output: Any) -> None:
        call = self.stack.pop() if self.stack else None
        if call is None or call.module is not module:  # unbalanced: a hook was skipped
            raise BnfuseError(
                f"module call records of {type(module).__name__} are out of order during the "
                "analysis run; the model calls layers in a way bnfuse cannot follow"
            )
        if id(module) in self.interesting:
            call.output = output
            self.keep.append(output)
            import torch

            if isinstance(output, torch.Tensor):
                self.produced[id(output)] = call
                self.reads.setdefault(id(output), [])

    def _on_read(self, op: str, args: Any, kwargs: Any) -> None:
        reader = self.stack[-1] if self.stack else None
        for t in _tensors((args, kwargs)):
            key = id(t)
            if key in self.reads:
                self.reads[key].append((reader, op))
            owner = self.owner.get(key)
            if owner is not None and key not in self.foreign_param_reads:
                if not any(c.module is owner for c in self.stack):
                    where = reader.name if reader is not None else "the model's forward"
                    self.foreign_param_reads[key] = (op, where or "the model's forward")

    def _on_result(self, op: str, out: Any) -> None:
        where = self.stack[-1].name if self.stack else ""
        for t in _tensors(out):
            try:
                self.origin[id(t)] = (weakref.ref(t), op, where)
            except TypeError:
                pass

    def describe_origin(self, t: Any) -> str:
        rec = self.origin.get(id(t))
        if rec is None or rec[0]() is not t:
            return "reads a tensor not computed inside the model (the model input)"
        _, op, where = rec
        return f"follows {op} in {where or 'the model forward'}, not a Conv/Linear output"

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _zero_pads(conv: Any) -> bool:
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        return False
    pad = conv.padding
    if isinstance(pad, str):
        return pad != "valid" and any(conv._reversed_padding_repeated_twice)
    return any(p != 0 for p in pad)


def _producer_problem(module: "nn.Module", rec: _Recorder) -> "str | None":
    """Why this producer cannot absorb a fold, or None."""
    from torch.nn.utils import parametrize

    name = rec.names.get(id(module), "?")
    rule, reason = producer_rule(module)
    if rule is None:
        return f"{name}: {reason}"
    if parametrize.is_parametrized(module):
        return f"{name} has a weight re-parametrisation (torch.nn.utils.parametrize) that recomputes its weight"
    hooks = [h for h in module._forward_pre_hooks.values() if getattr(h, "__self__", None) is not rec]
    if hooks:
        return f"{name} has forward pre-hooks (weight_norm or similar) that may recompute its weight"
    if [h for h in module._forward_hooks.values() if getattr(h, "__self__", None) is not rec]:
        return f"{name} has forward hooks that may change its output"
    for p in module.parameters(recurse=False):
        if id(p) in rec.foreign_param_reads:
            op, where = rec.foreign_param_reads[id(p)]
            return f"{name}'s parameters are also read by {op} in {where}"
    return None


def _norm_problem(module: "nn.Module", rec: _Recorder) -> "str | None":
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if id(t) in rec.foreign_param_reads:
            op, where = rec.foreign_param_reads[id(t)]
            return f"its parameters or statistics are also read by {op} in {where}"
    if [h for h in module._forward_hooks.values() if getattr(h, "__self__", None) is not rec]:
        return "it has forward hooks that may change its output"
    return None


def _channels(module: Any) -> int:
    return int(getattr(module, "num_features", getattr(module, "weight").numel()))


def _try_previous(norm: "nn.Module", calls: list[_Call], rec: _Recorder, out_ids: set[int]) -> "tuple[list[nn.Module], str | None]":
    """Producers this norm folds into, or the reason it cannot fold backward."""
    producers: list["nn.Module"] = []
    norm_inputs = {id(c.input) for c in calls}
    for call in calls:
        x = call.input
        pcall = rec.produced.get(id(x))
        if pcall is None or id(pcall.module) not in rec.interesting or is_norm_like(pcall.module):
            return [], rec.describe_origin(x)
        pname = pcall.name
        others = [(r, op) for r, op in rec.reads.get(id(x), []) if r is not call]
        if others:
            r, op = others[0]
            return [], f"output of {pname} is also read by {op} in {r.name if r else 'the model forward'}"
        if id(x) in out_ids:
            return [], f"output of {pname} is also returned by the model"
        if pcall.module not in producers:
            producers.append(pcall.module)
    for p in producers:
        pname = rec.names.get(id(p), "?")
        pcalls = rec.calls.get(id(p), [])
        if any(id(c.output) not in norm_inputs for c in pcalls):
            return [], f"{pname} is called {len(pcalls)} times and not every output feeds this BatchNorm"
        problem = _producer_problem(p, rec)
        if problem:
            return [], problem
        rule, _ = producer_rule(p)
        for c in pcalls:
            out = c.output
            if rule.kind == "linear" and out.dim() != 2:
                return [], (
                    f"{pname} output is {out.dim()}-D: {type(norm).__name__} normalises dim 1, "
                    "not the Linear's feature axis"
                )
            if out.dim() < 2 or out.shape[1] != _channels(norm):
                return [], f"{pname} output has {out.shape[1] if out.dim() > 1 else '?'} channels, the BatchNorm {_channels(norm)}"
    return producers, None


def _try_next(norm: "nn.Module", calls: list[_Call], rec: _Recorder, out_ids: set[int], replacement: str) -> "tuple[nn.Module | None, str | None]":
    """The layer after this norm that it folds into, or the reason it cannot fold forward."""
    target: "nn.Module | None" = None
    norm_outputs = {id(c.output) for c in calls}
    for call in calls:
        y = call.output
        readers = rec.reads.get(id(y), [])
        if id(y) in out_ids:
            return None, "its output is returned by the model"
        if not readers:
            return None, "its output is not read by any layer"
        r0, op0 = readers[0]
        if r0 is None or id(r0.module) not in rec.interesting or is_norm_like(r0.module) or r0.input is not y:
            return None, None  # not followed by a Conv/Linear: no forward candidate at all
        others = [(r, op) for r, op in readers if r is None or r.module is not r0.module]
        if others:
            r, op = others[0]
            return None, f"its output also feeds {op} in {r.name if r else 'the model forward'}"
        if target is not None and r0.module is not target:
            return None, "its outputs feed different layers"
        target = r0.module
    if target is None:
        return None, None
    tname = rec.names.get(id(target), "?")
    if replacement != "identity":
        return None, f"it applies an activation before {tname}, so it cannot fold into it"
    rule, _ = producer_rule(target)
    if rule is None or not rule.next_ok:
        return None, f"folding forward into {type(target).__name__} {tname} is not supported"
    if any(id(c.input) not in norm_outputs for c in rec.calls.get(id(target), [])):
        return None, f"{tname} is called on other inputs too"
    problem = _producer_problem(target, rec)
    if problem:
        return None, problem
    if rule.kind == "conv" and _zero_pads(target):
        return None, f"zero padding in following conv {tname}: padding pads the un-normalised signal, so folding forward is not exact"
    for c in calls:
        if rule.kind == "linear" and c.output.dim() != 2:
            return None, f"following Linear {tname} reads a {c.output.dim()}-D tensor: its feature axis is not the BatchNorm's channel axis"
    return target, None


def analyse(model: "nn.Module", args: tuple[Any, ...], kwargs: "dict[str, Any] | None" = None) -> Analysis:
    """Run ``model(*args, **kwargs)`` once under recording and return the fold plan and output.

    The model must already be in eval mode.  Nothing is changed.
    """
    import torch

    if model.training:
        raise BnfuseError("the model is in training mode: call model.eval() before analysing it")
    rec = _Recorder(model)
    try:
        with torch.no_grad(), rec.mode:
            output = model(*args, **(kwargs or {}))
    finally:
        rec.close()
    out_ids = {id(t) for t in _tensors(output)}
    plan = Plan()
    seen: set[int] = set()
    used_producers: set[int] = set()
    for name, module in model.named_modules():
        if not is_norm_like(module) or id(module) in seen:
            continue
        seen.add(id(module))
        plan.norms.append(name)
        rule, reason = norm_rule(module)
        if rule is None:
            plan.skipped.append(Skip(name, reason or "not foldable"))
            continue
        calls = rec.calls.get(id(module), [])
        if not calls:
            plan.skipped.append(Skip(name, "never called on the example input (unused, or in a branch not taken)"))
            continue
        problem = _norm_problem(module, rec)
        if problem:
            plan.skipped.append(Skip(name, problem))
            continue
        producers, back_reason = _try_previous(module, calls, rec, out_ids)
        if producers and not any(id(p) in used_producers for p in producers):
            for p in producers:
                used_producers.add(id(p))
                plan.folds.append(Fold(name, rec.names[id(p)], "previous", rule.replacement))
            continue
        target, next_reason = _try_next(module, calls, rec, out_ids, rule.replacement)
        if target is not None:
            plan.folds.append(Fold(name, rec.names[id(target)], "next", rule.replacement))
            continue
        plan.skipped.append(Skip(name, next_reason or back_reason or "not foldable"))
    return Analysis(plan=plan, output=output)

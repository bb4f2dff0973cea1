"""Find fold sites by real data flow, recorded during one forward pass.

Nothing here depends on static tracing: the model runs once on an example input while module
hooks record every call of every layer and a ``TorchFunctionMode`` records every torch
operation that reads a tensor, and inside which layer call it ran.  A BatchNorm folds into the
layer before it only when, for every call, its input is exactly that layer's output (or a
reshape of it that keeps the channel axis, or a channel-axis cat of several layers' outputs,
each then taking its slice of the statistics), nothing else read that output (no residual, no
other concat, no return), and every call of that layer feeds this BatchNorm.  Otherwise it may
fold into the layer after it, when that layer alone reads its output and does not zero-pad.
Everything else is reported with the reason it stays.

Tensors are remembered by what the analysis needs (identity, shape, dtype), never kept alive:
the recording run holds no more activations than a plain forward pass.  A tensor is known by
its Python object while that lives (a weak reference guards against a reused ``id``).

Reads are attributed to the innermost module call running; an in-place op returns the tensor
it changed, so its read lands on that same tensor and blocks a fold (conservative).  Ops that
return their argument untouched (``.to`` to the same dtype, dropout in eval) are not reads.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import BnfuseError
from .patterns import is_norm_like, is_producer_like, norm_rule, producer_row, producer_rule

if TYPE_CHECKING:
    from typing import Callable

    import torch
    from torch import nn

    InputCallback = Callable[[str, "nn.Module", Any], None]

__all__ = ["Fold", "Skip", "Plan", "Analysis", "analyse"]

#: reads that look only at a tensor's metadata, never its values
_METADATA = frozenset(
    """size dim shape dtype device ndim numel nelement __len__ is_floating_point is_complex
    stride requires_grad is_cuda layout names is_sparse is_quantized is_meta is_nested grad_fn
    is_leaf element_size get_device is_contiguous storage_offset __hash__ is_mkldnn is_xpu
    is_cpu""".split()
)

#: ops that return their first argument itself when there is nothing to do (same dtype, already
#: contiguous, dropout in eval): then nothing new was read or made, and nothing is recorded
_PASSTHROUGH = frozenset(
    """to type_as contiguous float double half bfloat16 cpu cuda type dropout dropout1d dropout2d
    dropout3d alpha_dropout feature_alpha_dropout""".split()
)
#: ops that look only at their arguments' shape, dtype and device (their result is recorded)
_VALUE_FREE = frozenset(
    "new_zeros new_ones new_empty new_full zeros_like ones_like empty_like full_like rand_like randn_like".split()
)
#: ops that read the values of their first argument only (the second gives a dtype or shape)
_SELF_ONLY = frozenset("type_as reshape_as view_as expand_as".split())
#: reshapes that can keep a producer's channel axis as axis 1 of a 2-D BatchNorm1d input
#: (levit's ``bn(linear(x).flatten(0, 1))``); results of these on a producer output are watched
_RESHAPES = frozenset("flatten reshape view squeeze unsqueeze".split())
#: concatenations; a cat of producer outputs along axis 1 is watched (MixNet's MixedConv2d)
_CATS = frozenset("cat concat concatenate".split())


@dataclass(frozen=True)
class Fold:
    """One BatchNorm folded into one layer."""

    norm: str
    producer: str
    #: "previous": the BN reads the layer's output; "next": the layer reads the BN's output
    direction: str = "previous"
    #: what stays in the BN's place: "identity", or "activation" (timm BatchNormAct)
    replacement: str = "identity"
    #: the BN channels ``[start, stop)`` this producer gives, when a concatenation of several
    #: producers feeds the BN (MixNet's MixedConv2d); None: all of them
    channels: "tuple[int, int] | None" = None

    def to_list(self) -> list[str]:
        row = [self.producer, self.norm, self.direction, self.replacement]
        if self.channels is not None:
            row += [str(self.channels[0]), str(self.channels[1])]
        return row

    @classmethod
    def from_list(cls, row: "list[str]") -> "Fold":
        producer, norm, direction, replacement, *rest = row
        channels = (int(rest[0]), int(rest[1])) if len(rest) == 2 else None
        return cls(norm=norm, producer=producer, direction=direction, replacement=replacement, channels=channels)


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
class _T:
    """What the analysis remembers of a tensor: its identity (this object), shape and dtype,
    and, for a BatchNorm input, where it came from (for messages)."""

    shape: tuple[int, ...]
    dtype: Any
    origin: "str | None" = None

    def dim(self) -> int:
        return len(self.shape)


@dataclass(eq=False)
class _Call:
    module: "nn.Module"
    name: str
    #: the first argument and the result, when they are tensors
    input: "_T | None" = None
    output: "_T | None" = None
    #: the module's training flag during this call (a model may switch a BN to train itself)
    training: bool = False


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name in ("__get__", "__set__"):
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


#: operator names whose ``__iop__``/``__rop__`` forms are the same operation for a reader
_BINARY_OPS = frozenset(
    "add sub mul truediv floordiv div matmul mod pow and or xor lshift rshift".split()
)
_OP_WORDS = {"truediv": "div", "floordiv": "floor_divide", "getitem": "indexing", "setitem": "index assignment"}


def _pretty_op(op: str) -> str:
    """A readable name for a recorded op: ``__add__``/``__iadd__``/``__radd__``/``add_`` ->
    ``add``, ``relu_`` -> ``relu``, ``__getitem__`` -> ``indexing``."""
    name = op
    if op.startswith("__") and op.endswith("__") and len(op) > 4:
        name = op[2:-2]
        if name[:1] in ("i", "r") and name[1:] in _BINARY_OPS:
            name = name[1:]
    elif op.endswith("_") and not op.startswith("_"):
        name = op.rstrip("_")
    return _OP_WORDS.get(name, name)


def _where(call: "_Call | None") -> str:
    return call.name if call is not None and call.name else "the model forward"


def _reachable_tensors(obj: Any, *, limit: int = 20000) -> list["torch.Tensor"]:
    """Every tensor inside ``obj``: containers, dataclasses and plain objects' attributes.

    For what the model returns or keeps on its modules (a dataclass or a custom output class
    that pytree does not know still hands the tensor to the caller).  Modules are not entered;
    at most ``limit`` objects are visited.
    """
    import dataclasses

    import torch
    from torch import nn

    found: list["torch.Tensor"] = []
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = [(obj, 0)]
    visited = 0
    while todo and visited < limit:
        o, depth = todo.pop()
        visited += 1
        if isinstance(o, torch.Tensor):
            found.append(o)
            continue
        if depth > 8 or id(o) in seen or isinstance(o, (str, bytes, int, float, bool, nn.Module, type)) or o is None:
            continue
        seen.add(id(o))
        if isinstance(o, dict):
            children = list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            children = list(o)
        elif dataclasses.is_dataclass(o):
            children = [getattr(o, f.name, None) for f in dataclasses.fields(o)]
        elif hasattr(o, "__dict__") and not callable(o):
            children = list(vars(o).values())
        else:
            continue
        todo.extend((c, depth + 1) for c in children)
    return found


def _escapes(model: "nn.Module", output: Any, rec: "_Recorder") -> dict[int, str]:
    """id(tensor record) -> how the tensor leaves the forward pass other than through an op:
    returned by the model, or kept as an attribute of one of its modules (``self.feat = y``)."""
    from torch import nn

    escapes: dict[int, str] = {}

    def mark(t: Any, why: str) -> None:
        info = rec.lookup(t)
        if info is not None:
            escapes.setdefault(id(info), why)

    for t in _reachable_tensors(output):
        mark(t, "returned by the model")
    internal = set(vars(nn.Module()))
    for name, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if attr in internal or value is None or isinstance(value, (nn.Module, str, int, float, bool)):
                continue
            where = f"{name}.{attr}" if name else attr
            for t in _reachable_tensors(value, limit=2000):
                mark(t, f"kept in the attribute {where}")
    return escapes


def _tensors(obj: Any) -> list["torch.Tensor"]:
    """The tensors in an op's arguments or result (tuples, lists and dicts of them).

    Called for every recorded op, so a plain loop rather than pytree (several times faster).
    """
    import torch

    found: list["torch.Tensor"] = []
    todo = [obj]
    while todo:
        o = todo.pop()
        if isinstance(o, torch.Tensor):
            found.append(o)
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
        elif isinstance(o, dict):
            todo.extend(o.values())
    return found


class _Recorder:
    """Hooks and a torch function mode that record who produced and who read which tensor."""

    def __init__(self, model: "nn.Module", on_input: "InputCallback | None" = None) -> None:
        from torch.overrides import TorchFunctionMode

        #: called with (name, module, first input) at every producer or norm call, outside the
        #: recording (the judge keeps a crop of it for its per-site check)
        self.on_input = on_input

        self.names: dict[int, str] = {}
        #: producers and norms; every producer class is recorded, foldable or not, so a BN after a
        #: re-parametrised or subclassed conv is reported against that conv, not as "not a Conv output"
        self.interesting: set[int] = set()
        self.stack: list[_Call] = []
        self.calls: dict[int, list[_Call]] = {}
        #: id(tensor) -> (weak reference, record) for the tensors the analysis remembers
        self._live: dict[int, tuple[Any, _T]] = {}
        #: every record made (records are small; this keeps their ids unique)
        self.records: list[_T] = []
        #: id(record) -> the producer or norm call whose result it is
        self.produced: dict[int, _Call] = {}
        #: id(record) -> [(reader call or None, readable op name)] for watched tensors
        self.reads: dict[int, list[tuple["_Call | None", str]]] = {}
        #: id(param or buffer) -> [(id(module), qualified name)] over every module holding it
        self.holders: dict[int, list[tuple[int, str]]] = {}
        #: storage address -> qualified names of the parameters and buffers using it
        self.storages: dict[int, list[str]] = {}
        #: id(param) -> ids of the producers and norms holding it (their calls may read it)
        self.owner: dict[int, set[int]] = {}
        seen_tensors: set[int] = set()
        for name, m in model.named_modules(remove_duplicate=False):  # one pass, shared modules included
            first_visit = id(m) not in self.names
            if first_visit:
                self.names[id(m)] = name
                if is_norm_like(m) or is_producer_like(m):
                    self.interesting.add(id(m))
            for attr, t in (*m._parameters.items(), *m._buffers.items()):
                if t is None:
                    continue
                qual = f"{name}.{attr}" if name else attr
                if first_visit:
                    self.holders.setdefault(id(t), []).append((id(m), qual))
                    if id(m) in self.interesting:
                        self.owner.setdefault(id(t), set()).add(id(m))
                if id(t) in seen_tensors or t.device.type == "meta":
                    continue
                seen_tensors.add(id(t))
                try:
                    ptr = t.untyped_storage().data_ptr()
                except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
                    continue
                if ptr:
                    self.storages.setdefault(ptr, []).append(qual)
        #: id(param) -> (op, reader name) for params read outside their module's call
        self.foreign_param_reads: dict[int, tuple[str, str]] = {}
        #: id(tensor) -> (weakref, op name, module name), to explain where a BN input came from
        self.origin: dict[int, tuple[Any, str, str]] = {}
        #: id(record) -> (producer output record, op) for a reshape of a producer output (watched)
        self.reshaped: dict[int, tuple[_T, str]] = {}
        #: id(record) -> (part records, dim) for a cat whose every part is a producer output (watched)
        self.cats: dict[int, tuple[tuple[_T, ...], Any]] = {}
        self.handles: list[Any] = []
        recorder = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                kwargs = kwargs or {}
                op = _op_name(func)
                out = func(*args, **kwargs)
                if op in _METADATA:
                    return out
                if kwargs.get("inplace") is True:  # F.relu(x, inplace=True) & co: a write
                    op = op + "_"
                elif op in _PASSTHROUGH and args and out is args[0]:
                    return out
                # recorded after the call: an op runs with the mode off, so nothing nests
                if op not in _VALUE_FREE:
                    recorder._on_read(op, args[:1] if op in _SELF_ONLY else args, kwargs)
                recorder._on_result(op, out)
                if op in _RESHAPES or op in _CATS:
                    recorder._on_layout_op(op, args, kwargs, out)
                return out

        self.mode = _Mode()
        import torch

        scripted = False
        for mod in model.modules():
            if isinstance(mod, torch.jit.ScriptModule):  # hooks are refused; see _script_pre
                scripted = True
                continue
            self.handles.append(mod.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._post, with_kwargs=True))
        if scripted:
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

            self.handles.append(register_module_forward_pre_hook(self._script_pre))
            self.handles.append(register_module_forward_hook(self._script_post))

    def lookup(self, t: Any) -> "_T | None":
        """The record of tensor ``t``, if the analysis made one (and ``t`` is that tensor)."""
        entry = self._live.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def track(self, t: Any) -> "_T | None":
        """The record of tensor ``t``, made on first sight; None for anything but a tensor."""
        import torch

        if not isinstance(t, torch.Tensor):
            return None
        info = self.lookup(t)
        if info is None:
            info = _T(tuple(t.shape), t.dtype)
            self._live[id(t)] = (weakref.ref(t), info)
            self.records.append(info)
        return info

    def _script_pre(self, module: "nn.Module", args: Any) -> None:
        """A TorchScript submodule runs without torch function calls we can see: count every
        tensor handed to it as read by it (conservative), and what it returns as its result."""
        import torch

        if isinstance(module, torch.jit.ScriptModule) and id(module) in self.names:
            reader = _Call(module, self.names[id(module)] or type(module).__name__)
            for t in _tensors(args):
                info = self.lookup(t)
                if info is not None and id(info) in self.reads:
                    self.reads[id(info)].append((reader, "TorchScript forward"))

    def _script_post(self, module: "nn.Module", args: Any, output: Any) -> None:
        import torch

        if isinstance(module, torch.jit.ScriptModule) and id(module) in self.names:
            where = self.names[id(module)]
            for t in _tensors(output):
                try:
                    self.origin[id(t)] = (weakref.ref(t), "TorchScript forward", where)
                except TypeError:
                    pass

    def _pre(self, module: "nn.Module", args: Any, kwargs: Any) -> None:
        call = _Call(module, self.names.get(id(module), type(module).__name__), training=module.training)
        if id(module) in self.interesting:
            first = args[0] if args else next(iter(kwargs.values()), None)
            call.input = self.track(first)
            if call.input is not None and call.input.origin is None:
                call.input.origin = self.describe_origin(first)
            if self.on_input is not None:
                import torch

                with torch._C.DisableTorchFunction():  # the callback's reads are not the model's
                    self.on_input(call.name, module, first)
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
            call.output = self.track(output)
            if call.output is not None:
                self.produced[id(call.output)] = call
                self.reads.setdefault(id(call.output), [])

    def _on_read(self, op: str, args: Any, kwargs: Any) -> None:
        reader = self.stack[-1] if self.stack else None
        for t in _tensors((args, kwargs)):
            key = id(t)
            info = self.lookup(t)
            if info is not None and id(info) in self.reads:
                self.reads[id(info)].append((reader, _pretty_op(op)))
            owners = self.owner.get(key)
            if owners is not None and key not in self.foreign_param_reads:
                if not any(id(c.module) in owners for c in self.stack):
                    self.foreign_param_reads[key] = (_pretty_op(op), _where(reader))

    def _on_result(self, op: str, out: Any) -> None:
        where = self.stack[-1].name if self.stack else ""
        for t in _tensors(out):
            try:
                self.origin[id(t)] = (weakref.ref(t), op, where)
            except TypeError:
                pass

    def _on_layout_op(self, op: str, args: Any, kwargs: Any, out: Any) -> None:
        """Watch a reshape or cat of producer outputs: a BN may still fold through it."""
        import torch

        if not isinstance(out, torch.Tensor):
            return
        if op in _RESHAPES:
            src = self.lookup(args[0]) if args else None
            if src is None or args[0] is out or id(src) not in self.produced:
                return
            info = self.track(out)
            self.reshaped[id(info)] = (src, op)
        else:
            parts = args[0] if args else kwargs.get("tensors")
            if not isinstance(parts, (list, tuple)) or not parts:
                return
            infos = [self.lookup(p) for p in parts]
            if any(i is None or id(i) not in self.produced for i in infos):
                return
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            info = self.track(out)
            self.cats[id(info)] = (tuple(infos), dim)  # type: ignore[arg-type]
        self.reads.setdefault(id(info), [])

    def describe_origin(self, t: Any) -> str:
        """Where tensor ``t`` (alive) came from, for the reason a BatchNorm reading it stays.
        A tensor record carries the description made while its tensor was alive."""
        if isinstance(t, _T):
            return t.origin or "reads a tensor bnfuse did not see being made"
        rec = self.origin.get(id(t))
        if rec is None or rec[0]() is not t:
            return "reads a tensor not computed inside the model (the model input)"
        _, op, where = rec
        return f"follows {_pretty_op(op)} in {where or 'the model forward'}, not a Conv/Linear output"

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


def _shared_with(module: "nn.Module", rec: _Recorder) -> "str | None":
    """A message when a parameter of ``module`` is also held by another module (tied weights)."""
    for attr, t in module._parameters.items():
        if t is None:
            continue
        holders = rec.holders.get(id(t), [])
        others = [n for mid, n in holders if mid != id(module)]
        if others:
            mine = next((n for mid, n in holders if mid == id(module)), attr)
            return (
                f"{mine} is shared with {', '.join(others)} (tied weights): folding would change "
                "the other layer too"
            )
        try:
            users = rec.storages.get(t.untyped_storage().data_ptr(), [])
        except (RuntimeError, NotImplementedError):
            users = []
        if len(users) > 1:
            mine = next((n for mid, n in holders if mid == id(module)), attr)
            others = [n for n in users if n != mine]
            return (
                f"{mine} shares memory with {', '.join(others)}: folding writes the weight in "
                "place and would change them too"
            )
    return None


def _foreign_read(module: "nn.Module", rec: _Recorder) -> "str | None":
    """A message when a parameter or buffer of ``module`` was read outside its own calls."""
    for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
        if t is not None and id(t) in rec.foreign_param_reads:
            op, where = rec.foreign_param_reads[id(t)]
            mname = rec.names.get(id(module), "")
            return f"{mname + '.' if mname else ''}{attr} is also read by {op} in {where}"
    return None


def _user_hooks(hooks: Any, rec: _Recorder) -> list[Any]:
    return [h for h in hooks.values() if getattr(h, "__self__", None) is not rec]


def _producer_problem(module: "nn.Module", rec: _Recorder) -> "str | None":
    """Why this producer cannot absorb a fold, or None.

    Checked in the order that gives the most useful message: re-parametrisations first (their
    class and weight attribute are synthetic), then the class itself, then sharing and hooks.
    """
    from torch.nn.utils import parametrize
    from torch.nn.utils.weight_norm import WeightNorm

    name = rec.names.get(id(module), "?")
    if parametrize.is_parametrized(module):
        which = ", ".join(module.parametrizations.keys())
        return (
            f"{name} has a re-parametrised {which} (torch.nn.utils.parametrize, e.g. "
            "parametrizations.weight_norm): it is recomputed on every call, so a folded weight "
            "would be overwritten; remove the parametrisation first"
        )
    pre_hooks = _user_hooks(module._forward_pre_hooks, rec)
    if any(isinstance(h, WeightNorm) for h in pre_hooks):
        return (
            f"{name} uses weight_norm (torch.nn.utils.weight_norm): its weight is recomputed from "
            "weight_g and weight_v on every call, so a folded weight would be overwritten; "
            "call torch.nn.utils.remove_weight_norm first"
        )
    rule, reason = producer_rule(module)
    if rule is None:
        return f"{name}: {reason}"
    if pre_hooks:
        return f"{name} has forward pre-hooks (spectral_norm or similar) that may recompute its weight"
    if _user_hooks(module._forward_hooks, rec):
        return f"{name} has forward hooks that may change its output"
    return _shared_with(module, rec) or _foreign_read(module, rec)


def _norm_problem(module: "nn.Module", rec: _Recorder) -> "str | None":
    """Why this norm cannot be removed whatever layer it is next to, or None."""
    problem = _foreign_read(module, rec)
    if problem:
        return problem
    if _user_hooks(module._forward_pre_hooks, rec):
        return "it has forward pre-hooks that may change its input"
    if _user_hooks(module._forward_hooks, rec):
        return "it has forward hooks that may change its output"
    return None


def _channels(module: Any) -> int:
    n = getattr(module, "num_features", None)
    if n is None:
        stat = getattr(module, "running_mean", None)
        n = stat.numel() if stat is not None else module.weight.numel()
    return int(n)


@dataclass
class _Segment:
    """A producer call whose output gives the norm's channels ``[start, stop)``."""

    call: _Call
    #: the producer's output tensor
    src: Any
    start: int
    stop: int
    #: the op between producer and norm ("flatten", "cat", ...), None when the norm reads it directly
    via: "str | None" = None


def _segments(x: Any, norm: "nn.Module", rec: _Recorder) -> "tuple[list[_Segment] | None, str | None]":
    """How the norm's input ``x`` is made of producer outputs, or why it is not.

    Three shapes fold exactly: ``x`` is a producer output; ``x`` is a reshape of one that keeps
    its channel axis as axis 1 of a 2-D ``x``; ``x`` is a cat of producer outputs along axis 1.
    """
    import math

    channels = _channels(norm)
    pcall = rec.produced.get(id(x))
    if pcall is not None:
        if is_norm_like(pcall.module):
            return None, rec.describe_origin(x)
        return [_Segment(pcall, x, 0, channels)], None
    if id(x) in rec.reshaped:
        src, op = rec.reshaped[id(x)]
        pcall = rec.produced[id(src)]
        row = producer_row(pcall.module)
        if is_norm_like(pcall.module) or row is None:
            return None, rec.describe_origin(x)
        # a row-major reshape keeps "BN axis 1 <-> producer channel axis" exactly when the
        # dims after axis 1 of x (and, for a conv, after its channel axis) all have size 1
        if x.dim() < 2 or math.prod(x.shape[2:]) != 1:
            keeps = False
        elif row.kind == "linear":
            keeps = src.dim() >= 1 and x.shape[1] == src.shape[-1]
        else:
            keeps = src.dim() >= 2 and tuple(x.shape[:2]) == tuple(src.shape[:2]) and math.prod(src.shape[2:]) == 1
        if not keeps or x.dtype != src.dtype:
            return None, (
                f"follows {_pretty_op(op)} of {pcall.name}'s output {tuple(src.shape)} to "
                f"{tuple(x.shape)}, which does not keep its channel axis as the BatchNorm's axis 1"
            )
        return [_Segment(pcall, src, 0, channels, _pretty_op(op))], None
    if id(x) in rec.cats:
        parts, dim = rec.cats[id(x)]
        if not isinstance(dim, int) or dim % max(x.dim(), 1) != 1:
            return None, rec.describe_origin(x) + f" (a cat along axis {dim}, not the channel axis)"
        segs: list[_Segment] = []
        offset = 0
        for part in parts:
            pcall = rec.produced[id(part)]
            row = producer_row(pcall.module)
            if is_norm_like(pcall.module) or row is None:
                return None, rec.describe_origin(x)
            if part.dim() != x.dim() or (row.kind == "linear" and part.dim() != 2):
                return None, rec.describe_origin(x) + f" ({pcall.name}'s channel axis is not axis 1)"
            segs.append(_Segment(pcall, part, offset, offset + int(part.shape[1]), "cat"))
            offset += int(part.shape[1])
        return segs, None
    return None, rec.describe_origin(x)


def _other_reader(
    reads: list[tuple["_Call | None", str]], norm: "nn.Module", via: "str | None"
) -> "tuple[_Call | None, str] | None":
    """The first read of a tensor by anything but the norm (or, for a tensor the norm reads
    through a reshape or cat, anything but that one op), or None."""
    if via is None:
        return next(((r, op) for r, op in reads if r is None or r.module is not norm), None)
    if len(reads) <= 1:
        return None
    return next(((r, op) for r, op in reads if op != via), reads[1])


def _try_previous(
    norm: "nn.Module", calls: list[_Call], rec: _Recorder, out_ids: dict[int, str]
) -> "tuple[list[tuple[nn.Module, tuple[int, int]]], str | None, bool]":
    """Producers this norm folds into, each with the norm channels it gives, or why it cannot
    fold backward.

    The third value says whether a Conv/Linear produced the norm's input at all (so the reason
    is about that layer) rather than something else (an activation, the model input).
    """
    ranges: dict[int, tuple[int, int]] = {}
    producers: list["nn.Module"] = []
    fed: dict[int, _Segment] = {}
    for call in calls:
        x = call.input
        segs, why = _segments(x, norm, rec)
        if segs is None:
            return [], why, False
        via = segs[0].via
        if via is not None:  # the reshaped or concatenated tensor itself
            other = _other_reader(rec.reads.get(id(x), []), norm, None)
            what = f"the {via} of {', '.join(dict.fromkeys(s.call.name for s in segs))}"
            if other is not None:
                return [], f"{what} is also read by {other[1]} in {_where(other[0])}", True
            if id(x) in out_ids:
                return [], f"{what} is also {out_ids[id(x)]}", True
        for seg in segs:
            pname = seg.call.name
            other = _other_reader(rec.reads.get(id(seg.src), []), norm, via)
            if other is not None:
                return [], f"output of {pname} is also read by {other[1]} in {_where(other[0])}", True
            if id(seg.src) in out_ids:
                return [], f"output of {pname} is also {out_ids[id(seg.src)]}", True
            p = seg.call.module
            if ranges.setdefault(id(p), (seg.start, seg.stop)) != (seg.start, seg.stop):
                return [], f"{pname} gives different channels of this BatchNorm on different calls", True
            fed[id(seg.src)] = seg
            if p not in producers:
                producers.append(p)
    channels = _channels(norm)
    for p in producers:
        pname = rec.names.get(id(p), "?")
        pcalls = rec.calls.get(id(p), [])
        if any(id(c.output) not in fed for c in pcalls):
            return [], f"{pname} is called {len(pcalls)} times and not every output feeds this BatchNorm", True
        problem = _producer_problem(p, rec)
        if problem:
            return [], problem, True
        rule, _ = producer_rule(p)
        for c in pcalls:
            out, seg = c.output, fed[id(c.output)]
            if seg.via not in (None, "cat"):
                continue  # a reshape: its channel axis was checked in _segments
            if rule.kind == "linear" and out.dim() != 2:
                return [], (
                    f"{pname} output is {out.dim()}-D {tuple(out.shape)}: {type(norm).__name__} "
                    "normalises axis 1, not the Linear's feature axis (the last one)"
                ), True
            want = seg.stop - seg.start
            if out.dim() < 2 or out.shape[1] != want or (seg.via is None and want != channels):
                got = out.shape[1] if out.dim() > 1 else "?"
                return [], f"{pname} output has {got} channels, the BatchNorm {channels}", True
    if max(stop for _, stop in ranges.values()) != channels:
        names = ", ".join(rec.names.get(id(p), "?") for p in producers)
        return [], f"the cat of {names} does not give the BatchNorm's {channels} channels", True
    return [(p, ranges[id(p)]) for p in producers], None, True


def _try_next(
    norm: "nn.Module", calls: list[_Call], rec: _Recorder, out_ids: dict[int, str], replacement: str
) -> "tuple[nn.Module | None, str | None]":
    """The layer after this norm that it folds into, or the reason it cannot fold forward.

    The reason is None when no Conv/Linear reads the norm's output at all (no candidate).
    """
    if replacement != "identity":
        return None, None  # drop/activation after the norm: never a forward candidate
    target: "nn.Module | None" = None
    norm_outputs = {id(c.output) for c in calls}
    problems: list[str] = []
    for call in calls:
        y = call.output
        readers = rec.reads.get(id(y), [])
        if not readers:
            return None, None
        r0, op0 = readers[0]
        if r0 is None or id(r0.module) not in rec.interesting or is_norm_like(r0.module) or r0.input is not y:
            return None, None  # not followed by a Conv/Linear: no forward candidate at all
        if target is not None and r0.module is not target:
            return None, "its outputs feed different layers"
        target = r0.module
        others = [(r, op) for r, op in readers if r is None or r.module is not r0.module]
        if others:
            r, op = others[0]
            problems.append(f"its output also feeds {op} in {_where(r)}")
        elif id(y) in out_ids:
            problems.append(f"its output is also {out_ids[id(y)]}")
    if target is None:
        return None, None
    if problems:
        return None, problems[0]
    tname = rec.names.get(id(target), "?")
    if any(id(c.input) not in norm_outputs for c in rec.calls.get(id(target), [])):
        return None, f"{tname} is called on other inputs too"
    problem = _producer_problem(target, rec)
    if problem:
        return None, problem
    rule, _ = producer_rule(target)
    if rule is None or not rule.next_ok:
        return None, f"folding forward into {type(target).__name__} {tname} is not supported"
    if rule.kind == "conv" and _zero_pads(target):
        return None, (
            f"zero padding in following conv {tname}: it pads the un-normalised signal with zeros, "
            "so folding forward is not exact"
        )
    for c in calls:
        if rule.kind == "linear" and c.output.dim() != 2:
            return None, (
                f"following Linear {tname} reads a {c.output.dim()}-D tensor: its feature axis "
                "(the last) is not the BatchNorm's channel axis (axis 1)"
            )
    return target, None


def _skip_reason(back: "str | None", after_producer: bool, forward: "str | None") -> str:
    """One message for a norm that folds neither way: the reason about the layer it follows
    when it follows a Conv/Linear, the one about the layer after when only that exists."""
    if forward and after_producer and back:
        return f"{back}; it cannot fold into the next layer either: {forward}"
    return (back if after_producer else forward or back) or "not foldable"


def _raise_if_model_fails(
    model: "nn.Module", args: tuple[Any, ...], kwargs: "dict[str, Any] | None", exc: Exception
) -> None:
    """After a failed recording run: when the model fails without recording too, the example
    input does not suit it (the user's to fix), so say so without a traceback."""
    import torch

    from .errors import UsageError

    try:
        with torch.no_grad():
            model(*args, **(kwargs or {}))
    except Exception:
        shapes = ", ".join(str(tuple(t.shape)) for t in _tensors((args, kwargs or {}))) or "no tensors"
        raise UsageError(
            f"{type(model).__name__} fails on the example input ({shapes}): {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; give an input it accepts "
            "(--input-shape, or example_input=)"
        ) from exc


def analyse(model: "nn.Module", args: tuple[Any, ...], kwargs: "dict[str, Any] | None" = None, *,
            on_input: "InputCallback | None" = None) -> Analysis:
    """Run ``model(*args, **kwargs)`` once under recording and return the fold plan and output.

    The model must already be in eval mode.  Nothing is changed.  ``on_input(name, module, x)``
    sees the first input of every producer and norm call, outside the recording.
    """
    import torch

    if model.training:
        raise BnfuseError("the model is in training mode: call model.eval() before analysing it")
    if isinstance(model, torch.jit.ScriptModule):
        raise BnfuseError(
            f"{type(model).__name__} is a TorchScript module: bnfuse follows the data flow of an "
            "eager model; load the model's Python class and its state_dict instead"
        )
    rec = _Recorder(model, on_input)
    try:
        with torch.no_grad(), rec.mode:
            output = model(*args, **(kwargs or {}))
    except BnfuseError:
        raise
    except Exception as exc:
        rec.close()
        _raise_if_model_fails(model, args, kwargs, exc)
        raise  # the model runs without recording: a bnfuse bug, keep the traceback
    finally:
        rec.close()
    out_ids = _escapes(model, output, rec)
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
        problem = _norm_problem(module, rec)  # first: a BN read functionally is never called
        if problem:
            plan.skipped.append(Skip(name, problem))
            continue
        calls = rec.calls.get(id(module), [])
        if not calls:
            plan.skipped.append(Skip(name, "never called on the example input (unused, or in a branch not taken)"))
            continue
        if any(c.training for c in calls):
            plan.skipped.append(Skip(name, (
                "it runs in training mode during the forward (the model switches it with .train()), "
                "so it normalises with batch statistics"
            )))
            continue
        producers, back_reason, after_producer = _try_previous(module, calls, rec, out_ids)
        if producers:
            if not any(id(p) in used_producers for p, _ in producers):
                whole = (0, _channels(module))
                for p, chans in producers:
                    used_producers.add(id(p))
                    plan.folds.append(Fold(
                        name, rec.names[id(p)], "previous", rule.replacement,
                        channels=None if chans == whole else chans,
                    ))
                continue
            back_reason = "its producer already absorbs another BatchNorm"
        target, next_reason = _try_next(module, calls, rec, out_ids, rule.replacement)
        if target is not None:
            plan.folds.append(Fold(name, rec.names[id(target)], "next", rule.replacement))
            continue
        plan.skipped.append(Skip(name, _skip_reason(back_reason, after_producer, next_reason)))
    return Analysis(plan=plan, output=output)

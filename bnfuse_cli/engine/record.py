"""The data-flow recorder: module hooks and a ``TorchFunctionMode`` that note, during one forward
pass, which layer call produced each tensor and which operations read it.  Events only;
nothing is decided here (:mod:`bnfuse_cli.engine.analyse` decides).

Tensors are remembered by what the analysis needs (identity, shape, dtype), never kept alive:
the recording run holds no more activations than a plain forward pass.  A tensor is known by
its Python object while that lives (a weak reference guards against a reused ``id``).
Reads are attributed to the innermost module call running; an in-place op returns the tensor
it changed, so its read lands on that same tensor (conservative).  Ops that return their
argument untouched (``.to`` to the same dtype, dropout in eval) are not reads.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BnfuseError
from .ops import (ADDS, CATS, METADATA, MOVES, PASSTHROUGH, POOLS, RESHAPES, SELF_ONLY, VALUE_FREE, op_name,
                  pretty_op)
from .patterns import is_norm_like, is_producer_like

if TYPE_CHECKING:
    from typing import Callable

    import torch
    from torch import nn

    InputCallback = Callable[[str, "nn.Module", Any], None]

__all__ = ["Recorder", "TensorRecord", "Call", "BatchNormCall", "note_batch_norm", "tensors_in", "pretty_op", "where"]

@dataclass(eq=False)
class TensorRecord:
    """What the analysis remembers of a tensor: its identity (this object), shape and dtype,
    and, for a BatchNorm input, where it came from (for messages)."""

    shape: tuple[int, ...]
    dtype: Any
    origin: "str | None" = None

    def dim(self) -> int:
        return len(self.shape)


@dataclass(eq=False)
class Call:
    module: "nn.Module"
    name: str
    #: the first argument and the result, when they are tensors
    input: "TensorRecord | None" = None
    output: "TensorRecord | None" = None
    #: the module's training flag during this call (a model may switch a BN to train itself)
    training: bool = False


def where(call: "Call | None") -> str:
    return call.name if call is not None and call.name else "the model forward"


# ----------------------------------------------------------------------------- functional batch norms
# an ``F.batch_norm`` made outside a BatchNorm module's own call, with what it normalised and with which
# statistics (read by the functional pass)


@dataclass(eq=False)
class BatchNormCall:
    """A functional batch-norm call (``F.batch_norm``) made outside a BatchNorm module's own call."""

    #: the innermost module call it ran in (the module whose forward made it), None at no module
    caller: "Call | None"
    input: "TensorRecord | None"
    output: "TensorRecord | None"
    #: qualified names of running_mean, running_var, weight and bias: None where not given,
    #: "" for a tensor no module holds (computed in the forward, a global, a closure)
    stats: "tuple[str | None, ...]"
    training: bool
    eps: float
    #: for each tensor given that no module holds, what it is, in words ("running_mean is computed
    #: by mean in the model forward")
    unresolved: "tuple[str, ...]" = ()


#: F.batch_norm's positional parameters after the input, with their defaults
_BN_PARAMS = (("running_mean", None), ("running_var", None), ("weight", None), ("bias", None),
              ("training", False), ("momentum", 0.1), ("eps", 1e-5))


def note_batch_norm(rec: "Recorder", args: Any, kwargs: Any, out: Any) -> None:
    """A batch-norm call: noted unless it is a BatchNorm module's own (its call is innermost)."""
    import torch

    caller = rec.stack[-1] if rec.stack else None
    if caller is not None and is_norm_like(caller.module):
        return
    given = dict(zip([n for n, _ in _BN_PARAMS], args[1:]))
    given.update({k: v for k, v in kwargs.items() if k != "input"})
    values = {n: given.get(n, d) for n, d in _BN_PARAMS}

    names = ("running_mean", "running_var", "weight", "bias")
    unresolved = [f"{n} {rec.describe_unheld(values[n])}" for n in names
                  if isinstance(values[n], torch.Tensor) and rec.held_name(values[n]) is None]
    x = args[0] if args else kwargs.get("input")
    rec.batch_norms.append(BatchNormCall(
        caller, rec.lookup(x) or rec.track(x), rec.track(out),
        tuple(None if not isinstance(values[n], torch.Tensor) else rec.held_name(values[n]) or "" for n in names),
        bool(values["training"]), float(values["eps"]), tuple(unresolved)))


def _move_step(op: str, args: Any, kwargs: Any, src: "TensorRecord | None") -> "tuple[str, tuple[int, ...]] | None":
    """A layout op or a mean over axes as (op, int arguments), for :attr:`Recorder.moved`: a
    flatten/transpose/permute with its int arguments; ``mean`` or ``mean_keepdim`` with the axes it
    averages (``x.mean(dims)``, ``x.mean(dims, keepdim=True)``, ``adaptive_avg_pool{1,2,3}d(x, 1)``);
    None for anything else (computed axes, a dtype, a pool to more than one position)."""
    rest = args[1:]
    if op in MOVES:
        ints = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else tuple(rest)
        return (op, ints) if not kwargs and all(isinstance(a, int) for a in ints) else None
    if src is None:
        return None
    rank = len(src.shape)
    if op == "mean":
        given = dict(zip(("dim", "keepdim"), rest))
        if set(kwargs) - {"dim", "keepdim"} or set(kwargs) & set(given):
            return None
        given.update(kwargs)
        dims = given.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims) if isinstance(dims, (list, tuple)) else None
        keep = given.get("keepdim", False)
        if not dims or not all(isinstance(d, int) and -rank <= d < rank for d in dims) or not isinstance(keep, bool):
            return None
        return ("mean_keepdim" if keep else "mean"), tuple(sorted({d % rank for d in dims}))
    n = int(op[-2]) if op.startswith("adaptive_avg_pool") and op[-2].isdigit() else 0
    size = rest[0] if rest else kwargs.get("output_size")
    sizes = (size,) * n if isinstance(size, int) else tuple(size) if isinstance(size, (list, tuple)) else ()
    if n and rank > n and len(sizes) == n and all(s == 1 for s in sizes) and len(rest) + len(kwargs) == 1:
        return "mean_keepdim", tuple(range(rank - n, rank))
    return None


def tensors_in(obj: Any) -> list["torch.Tensor"]:
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



class Recorder:
    """Hooks and a torch function mode that record who produced and who read which tensor."""

    def __init__(self, model: "nn.Module", on_input: "InputCallback | None" = None) -> None:
        #: called with (name, module, first input) at every producer or norm call, outside the
        #: recording (the judge keeps a crop of it for its per-site check)
        self.on_input = on_input
        self.names: dict[int, str] = {}
        #: producers and norms; every producer class is recorded, foldable or not, so a BN after a
        #: re-parametrised or subclassed conv is reported against that conv, not as "not a Conv output"
        self.interesting: set[int] = set()
        #: leaf modules with parameters of their own, neither producer nor norm (a layer scale may be one)
        self.scales: set[int] = set()
        self.stack: list[Call] = []
        self.calls: dict[int, list[Call]] = {}
        #: id(tensor) -> (weak reference, record) for the tensors the analysis remembers
        self._live: dict[int, tuple[Any, TensorRecord]] = {}
        #: every record made (records are small; this keeps their ids unique)
        self.records: list[TensorRecord] = []
        #: id(record) -> the producer or norm call whose result it is
        self.produced: dict[int, Call] = {}
        #: id(record) -> [(reader call or None, readable op name)] for watched tensors
        self.reads: dict[int, list[tuple["Call | None", str]]] = {}
        #: id(param or buffer) -> [(id(module), qualified name)] over every module holding it
        self.holders: dict[int, list[tuple[int, str]]] = {}
        #: id(tensor) -> qualified name, for tensors a module keeps as a plain attribute (neither
        #: parameter nor buffer: ``self.running_mean = torch.zeros(c)``); the model's code makes them
        #: again when it is rebuilt, so a pass may read them by that name
        self.attributes: dict[int, str] = {}
        #: ids of the per-channel scale modules' outputs (their layout ops and pools are watched)
        self.scale_out: set[int] = set()
        #: storage address -> qualified names of the parameters and buffers using it
        self.storages: dict[int, list[str]] = {}
        #: id(param) -> ids of the producers and norms holding it (their calls may read it)
        self.owner: dict[int, set[int]] = {}
        #: id(param) -> (op, reader name) for params read outside their module's call
        self.foreign_param_reads: dict[int, tuple[str, str]] = {}
        #: id(tensor) -> (weakref, op name, module name), to explain where a BN input came from
        self.origin: dict[int, tuple[Any, str, str]] = {}
        #: id(record) -> (producer output record, op) for a reshape of a producer output (watched)
        self.reshaped: dict[int, tuple[TensorRecord, str]] = {}
        #: id(record) -> (part records, dim) for a cat whose every part is a producer output (watched)
        self.cats: dict[int, tuple[tuple[TensorRecord, ...], Any]] = {}
        #: id(source record) -> (result record, op, int arguments) for a flatten/transpose/permute, or a mean
        #: over some axes (``mean``, or ``mean_keepdim`` keeping them with size 1: ``x.mean((2, 3))``,
        #: ``adaptive_avg_pool2d(x, 1)``; the int arguments are then the axes), of a norm's or a scale
        #: module's output, or of such a result (watched); ``moved_out``: the ids of those results
        self.moved: dict[int, tuple[TensorRecord, str, tuple[int, ...]]] = {}
        self.moved_out: set[int] = set()
        #: id(module) -> its calls, for modules that are neither producers nor norms (containers)
        self.module_calls: dict[int, list[Call]] = {}
        #: ids of the modules inside whose call a tensor sum ran (candidate blocks for merging)
        self.sum_blocks: set[int] = set()
        #: functional batch-norm calls made outside BatchNorm modules, in order
        self.batch_norms: list[BatchNormCall] = []
        self.handles: list[Any] = []
        self._index(model)
        self.mode = self._make_mode()
        self._install_hooks(model)

    def _index(self, model: "nn.Module") -> None:
        """One pass over the module tree (shared modules included): names, the producers and
        norms, who holds each parameter, buffer and tensor attribute, and which storages the
        parameters and buffers share."""
        import torch

        seen_tensors: set[int] = set()
        for name, m in model.named_modules(remove_duplicate=False):
            first_visit = id(m) not in self.names
            if first_visit:
                self.names[id(m)] = name
                if is_norm_like(m) or is_producer_like(m):
                    self.interesting.add(id(m))
                elif m._parameters and not m._modules:  # a layer scale, perhaps: who reads its output
                    self.scales.add(id(m))
                for attr, t in vars(m).items():
                    if isinstance(t, torch.Tensor):
                        self.attributes.setdefault(id(t), f"{name}.{attr}" if name else attr)
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

    def _make_mode(self) -> Any:
        """The ``TorchFunctionMode`` that sees every torch operation of the forward pass."""
        from torch.overrides import TorchFunctionMode

        recorder = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                kwargs = kwargs or {}
                op = op_name(func)
                out = func(*args, **kwargs)
                if op in METADATA:
                    return out
                if kwargs.get("inplace") is True:  # F.relu(x, inplace=True) & co: a write
                    op = op + "_"
                elif op in PASSTHROUGH and args and out is args[0]:
                    return out
                # recorded after the call: an op runs with the mode off, so nothing nests
                if op in ADDS and recorder.stack:
                    recorder.sum_blocks.add(id(recorder.stack[-1].module))
                if op not in VALUE_FREE:
                    recorder._on_read(op, args[:1] if op in SELF_ONLY else args, kwargs)
                recorder._on_result(op, out)
                if op in RESHAPES or op in CATS or op in MOVES or op in POOLS:
                    recorder._on_layout_op(op, args, kwargs, out)
                if op == "batch_norm":
                    note_batch_norm(recorder, args, kwargs, out)
                return out

        return _Mode()

    def _install_hooks(self, model: "nn.Module") -> None:
        """Pre- and post-hooks on every module; global hooks to see TorchScript submodules."""
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

    def lookup(self, t: Any) -> "TensorRecord | None":
        """The record of tensor ``t``, if the analysis made one (and ``t`` is that tensor)."""
        entry = self._live.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def track(self, t: Any) -> "TensorRecord | None":
        """The record of tensor ``t``, made on first sight; None for anything but a tensor."""
        import torch

        if not isinstance(t, torch.Tensor):
            return None
        info = self.lookup(t)
        if info is None:
            info = TensorRecord(tuple(t.shape), t.dtype)
            self._live[id(t)] = (weakref.ref(t), info)
            self.records.append(info)
        return info

    def _script_pre(self, module: "nn.Module", args: Any) -> None:
        """A TorchScript submodule runs without torch function calls we can see: count every
        tensor handed to it as read by it (conservative), and what it returns as its result."""
        import torch

        if isinstance(module, torch.jit.ScriptModule) and id(module) in self.names:
            reader = Call(module, self.names[id(module)] or type(module).__name__)
            for t in tensors_in(args):
                info = self.lookup(t)
                if info is not None and id(info) in self.reads:
                    self.reads[id(info)].append((reader, "TorchScript forward"))

    def _script_post(self, module: "nn.Module", args: Any, output: Any) -> None:
        import torch

        if isinstance(module, torch.jit.ScriptModule) and id(module) in self.names:
            where = self.names[id(module)]
            for t in tensors_in(output):
                try:
                    self.origin[id(t)] = (weakref.ref(t), "TorchScript forward", where)
                except TypeError:
                    pass

    def _pre(self, module: "nn.Module", args: Any, kwargs: Any) -> None:
        call = Call(module, self.names.get(id(module), type(module).__name__), training=module.training)
        if id(module) not in self.interesting:  # any other module: its calls, for branch merging
            first = args[0] if args else None
            call.input = self.track(first)
            self.module_calls.setdefault(id(module), []).append(call)
        else:
            first = args[0] if args else next(iter(kwargs.values()), None)
            call.input = self.track(first)
            if call.input is not None and call.input.origin is None:
                call.input.origin = self.describe_origin(first)
            self.calls.setdefault(id(module), []).append(call)
        if self.on_input is not None and (id(module) in self.interesting or id(module) in self.scales):
            import torch

            with torch._C.DisableTorchFunction():  # the callback's reads are not the model's
                self.on_input(call.name, module, first)
        self.stack.append(call)

    def _post(self, module: "nn.Module", args: Any, kwargs: Any, output: Any) -> None:
        call = self.stack.pop() if self.stack else None
        if call is None or call.module is not module:  # unbalanced: a hook was skipped
            raise BnfuseError(
                f"module call records of {type(module).__name__} are out of order during the "
                "analysis run; the model calls layers in a way bnfuse cannot follow"
            )
        call.output = self.track(output)
        if id(module) in self.interesting and call.output is not None:
            self.produced[id(call.output)] = call
            self.reads.setdefault(id(call.output), [])
        elif id(module) in self.scales and call.output is not None and call.output is not call.input:
            self.reads.setdefault(id(call.output), [])
            self.scale_out.add(id(call.output))

    def _on_read(self, op: str, args: Any, kwargs: Any) -> None:
        reader = self.stack[-1] if self.stack else None
        for t in tensors_in((args, kwargs)):
            key = id(t)
            info = self.lookup(t)
            if info is not None and id(info) in self.reads:
                self.reads[id(info)].append((reader, pretty_op(op)))
            owners = self.owner.get(key)
            if owners is not None and key not in self.foreign_param_reads:
                if not any(id(c.module) in owners for c in self.stack):
                    self.foreign_param_reads[key] = (pretty_op(op), where(reader))

    def _on_result(self, op: str, out: Any) -> None:
        where = self.stack[-1].name if self.stack else ""
        for t in tensors_in(out):
            try:
                self.origin[id(t)] = (weakref.ref(t), op, where)
            except TypeError:
                pass

    def _on_layout_op(self, op: str, args: Any, kwargs: Any, out: Any) -> None:
        """Watch a reshape or cat of producer outputs: a BN may still fold through it; and a layout op
        or a mean over axes of a norm's or scale's output: it may fold forward through it."""
        import torch

        if not isinstance(out, torch.Tensor):
            return
        if op in MOVES or op in POOLS:
            src = self.lookup(args[0]) if args else None
            step = _move_step(op, args, kwargs, src)
            if src is not None and args[0] is not out and step is not None and (
                    id(src) in self.moved_out or id(src) in self.scale_out
                    or id(src) in self.produced and is_norm_like(self.produced[id(src)].module)):
                info = self.track(out)
                self.moved[id(src)] = (info, *step)
                self.moved_out.add(id(info))
                self.reads.setdefault(id(info), [])
        if op in CATS:
            self._on_cat(args, kwargs, out)
            return
        if op in RESHAPES:
            src = self.lookup(args[0]) if args else None
            if src is None or args[0] is out or id(src) not in self.produced:
                return
            info = self.track(out)
            self.reshaped[id(info)] = (src, op)
            self.reads.setdefault(id(info), [])

    def _on_cat(self, args: Any, kwargs: Any, out: Any) -> None:
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

    def held_name(self, t: Any) -> "str | None":
        """The qualified name under which the model holds tensor ``t``: a parameter, a buffer or a
        module's tensor attribute; None for a tensor it does not hold."""
        held = self.holders.get(id(t))
        return held[0][1] if held else self.attributes.get(id(t))

    def describe_unheld(self, t: Any) -> str:
        """What a tensor the model does not hold is, for a reason: made in the forward (by which op,
        where), or a tensor from outside the model (a global or a closure)."""
        rec = self.origin.get(id(t))
        if rec is not None and rec[0]() is t:
            _, op, where = rec
            return f"is computed in the forward (by {pretty_op(op)} in {where or 'the model forward'})"
        return "is a tensor no module of the model holds (a global or a closure)"

    def describe_origin(self, t: Any) -> str:
        """Where tensor ``t`` (alive) came from, for the reason a BatchNorm reading it stays.
        A tensor record carries the description made while its tensor was alive."""
        if isinstance(t, TensorRecord):
            return t.origin or "reads a tensor bnfuse did not see being made"
        rec = self.origin.get(id(t))
        if rec is None or rec[0]() is not t:
            return "reads a tensor not computed inside the model (the model input)"
        _, op, where = rec
        return f"follows {pretty_op(op)} in {where or 'the model forward'}, not a Conv/Linear output"

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


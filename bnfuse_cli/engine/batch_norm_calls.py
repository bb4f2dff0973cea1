"""Functional batch-norm calls as the recorder notes them: an ``F.batch_norm`` made outside a
BatchNorm module's own call, with what it normalised and with which statistics (read by the
functional pass, :mod:`.passes.functional`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .patterns import is_norm_like

if TYPE_CHECKING:
    from .record import Call, Recorder, TensorRecord

__all__ = ["BatchNormCall", "note_batch_norm"]


@dataclass(eq=False)
class BatchNormCall:
    """A functional batch-norm call (``F.batch_norm``) made outside a BatchNorm module's own call."""

    #: the innermost module call it ran in (the module whose forward made it), None at no module
    caller: "Call | None"
    input: "TensorRecord | None"
    output: "TensorRecord | None"
    #: qualified names of running_mean, running_var, weight and bias: None where not given,
    #: "" for a tensor no module holds (computed in the forward)
    stats: "tuple[str | None, ...]"
    training: bool
    eps: float


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

    def qual(t: Any) -> "str | None":
        if not isinstance(t, torch.Tensor):
            return None
        held = rec.holders.get(id(t))
        return held[0][1] if held else ""

    x = args[0] if args else kwargs.get("input")
    rec.batch_norms.append(BatchNormCall(
        caller, rec.lookup(x) or rec.track(x), rec.track(out),
        tuple(qual(values[n]) for n in ("running_mean", "running_var", "weight", "bias")),
        bool(values["training"]), float(values["eps"])))

"""Why a layer or a BatchNorm must not be changed even where the data flow allows it: shared or
re-parametrised weights, user hooks, parameters read outside their module, zero padding.  Every pass
that changes a layer's weights asks :func:`producer_problem`, every pass that removes a BatchNorm
:func:`norm_problem`, and every pass that replaces a module or rewrites its forward :func:`hooks`:
the reasons are the same whichever pass meets the layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .patterns import producer_rule

if TYPE_CHECKING:
    from torch import nn

    from .record import Recorder

__all__ = ["zero_pads", "producer_problem", "norm_problem", "hooks", "channel_count"]


def zero_pads(conv: Any) -> bool:
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        return False
    pad = conv.padding
    if isinstance(pad, str):
        return pad != "valid" and any(conv._reversed_padding_repeated_twice)
    return any(p != 0 for p in pad)


def _shared_with(module: "nn.Module", rec: Recorder) -> "str | None":
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


def _foreign_read(module: "nn.Module", rec: Recorder) -> "str | None":
    """A message when a parameter or buffer of ``module`` was read outside its own calls."""
    for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
        if t is not None and id(t) in rec.foreign_param_reads:
            op, where = rec.foreign_param_reads[id(t)]
            mname = rec.names.get(id(module), "")
            return f"{mname + '.' if mname else ''}{attr} is also read by {op} in {where}"
    return None


def _user_hooks(hooks: Any, rec: "Recorder | None") -> list[Any]:
    return [h for h in hooks.values() if rec is None or getattr(h, "__self__", None) is not rec]


#: the hooks a module runs with its forward or backward, as its attributes and as a sentence says them
_HOOKS = (("_forward_pre_hooks", "forward pre-hooks"), ("_forward_hooks", "forward hooks"),
          ("_backward_pre_hooks", "backward pre-hooks"), ("_backward_hooks", "backward hooks"))


def hooks(module: "nn.Module", name: str, rec: "Recorder | None" = None) -> "str | None":
    """Why ``module`` (called ``name``) must not be replaced nor its forward rewritten: the hooks it
    carries, which what takes its place would not run (None: it has none)."""
    found = [what for attr, what in _HOOKS if _user_hooks(getattr(module, attr, None) or {}, rec)]
    if not found:
        return None
    return f"{name or 'the model'} has {' and '.join(found)}, which would be dropped with it"


def producer_problem(module: "nn.Module", rec: Recorder) -> "str | None":
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


def norm_problem(module: "nn.Module", rec: Recorder) -> "str | None":
    """Why this norm cannot be removed whatever layer it is next to, or None."""
    problem = _foreign_read(module, rec)
    if problem:
        return problem
    if _user_hooks(module._forward_pre_hooks, rec):
        return "it has forward pre-hooks that may change its input"
    if _user_hooks(module._forward_hooks, rec):
        return "it has forward hooks that may change its output"
    return None


def channel_count(module: Any) -> int:
    n = getattr(module, "num_features", None)
    if n is None:
        stat = getattr(module, "running_mean", None)
        n = stat.numel() if stat is not None else module.weight.numel()
    return int(n)


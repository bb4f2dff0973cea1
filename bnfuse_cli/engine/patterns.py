"""What can fold into what: the one table to extend when a new layer type appears.

A *producer* is a layer ``y = W x + b`` whose weight can absorb a per-channel affine map
(Conv, ConvTranspose, Linear).  A *norm* is a BatchNorm-like layer that, in eval mode, is a
per-channel affine map, possibly followed by extra work (timm's ``BatchNormAct2d`` applies
drop and an activation after the norm: that part stays in the model in place of the BN).

Rows name classes by import path and are resolved against ``sys.modules`` only, so an
optional library (timm) is never imported by bnfuse: if a model contains its classes, the
library is already loaded.  A subclass of a known class is treated like that class only if it
does not override ``forward``; otherwise it is reported as unknown and left alone.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ProducerRule",
    "NormRule",
    "PRODUCERS",
    "NORMS",
    "producer_rule",
    "norm_rule",
    "is_norm_like",
    "is_producer_like",
    "producer_row",
    "StdConvRule",
    "STD_CONVS",
    "std_conv_rule",
]

Stats = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor | None", "torch.Tensor | None", float]


@dataclass(frozen=True)
class ProducerRule:
    """A layer ``y = W x + b`` that a BN can fold into."""

    cls_path: str
    kind: str  # "conv" | "linear"
    transposed: bool = False
    #: the layer's own forward is the plain convolution, so folding the BN *before* it is exact
    #: when it does not zero-pad (timm's Conv2dSame pads with zeros inside forward: no)
    next_ok: bool = True


@dataclass(frozen=True)
class NormRule:
    """A BatchNorm-like layer: how to read its statistics and what stays in its place."""

    cls_path: str
    stats: Callable[["nn.Module"], Stats]
    #: why this instance cannot fold (None when it can)
    unfoldable: Callable[["nn.Module"], "str | None"]
    #: builds the module that replaces the norm after folding
    replacement: str = "identity"  # "identity" | "activation"


def _bn_stats(m: Any) -> Stats:
    return m.running_mean, m.running_var, m.weight, m.bias, float(m.eps)


def _bn_unfoldable(m: Any) -> "str | None":
    # in eval mode torch normalises with the running statistics whenever both buffers exist
    # (``track_running_stats`` only decides whether training updates them)
    if m.running_mean is None or m.running_var is None:
        return (
            "track_running_stats=False: it has no running statistics and normalises with batch "
            "statistics even in eval mode, so it is not a fixed affine map"
        )
    return None


def _frozen_unfoldable(m: Any) -> "str | None":
    return None


PRODUCERS: tuple[ProducerRule, ...] = (
    ProducerRule("torch.nn.modules.conv.Conv1d", "conv"),
    ProducerRule("torch.nn.modules.conv.Conv2d", "conv"),
    ProducerRule("torch.nn.modules.conv.Conv3d", "conv"),
    ProducerRule("torch.nn.modules.conv.ConvTranspose1d", "conv", transposed=True, next_ok=False),
    ProducerRule("torch.nn.modules.conv.ConvTranspose2d", "conv", transposed=True, next_ok=False),
    ProducerRule("torch.nn.modules.conv.ConvTranspose3d", "conv", transposed=True, next_ok=False),
    ProducerRule("torch.nn.modules.linear.Linear", "linear"),
    ProducerRule("timm.layers.conv2d_same.Conv2dSame", "conv", next_ok=False),
)

NORMS: tuple[NormRule, ...] = (
    # BatchNorm1d/2d/3d inherit forward from _BatchNorm
    NormRule("torch.nn.modules.batchnorm._BatchNorm", _bn_stats, _bn_unfoldable),
    NormRule("torch.nn.modules.batchnorm.SyncBatchNorm", _bn_stats, _bn_unfoldable),
    NormRule("torchvision.ops.misc.FrozenBatchNorm2d", _bn_stats, _frozen_unfoldable),
    NormRule("timm.layers.norm_act.BatchNormAct2d", _bn_stats, _bn_unfoldable, "activation"),
    NormRule("timm.layers.norm_act.SyncBatchNormAct", _bn_stats, _bn_unfoldable, "activation"),
    NormRule("timm.layers.norm_act.FrozenBatchNormAct2d", _bn_stats, _frozen_unfoldable, "activation"),
    NormRule("timm.layers.norm.FrozenBatchNorm2d", _bn_stats, _frozen_unfoldable),
)

@dataclass(frozen=True)
class StdConvRule:
    """A conv that standardises its own weight in every forward (``F.batch_norm`` of the weight
    with batch statistics: constant at inference), computable once."""

    cls_path: str
    #: the standardised weight is scaled per output channel by ``gain * scale`` (NFNets)
    scaled: bool
    #: TensorFlow-style SAME padding, computed in forward when ``same_pad`` is set
    same: bool = False


STD_CONVS: tuple[StdConvRule, ...] = (
    StdConvRule("timm.layers.std_conv.StdConv2d", scaled=False),
    StdConvRule("timm.layers.std_conv.StdConv2dSame", scaled=False, same=True),
    StdConvRule("timm.layers.std_conv.ScaledStdConv2d", scaled=True),
    StdConvRule("timm.layers.std_conv.ScaledStdConv2dSame", scaled=True, same=True),
)


#: classes that are BatchNorm-like even when no row matches (reported as unknown, never folded)
_NORM_FAMILIES = (
    "torch.nn.modules.batchnorm._NormBase",
    "torchvision.ops.misc.FrozenBatchNorm2d",
    "timm.layers.norm_act.FrozenBatchNormAct2d",
    "timm.layers.norm.FrozenBatchNorm2d",
)


def _resolve(path: str) -> "type | None":
    module, _, name = path.rpartition(".")
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


#: class look-ups, keyed by what they ask; valid while the same set of modules is loaded
_CACHE: dict[Any, Any] = {}
_CACHE_STAMP: list[int] = [-1]


def _memo(key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per key.  Dropped whenever a module is imported, since a row's class
    (timm's, say) resolves only once its module is loaded: ``len(sys.modules)`` is the stamp."""
    if _CACHE_STAMP[0] != len(sys.modules):
        _CACHE.clear()
        _CACHE_STAMP[0] = len(sys.modules)
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def _lookup(module: "nn.Module", rules: tuple[Any, ...]) -> "tuple[Any, type] | None":
    """Return (rule, matched class) for the nearest class in the MRO that has a row (cached per class)."""

    def find() -> "tuple[tuple[Any, ...], tuple[Any, type] | None]":
        by_cls = {cls: r for r in rules if (cls := _resolve(r.cls_path)) is not None}
        found = next(((by_cls[cls], cls) for cls in type(module).__mro__ if cls in by_cls), None)
        return rules, found  # the entry keeps its table alive, so no other table reuses its id

    return _memo(("rule", id(rules), type(module)), find)[1]


#: methods a subclass may override to change what the layer computes (forward calls them)
_COMPUTE_METHODS = ("forward", "_conv_forward")


def _overridden(module: "nn.Module", cls: type) -> "str | None":
    """The first compute method that ``type(module)`` overrides relative to ``cls``, or None."""
    for meth in _COMPUTE_METHODS:
        if getattr(type(module), meth, None) is not getattr(cls, meth, None):
            return meth
    return None


def _public_base(module: "nn.Module", cls: type) -> str:
    """The nearest public class ``module`` derives from, for messages (BatchNorm2d, not _BatchNorm)."""
    for base in type(module).__mro__[1:]:
        if not base.__name__.startswith("_") and issubclass(base, cls):
            return base.__name__
    return cls.__name__.lstrip("_")


def is_producer_like(module: "nn.Module") -> bool:
    """True when ``module``'s class (or a base class) has a producer row, foldable or not."""
    return _lookup(module, PRODUCERS) is not None


def producer_row(module: "nn.Module") -> "ProducerRule | None":
    """The producer row of ``module``'s class, whether or not this instance can absorb a fold
    (for reasons about its layout: a Linear's channel axis is the last one, a Conv's axis 1)."""
    found = _lookup(module, PRODUCERS)
    return found[0] if found is not None else None


def producer_rule(module: "nn.Module") -> "tuple[ProducerRule | None, str | None]":
    """The producer row for ``module``, or None with the reason it is not a known producer."""
    found = _lookup(module, PRODUCERS)
    if found is None:
        return None, f"{type(module).__name__} is not a Conv/ConvTranspose/Linear layer"
    rule, cls = found
    meth = _overridden(module, cls)
    if meth is not None:
        return None, (
            f"unknown {_public_base(module, cls)} subclass {type(module).__name__} overrides {meth} "
            "(it may not compute with its stored weight)"
        )
    if module._parameters.get("weight") is None:
        return None, f"{type(module).__name__} has no plain weight parameter"
    return rule, None


def is_norm_like(module: "nn.Module") -> bool:
    """True for every BatchNorm-family module, known or not (LayerNorm/GroupNorm are not)."""
    from torch import nn

    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True

    def find() -> bool:
        families = tuple(c for p in _NORM_FAMILIES[1:] if (c := _resolve(p)) is not None)
        return bool(families) and issubclass(type(module), families)

    return _memo(("family", type(module)), find)


def norm_rule(module: "nn.Module") -> "tuple[NormRule | None, str | None]":
    """The norm row for ``module``, or None with the reason it cannot be folded."""
    found = _lookup(module, NORMS)
    if found is None:
        return None, f"unknown BatchNorm class {type(module).__name__}"
    rule, cls = found
    meth = _overridden(module, cls)
    if meth is not None:
        return None, (
            f"unknown {_public_base(module, cls)} subclass {type(module).__name__} overrides "
            f"{meth} (it may do more than normalise)"
        )
    reason = rule.unfoldable(module)
    if reason:
        return None, reason
    return rule, None


def std_conv_rule(module: "nn.Module") -> "StdConvRule | None":
    """The row of a weight-standardising conv: its exact class only (a subclass may compute
    something else)."""
    found = _lookup(module, STD_CONVS)
    return found[0] if found is not None and type(module) is found[1] else None

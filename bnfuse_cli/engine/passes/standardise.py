"""The weight-standardisation pass: a conv that standardises its own weight in every forward
(timm's ``StdConv2d`` and NFNets' ``ScaledStdConv2d``: ``F.batch_norm`` of the weight with batch
statistics, scaled by ``gain * gamma / sqrt(fan-in)``) gets the result computed once, in float64,
as a plain conv.  The weight is constant at inference, so this is exact; it removes one
batch-norm call per conv per forward.

Guards (each tripped by a test in tests/test_guards.py; each broken by a mutant in scripts/mutants.py):
  - a conv that pads at run time (TensorFlow SAME padding: a plain conv would drop it)
  - a conv never called on the example input
  - a conv with hooks (the plain conv that takes its place would not run them)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..guards import hooks
from ..patterns import std_conv_rule
from ..plan import Plan
from ..steps import RunLayer, RunModule, SiteSpec
from .base import Pass

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..record import Recorder

__all__ = ["STANDARDISE", "Standardised", "StandardiseLeft", "standardised_weight"]


@dataclass(frozen=True)
class Standardised:
    """The conv ``layer``'s standardised weight computed once."""

    layer: str


@dataclass(frozen=True)
class StandardiseLeft:
    layer: str
    reason: str


def standardised_weight(conv: "nn.Module") -> "torch.Tensor":
    """What ``conv``'s forward computes from its weight, in float64."""
    import torch.nn.functional as F

    rule = std_conv_rule(conv)
    w = conv.weight.detach().double()
    gain = (conv.gain.detach().double() * conv.scale).view(-1) if rule.scaled else None
    return F.batch_norm(w.reshape(1, conv.out_channels, -1), None, None, weight=gain, training=True, momentum=0.0,
                        eps=float(conv.eps)).reshape_as(w)


def _plain(conv: "nn.Module") -> "nn.Module":
    """An empty plain conv with ``conv``'s geometry."""
    from torch import nn

    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                     padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)


class StandardisePass(Pass, name="standardise", key="standardised", left_key="standardise_skips",
                      item=Standardised):
    again = True  # a plain conv can then take a BatchNorm that follows it
    rewrites, absorbs = ("layer",), ()
    title, columns = "Weight standardisation computed once", ("conv",)
    left_title, left_what = "Weight standardisation left in the forward", "conv"

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        for name, m in model.named_modules():
            rule = std_conv_rule(m)
            if rule is None:
                continue
            if rule.same and getattr(m, "same_pad", False):
                plan.left_by(self.name).append(StandardiseLeft(name, (
                    f"{name} pads its input at run time (TensorFlow SAME padding for any input size): a plain "
                    "conv would drop that padding, so its weight standardisation stays")))
            elif not rec.calls.get(id(m)):
                plan.left_by(self.name).append(StandardiseLeft(name, (
                    f"{name} is never called on the example input (unused, or in a branch not taken)")))
            elif why := hooks(m, name, rec):  # a plain conv takes its place
                plan.left_by(self.name).append(StandardiseLeft(name, why))
            else:
                plan.of(self.name).append(Standardised(name))

    def apply(self, model: "nn.Module", items: "list[Standardised]") -> None:
        import torch

        for it in items:
            conv = model.get_submodule(it.layer)
            new = _plain(conv)
            with torch.no_grad():
                new.weight.copy_(standardised_weight(conv))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            new.train(conv.training)
            _replace(model, conv, new)

    def rebuild(self, model: "nn.Module", items: "list[Standardised]") -> None:
        for it in items:
            conv = model.get_submodule(it.layer)
            _replace(model, conv, _plain(conv).train(conv.training))

    def to_row(self, item: Standardised) -> str:
        return item.layer

    def from_row(self, row: Any) -> Standardised:
        if not isinstance(row, str):
            raise TypeError(f"a standardised conv is recorded by its name, not {row!r}")
        return Standardised(row)

    def sites(self, model: "nn.Module", items: "list[Standardised]") -> "list[SiteSpec]":
        """The conv as it was (standardising its weight in float64) against the plain conv."""
        return [SiteSpec(self.name, it.layer, it.layer, ("weight standardisation",), (RunModule(it.layer),),
                         (RunLayer(it.layer),)) for it in items]

    def row(self, it: Standardised) -> "tuple[str, ...]":
        return (it.layer,)

    def summary(self, plan: Plan) -> "tuple[str, str] | None":
        items, left = plan.of(self.name), plan.left_by(self.name)
        return ("weight standardisation", f"{len(items)} convs computed once"
                + (f", {len(left)} left in the forward" if left else "")) if items or left else None


def _replace(model: "nn.Module", old: "nn.Module", new: "nn.Module") -> None:
    """``new`` in every place ``old`` is (a module shared under several names stays shared)."""
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if m is old and name:
            model.set_submodule(name, new)


STANDARDISE = StandardisePass()

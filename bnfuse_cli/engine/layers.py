"""Layers as bnfuse builds and changes them, shared by every pass: the module that stays of a
norm-plus-activation layer, a new plain conv or Linear in another's geometry, and an affine map
folded into a layer's weight and bias (checked first, :mod:`.affine`).  Importing this module
imports torch: the passes import it when they run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..errors import BnfuseError
from .affine import apply_fold_, prepare_fold
from .patterns import producer_rule

if TYPE_CHECKING:
    import torch

__all__ = ["NormActivation", "new_layer", "plain_layer", "fold_affine", "give_bias", "set_bias"]


class NormActivation(nn.Module):
    """What stays of a norm-plus-activation layer (timm ``BatchNormAct2d``) after folding.

    The normalisation moved into the layer before; drop and activation still run, under the
    same attribute names, so state_dict keys (a PReLU's weight, say) are unchanged.
    """

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.act(self.drop(x))


def new_layer(like: "nn.Module", out: "int | None" = None) -> "nn.Module":
    """An empty conv (or Linear) with ``like``'s geometry and ``out`` output channels (``like``'s by
    default), with a bias, on ``like``'s device and dtype."""
    from torch import nn

    if isinstance(like, nn.Linear):
        return nn.Linear(like.in_features, out or like.out_features, bias=True, device=like.weight.device,
                         dtype=like.weight.dtype)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(like.kernel_size)]
    return cls(like.in_channels, out or like.out_channels, like.kernel_size, stride=like.stride, padding=like.padding,
               dilation=like.dilation, groups=like.groups, bias=True, padding_mode=like.padding_mode,
               device=like.weight.device, dtype=like.weight.dtype)


def plain_layer(module: "nn.Module") -> bool:
    """A Conv1d/2d/3d or Linear computing with torch's own forward (its stored weight, as is)."""
    from torch import nn

    return type(module).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward)


def set_bias(layer: "nn.Module", bias: "torch.Tensor") -> None:
    """``bias`` as ``layer``'s bias: copied into the one it has, or a new parameter."""
    import torch
    from torch import nn

    if layer.bias is None:
        layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
    else:
        with torch.no_grad():
            layer.bias.copy_(bias)


def fold_affine(layer: "nn.Module", scale: "torch.Tensor", shift: "torch.Tensor", name: str,
                direction: str = "backward") -> None:
    """Fold ``z = scale * layer(x) + shift`` (per output channel, float64) into ``layer`` in place, or
    with ``direction="forward"`` ``layer(scale * x + shift)`` (per input channel; the caller has made
    sure no zero padding meets the shift), checked first like every fold
    (:func:`bnfuse_cli.engine.affine.prepare_fold`)."""
    import torch

    prod, why = producer_rule(layer)
    if prod is None:
        raise BnfuseError(f"cannot fold {name}: {why}")
    fold = prepare_fold(layer.weight, layer.bias, **{direction: (scale, shift)}, transposed=prod.transposed,
                        groups=getattr(layer, "groups", 1), name=name)
    with torch.no_grad():
        apply_fold_(layer.weight, fold)
        set_bias(layer, fold.bias)


def give_bias(layer: "nn.Module") -> None:
    """A zero bias for ``layer`` if it has none (the fused structure, before its state_dict loads)."""
    import torch

    if getattr(layer, "bias", None) is None:
        out = getattr(layer, "out_channels", None) or getattr(layer, "out_features")
        set_bias(layer, torch.zeros(out, dtype=layer.weight.dtype, device=layer.weight.device))

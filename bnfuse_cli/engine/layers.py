"""Modules that bnfuse puts into a fused model (importing this module imports torch)."""

from __future__ import annotations

from torch import nn

__all__ = ["NormActivation"]


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

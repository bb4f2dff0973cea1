"""Affine steps between a conv and its BatchNorm: ``bn(conv(x) * a + b)`` with constants."""

from __future__ import annotations

import torch
from torch import nn


class ChainBlock(nn.Module):
    """conv -> * 2.0 -> + per-channel buffer -> - 0.5 -> / per-channel parameter -> BN; ``relu_in``
    puts a ReLU in the chain (not affine: stays), ``computed`` multiplies by a value computed in the
    forward (not a constant: stays)."""

    def __init__(self, c: int = 8, relu_in: bool = False, computed: bool = False) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, c).view(1, c, 1, 1))
        self.divisor = nn.Parameter(torch.linspace(0.5, 2.0, c).view(c, 1, 1))
        self.relu_in, self.computed = relu_in, computed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * 2.0
        if self.relu_in:
            y = torch.relu(y)
        if self.computed:
            y = y * x.mean()
        y = (y + self.offset - 0.5) / self.divisor
        return self.bn(y)


class ChainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = ChainBlock(), ChainBlock(relu_in=True), ChainBlock(computed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.c(x)

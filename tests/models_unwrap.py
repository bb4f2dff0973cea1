"""Models for ``--unwrap``: wrappers left calling one layer alone once their BatchNorms are folded."""

from __future__ import annotations

import torch
from torch import nn


def conv_norm(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    """timm RepViT's ``ConvNorm``: a Sequential of a conv and its BatchNorm, under names."""
    s = nn.Sequential()
    s.add_module("c", nn.Conv2d(cin, cout, k, padding=k // 2, bias=False))
    s.add_module("bn", nn.BatchNorm2d(cout))
    return s


class DwSum(nn.Module):
    """RepViT's ``RepVggDw``: ``bn(conv(x) + conv1(x) + x)``; merged, then its BatchNorm folded, it
    calls the merged conv alone."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv = conv_norm(c, c, 3)
        self.conv1 = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


class Wrapped(nn.Module):
    """Wrappers of every kind: named and numbered Sequentials, one nested in another, a merged block;
    and two that stay (one the forward reaches past, one held under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_norm(3, 6)
        self.nested = nn.Sequential(conv_norm(6, 6, 1))
        self.mixer = DwSum(6)
        self.numbered = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.reached = conv_norm(6, 6, 1)  # its conv is called without it
        self.twice = conv_norm(6, 6, 1)
        self.alias = self.twice
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.mixer(self.nested(self.stem(x))))
        x = self.numbered(x)
        x = self.reached.bn(self.reached.c(x))
        return self.head(self.twice(x))

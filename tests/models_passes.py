"""A toy model for the pass-table test: per-channel scales after convs (``Scale``), one of which
reads a conv output that a residual reads too."""

from __future__ import annotations

import torch
from torch import nn


class Scale(nn.Module):
    """``x * s`` per channel (a layer scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s.view(1, -1, 1, 1)


class ToyNet(nn.Module):
    """conv1 -> Scale (folds) -> bn1 -> relu -> conv2 -> Scale, where conv2's output also feeds a
    residual (this Scale stays) -> conv3 (no bias) -> Scale (folds; conv3 gains a bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.scale1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), Scale(8), nn.BatchNorm2d(8)
        self.conv2, self.scale2 = nn.Conv2d(8, 8, 3, padding=1), Scale(8)
        self.conv3, self.scale3 = nn.Conv2d(8, 6, 1, bias=False), Scale(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.scale1(self.conv1(x))))
        z = self.conv2(y)
        z = self.scale2(z) + z
        return self.scale3(self.conv3(z))

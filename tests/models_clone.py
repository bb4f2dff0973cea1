"""A conv whose output a BatchNorm and something else both read."""

from __future__ import annotations

import torch
from torch import nn


class SharedConv(nn.Module):
    """``bn(conv(x)) + conv(x)``: the BatchNorm cannot fold into conv, only into a copy of it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(torch.relu(self.bn(y)) * torch.sigmoid(y))

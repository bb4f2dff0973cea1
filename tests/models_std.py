"""Weight-standardised convs (timm's StdConv2d and NFNets' ScaledStdConv2d) for the
standardisation pass: one of each, a BatchNorm after the first, and a SAME-padded one that pads at
run time (stays)."""

from __future__ import annotations

import torch
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d
from torch import nn


class StdNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = StdConv2d(3, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = ScaledStdConv2d(8, 8, 3, gamma=1.7)
        self.conv3 = ScaledStdConv2dSame(8, 4, 3, stride=2)  # SAME padding of a stride-2 conv: dynamic
        with torch.no_grad():
            self.conv2.gain.uniform_(0.5, 1.5)
            self.conv3.gain.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

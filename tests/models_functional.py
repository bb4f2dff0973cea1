"""Batch norms written as ``F.batch_norm`` calls in a module's own forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvFBN(nn.Module):
    """conv -> F.batch_norm with the module's own statistics and affine parameters -> relu."""

    def __init__(self, cin: int = 3, cout: int = 8, training: bool = False, also_return: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.register_buffer("running_mean", torch.linspace(-0.5, 0.5, cout))
        self.register_buffer("running_var", torch.linspace(0.3, 1.7, cout))
        self.weight = nn.Parameter(torch.linspace(0.6, 1.4, cout))
        self.bias = nn.Parameter(torch.linspace(-0.3, 0.3, cout))
        self.training_stats, self.also_return = training, also_return

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = F.relu(F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training_stats, 0.0, 1e-3))
        return z + y if self.also_return else z


class FunctionalNet(nn.Module):
    """Three functional batch norms: one folds, one normalises with batch statistics (stays), one
    whose conv output is also added to its result (stays); and a BatchNorm module."""

    def __init__(self) -> None:
        super().__init__()
        self.a = ConvFBN(3, 8)
        self.b = ConvFBN(8, 8, training=True)
        self.c = ConvFBN(8, 8, also_return=True)
        self.conv = nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.c(self.b(self.a(x)))))

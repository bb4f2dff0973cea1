"""Tiny models for ``bnfuse bench`` tests, built by ``--arch``/model name ``bench_tiny:NAME``.

Kept out of test files so a ``bnfuse`` subprocess can import them from the tests directory.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Conv-BN-ReLU twice, pooling, Linear-BN1d: every BatchNorm folds into the layer before."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)
        self.bn3 = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean((2, 3))))


class TinyResidual(nn.Module):
    """A BatchNorm after a residual add: it follows an addition, not a layer, so it stays."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_after_add = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn_after_add(self.conv2(y) + y)
        return y.mean((2, 3))


def tiny_cnn() -> nn.Module:
    return TinyCNN()


def tiny_residual() -> nn.Module:
    return TinyResidual()

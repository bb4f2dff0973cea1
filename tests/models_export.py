"""Models for the export tests (``models_export:NAME``): one that ``torch.export`` cannot capture."""

from __future__ import annotations

import torch
from torch import nn


class DataDependentNet(nn.Module):
    """conv+BN, then a branch on the data: Python control flow that no exported graph can hold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y.relu()
        return -y


def DataDependent() -> nn.Module:  # noqa: N802
    return DataDependentNet()

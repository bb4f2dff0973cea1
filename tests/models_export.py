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


class BigLinearNet(nn.Module):
    """Linear(33000, 16500) then BatchNorm1d: 2.03 GiB of float32 weights, above protobuf's 2 GiB limit
    for one ONNX file (the slow ``-m slow`` test and docs/measured/onnx-external-data.md)."""

    def __init__(self, features: int = 33000, out: int = 16500) -> None:
        super().__init__()
        self.fc = nn.Linear(features, out)
        self.bn = nn.BatchNorm1d(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def BigLinear() -> nn.Module:  # noqa: N802
    return BigLinearNet()


class StridedNet(nn.Module):
    """Strided conv+BN twice, pooling, Linear+BN1d: torch.export records input guards and shape expressions for
    its dynamic spatial dimensions (what ``tests/test_pt2_guard.py`` checks bnfuse lets through)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)
        self.bn3 = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)))


def Strided() -> nn.Module:  # noqa: N802
    return StridedNet()


class Headed(nn.Module):
    """conv+BN, pooling, and a head on ``x.reshape(x.shape[0], -1)``: the ONNX graph holds integer shape
    constants beside the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(y.reshape(y.shape[0], -1))

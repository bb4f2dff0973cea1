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
    """A BatchNorm after a residual add: it follows an addition, not a layer, so it stays (conv2 pads
    by reflection, so the sum cannot merge into one conv either)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False, padding_mode="reflect")
        self.bn_after_add = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn_after_add(self.conv2(y) + y)
        return y.mean((2, 3))


def tiny_cnn() -> nn.Module:
    return TinyCNN()


def tiny_residual() -> nn.Module:
    return TinyResidual()


class NoisyTinyCNN(TinyCNN):
    """TinyCNN whose every stage carries relative noise of 1e-3 whenever reduced-precision float32
    math is allowed (``torch.backends.cudnn.allow_tf32``, on by default) and the model does not
    run in float64: what TF32 convolutions do on an Ampere-or-newer GPU, emulated on the CPU.
    (The noise is applied after each BatchNorm, not by hooks on the convs: bnfuse never folds
    into a layer with forward hooks.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _tf32_like(torch.relu(self.bn1(self.conv1(x))))
        x = _tf32_like(torch.relu(self.bn2(self.conv2(x))))
        return _tf32_like(self.bn3(self.fc(x.mean((2, 3)))))


def _tf32_like(out: torch.Tensor) -> torch.Tensor:
    if out.dtype == torch.float64 or not torch.backends.cudnn.allow_tf32:
        return out
    return out * (1 + 1e-3 * torch.randn_like(out))


def noisy_tiny_cnn() -> nn.Module:
    return NoisyTinyCNN()


def tiny_cnn_with_statistics() -> nn.Module:
    """TinyCNN whose BatchNorm layers carry statistics and affine parameters drawn from torch's global
    generator: a factory with no pretrained weights whose own initialisation is not an identity BN."""
    model = TinyCNN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return model


def python_random_tiny_cnn() -> nn.Module:
    """TinyCNN whose first conv is drawn from Python's ``random`` module, not torch's generator."""
    import random

    model = tiny_cnn_with_statistics()
    with torch.no_grad():
        model.conv1.weight.copy_(torch.tensor([random.gauss(0, 0.3) for _ in range(model.conv1.weight.numel())])
                                 .reshape(model.conv1.weight.shape))
    return model


def unseeded_tiny_cnn() -> nn.Module:
    """TinyCNN initialised from a non-deterministic seed (``torch.seed()``): no seed rebuilds it."""
    torch.seed()
    return tiny_cnn_with_statistics()

"""A model whose activations reach about 1e8 on their way to outputs near 1: two branches that
normalise with a variance of 1e-16 and then cancel.  Any float64 computation of it, folded or not,
carries about eps64 x 1e8 of rounding in its outputs, far above a relative tolerance of 1e-9 of them."""

from __future__ import annotations

import torch
from torch import nn


class Cancel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        f64 = {"dtype": torch.float64}  # built in float64: the branches differ by 3e-8, below float32's eps
        self.a = nn.Conv2d(3, 8, 3, padding=1, **f64)
        self.b = nn.Conv2d(3, 8, 3, padding=1, **f64)
        self.bn_a = nn.BatchNorm2d(8, eps=1e-18, **f64)
        self.bn_b = nn.BatchNorm2d(8, eps=1e-18, **f64)
        self.head = nn.Conv2d(8, 4, 1, **f64)
        with torch.no_grad():
            self.b.load_state_dict(self.a.state_dict())
            self.b.weight.mul_(1 + 3e-8)
            for bn in (self.bn_a, self.bn_b):
                bn.running_var.fill_(1e-16)
            self.bn_a.running_mean.uniform_(-0.1, 0.1, generator=g)
            self.bn_a.weight.uniform_(0.5, 1.5, generator=g)
            self.bn_b.running_mean.copy_(self.bn_a.running_mean)
            self.bn_b.weight.copy_(self.bn_a.weight)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.head(torch.relu(self.bn_a(self.a(x))) - torch.relu(self.bn_b(self.b(x))))


def cancel() -> nn.Module:
    """The model (in float64)."""
    return Cancel()


class MergedCancel(Cancel):
    """The same branches summed without the ReLUs: the difference merges into one conv whose float64
    kernel is computed from terms 1e7 times larger than their sum."""

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.head(self.bn_a(self.a(x)) - self.bn_b(self.b(x)))

"""Tiny models with sibling layers on one input, for horizontal fusion (``models_horizontal:NAME``)."""

from __future__ import annotations

import torch
from torch import nn


class BasicConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """GoogLeNet's block: three 1x1 convs (each in its wrapper, two inside Sequentials) on the input,
    a 3x3 conv on a pool of it, concatenated."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.branch1 = BasicConv(c, 4)
        self.branch2 = nn.Sequential(BasicConv(c, 3), BasicConv(3, 5, 3))
        self.branch3 = nn.Sequential(BasicConv(c, 2), BasicConv(2, 4, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), BasicConv(c, 3))
        self.strided = nn.Conv2d(c, 4, 1, stride=2)  # another 1x1 on the input, but strided: not a sibling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)
        return y + nn.functional.interpolate(self.strided(x), size=y.shape[-2:]).sum(1, keepdim=True)


class QKV(nn.Module):
    """Attention with separate query, key and value Linear layers."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(5, dim)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for t in (self.query(x), self.key(x), self.value(x)))
        return self.out(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Untraceable(nn.Module):
    """Two sibling 1x1 convs in a forward with data-dependent control flow: fx cannot trace it."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.a, self.b = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if float(x.sum()) > 1e9:
            return self.a(x)
        return self.a(x) * self.b(x)


class Fire(nn.Module):
    """SqueezeNet's Fire module with both expand convs 1x1: siblings whose ReLU'd outputs are
    concatenated in order anyway (one conv, one ReLU, no slice and no concatenation once fused)."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(3, c, 1)
        self.expand_a, self.expand_b = nn.Conv2d(c, 4, 1), nn.Conv2d(c, 5, 1)
        self.act_a, self.act_b = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([self.act_a(self.expand_a(x)), self.act_b(self.expand_b(x))], 1)


class Mixed(nn.Module):
    """Siblings followed by different activations, and siblings concatenated out of order: the
    activations stay per slice and the slices stay."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.a, self.b = nn.Conv2d(c, 4, 1), nn.Conv2d(c, 4, 1)
        self.c, self.d = nn.Conv2d(c, 3, 3, padding=1), nn.Conv2d(c, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.a(x)) + torch.sigmoid(self.b(x))
        d = self.d(x)  # the wider layer's slices in call order: d, c
        return torch.cat([y, self.c(x), d], 1)

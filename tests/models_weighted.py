"""Tiny blocks whose sum of branches is weighted: a difference, a per-channel layer scale (a module
or a tensor the block holds), a mean of two Linear heads, and one branch plus zero.  Each is a
small model (``models_weighted:NAME`` builds one for the CLI)."""

from __future__ import annotations

import torch
from torch import nn


def _cbn(c: int, k: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(c))


class Scale2d(nn.Module):
    """A layer scale written as a module (timm's ``LayerScale2d``): ``x * gamma`` per channel."""

    def __init__(self, c: int, init: float = 0.1) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init * torch.linspace(0.5, 2.0, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class NormOnly(nn.Module):
    """A block that is its BatchNorm, plus zero (FastViT's ``MobileOneBlock`` with only a BN)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        out = out + self.identity(x)
        return self.act(out)


class RepMixer(nn.Module):
    """FastViT's RepMixer: ``x + layer_scale(mixer(x) - norm(x))``."""

    def __init__(self, c: int = 8, wrapped_norm: bool = False) -> None:
        super().__init__()
        self.mixer = _cbn(c, 3, groups=c)
        self.norm = NormOnly(c) if wrapped_norm else nn.BatchNorm2d(c)
        self.layer_scale = Scale2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale(self.mixer(x) - self.norm(x))


class HeldScale(nn.Module):
    """The scale as a tensor the block holds, reshaped in the forward: ``x + g * (conv(x) - bn(x))``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = _cbn(c, 3)
        self.bn = nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.linspace(-1.0, 1.5, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma.reshape(1, -1, 1, 1) * (self.conv(x) - self.bn(x))


class WrongAxisScale(nn.Module):
    """A scale along the width, not the channels: it must stay."""

    def __init__(self, c: int = 8, w: int = 6) -> None:
        super().__init__()
        self.conv = _cbn(c, 3)
        self.other = _cbn(c, 1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.gamma * self.other(x)


class NormLinear(nn.Module):
    """RepViT's head: BatchNorm1d, dropout, Linear."""

    def __init__(self, c: int, n: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(c)
        self.drop = nn.Dropout(0.1)
        self.linear = nn.Linear(c, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x)))


class TwoHeads(nn.Module):
    """RepViT's distilled classifier: the mean of two heads on the same features."""

    def __init__(self, c: int = 8, n: int = 5) -> None:
        super().__init__()
        self.head = NormLinear(c, n)
        self.head_dist = NormLinear(c, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.head(x) + self.head_dist(x)) / 2


class ZeroPlusOne(nn.Module):
    """``out = 0; out += conv(x)``: MobileOne's block with a single branch."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv_kxk = nn.ModuleList([_cbn(c, 3)])
        self.attn = nn.Identity()  # MobileOne's absent attention
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for ck in self.conv_kxk:
            out += ck(x)
        return self.act(self.attn(out))


class Model(nn.Module):
    """A stem, the block, and a ReLU (so the block reads a computed tensor)."""

    def __init__(self, block: nn.Module, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.stem(x)))


class HeadModel(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.features = nn.Linear(12, c)
        self.classifier = TwoHeads(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.features(x)))


def Mixer(**kwargs) -> nn.Module:  # noqa: N802
    return Model(RepMixer(**kwargs))


def WrappedMixer(**kwargs) -> nn.Module:  # noqa: N802
    return Model(RepMixer(wrapped_norm=True, **kwargs))


def Held(**kwargs) -> nn.Module:  # noqa: N802
    return Model(HeldScale(**kwargs))


def WrongAxis(**kwargs) -> nn.Module:  # noqa: N802
    return Model(WrongAxisScale(**kwargs))


def Heads(**kwargs) -> nn.Module:  # noqa: N802
    return HeadModel(**kwargs)


def Zero(**kwargs) -> nn.Module:  # noqa: N802
    return Model(ZeroPlusOne(**kwargs))

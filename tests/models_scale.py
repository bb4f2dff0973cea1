"""Tiny blocks with a per-channel scale next to a Conv/Linear, each written the way a family writes
it: a ``LayerScale`` module (timm's ViTs), a parameter multiplied in the forward (CaiT's
``gamma_1``, ResMLP's ``ls2``), ConvNeXt's ``layer_scale`` after a Linear and a permute, an ``Affine``
before a Linear (ResMLP's ``norm2``), ResMLP's final ``Affine`` before its pooled head, a scale after
a conv's BatchNorm (EfficientFormer); and the ones that must stay: a scale across tokens, after an
arithmetic result, on a layer read twice, and a shift before a zero-padded conv.  ``models_scale:NAME`` builds each."""

from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 0.5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init * torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class LayerScale2d(LayerScale):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class Affine(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.linspace(0.5, 1.5, dim).reshape(1, 1, dim))
        self.beta = nn.Parameter(torch.linspace(-1.0, 1.0, dim).reshape(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, self.alpha, x)


class Affine2d(Affine):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha.reshape(1, -1, 1, 1) + self.beta.reshape(1, -1, 1, 1)


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class Tokens(nn.Module):
    """A token-mixing ViT-ish block: ``x + ls1(proj(x))`` (a module), ``x + gamma_2 * fc(x)`` (a
    parameter), with a dropout in between, and ResMLP's ``Affine`` before a Linear."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)
        self.ls1 = LayerScale(dim)
        self.norm2 = Affine(dim)
        self.fc = nn.Linear(dim, dim)
        self.gamma_2 = nn.Parameter(torch.linspace(-1.0, 2.0, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.drop(self.proj(x)))
        return x + self.gamma_2 * self.fc(self.norm2(x))


class ConvNeXt(nn.Module):
    """torchvision's CNBlock: the layer scale multiplies a Linear's output permuted back to NCHW."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim),
                                   Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.linspace(0.5, 1.5, dim).reshape(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


class ConvBN(nn.Module):
    """EfficientFormer's Meta4D block: an MLP ending in a conv and its BatchNorm, then a ``LayerScale2d``."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.ReLU(), nn.Conv2d(2 * dim, dim, 1), nn.BatchNorm2d(dim))
        self.ls2 = LayerScale2d(dim)
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.ls1 = LayerScale2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.pool(x) - x)  # EfficientFormer's first scale: after pool(x) - x, it stays
        return x + self.ls2(self.mlp(x))


class TokenMixing(nn.Module):
    """ResMLP's token-mixing branch: the scale is on the channels, the Linear mixes tokens."""

    def __init__(self, dim: int = 8, tokens: int = 6) -> None:
        super().__init__()
        self.linear_tokens = nn.Linear(tokens, tokens)
        self.ls1 = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls1 * self.linear_tokens(x.transpose(1, 2)).transpose(1, 2)


class ReadTwice(nn.Module):
    """The layer's output is also read by a ReLU: the scale must stay."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.ls = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return self.ls(y) + torch.relu(y)


class ShiftBeforePaddedConv(nn.Module):
    """An affine map with a shift before a zero-padded conv: the padding would not get the shift."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.affine = Affine2d(dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.affine(x))


class TokenModel(nn.Module):
    def __init__(self, block: nn.Module, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.embed(x)))


class ConvModel(nn.Module):
    def __init__(self, block: nn.Module, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.stem(x)))


class PooledHead(nn.Module):
    """ResMLP's end: its final ``Affine`` norm, the mean over the tokens, a dropout and the head: the
    Affine folds forward into the head through the mean (it follows a ReLU: not backward)."""

    def __init__(self, dim: int = 12, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.norm = Affine(dim)
        self.head_drop = nn.Dropout(0.1)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(torch.relu(self.embed(x)))
        return self.head(self.head_drop(x.mean(dim=1)))


def Vit(**kw) -> nn.Module:  # noqa: N802
    return TokenModel(Tokens(**kw))


def Next(**kw) -> nn.Module:  # noqa: N802
    return ConvModel(ConvNeXt(**kw))


def Former(**kw) -> nn.Module:  # noqa: N802
    return ConvModel(ConvBN(**kw))


def Mixing(**kw) -> nn.Module:  # noqa: N802
    return TokenModel(TokenMixing(**kw))


def Twice(**kw) -> nn.Module:  # noqa: N802
    return TokenModel(ReadTwice(**kw))


def Shift(**kw) -> nn.Module:  # noqa: N802
    return ConvModel(ShiftBeforePaddedConv(**kw))


def Pooled(**kw) -> nn.Module:  # noqa: N802
    return PooledHead(**kw)

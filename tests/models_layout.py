"""A BatchNorm whose output reaches a Linear through layout ops (FastViT's attention block), and one
whose flatten merges its channels with the positions (it must stay).  ``models_layout:NAME``."""

from __future__ import annotations

import torch
from torch import nn


class Attn(nn.Module):
    def __init__(self, c: int = 6, mode: str = "transpose") -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.BatchNorm2d(c)
        self.mode = mode
        self.qkv = nn.Linear(c * (16 if mode == "merged" else 1), 3 * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))  # the BatchNorm follows a ReLU: it cannot fold backward
        z = self.norm(y)
        if self.mode == "transpose":
            t = z.flatten(2).transpose(-2, -1)  # (B, HW, C): the channels are the Linear's features
        elif self.mode == "permute":
            t = z.permute(0, 2, 3, 1)
        else:
            t = z.flatten(1)  # (B, C*H*W): the channels merged with the positions
        return self.qkv(t) + y.mean()


def Transpose(**kw) -> nn.Module:  # noqa: N802
    return Attn(mode="transpose", **kw)


def Permute(**kw) -> nn.Module:  # noqa: N802
    return Attn(mode="permute", **kw)


def Merged(**kw) -> nn.Module:  # noqa: N802
    return Attn(mode="merged", **kw)


class Pooled(nn.Module):
    """A classifier's end: a BatchNorm after a ReLU (it cannot fold backward), global average pooling
    and the head.  ``pool``: ``AdaptiveAvgPool2d(1)`` and ``Flatten``; ``mean``: ``x.mean((2, 3))``;
    ``relu``: a ReLU after the pooling; ``shared``: the pooled features also summed; ``conv``: a
    zero-padded conv as the head."""

    def __init__(self, mode: str = "pool", c: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.BatchNorm2d(c)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten(1)
        self.head = nn.Conv2d(c, classes, 3, padding=1) if mode == "conv" else nn.Linear(c, classes)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(torch.relu(self.stem(x)))
        if self.mode == "mean":
            return self.head(z.mean((2, 3)))
        if self.mode == "conv":
            return self.head(self.pool(z)).flatten(1)
        pooled = self.flatten(self.pool(z))
        if self.mode == "relu":
            return self.head(torch.relu(pooled))
        if self.mode == "shared":
            return self.head(pooled) + pooled.sum(1, keepdim=True)
        return self.head(pooled)


def Pool(**kw) -> nn.Module:  # noqa: N802
    return Pooled(mode="pool", **kw)

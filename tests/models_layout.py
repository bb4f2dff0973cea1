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

"""Affine steps between a conv and its BatchNorm: ``bn(conv(x) * a + b)`` with constants."""

from __future__ import annotations

import torch
from torch import nn


class ChainBlock(nn.Module):
    """conv -> * 2.0 -> + per-channel buffer -> - 0.5 -> / per-channel parameter -> BN; ``relu_in``
    puts a ReLU in the chain (not affine: stays), ``computed`` multiplies by a value computed in the
    forward (not a constant: stays)."""

    def __init__(self, c: int = 8, relu_in: bool = False, computed: bool = False) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, c).view(1, c, 1, 1))
        self.divisor = nn.Parameter(torch.linspace(0.5, 2.0, c).view(c, 1, 1))
        self.relu_in, self.computed = relu_in, computed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * 2.0
        if self.relu_in:
            y = torch.relu(y)
        if self.computed:
            y = y * x.mean()
        y = (y + self.offset - 0.5) / self.divisor
        return self.bn(y)


class ChainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = ChainBlock(), ChainBlock(relu_in=True), ChainBlock(computed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.c(x)


class ConvMulAddBn(nn.Module):
    """PyTorch's ``Conv_Mul_Add_Bn`` (test/jit/test_freezing.py, ``test_conv_mul_add_bn``): conv, then
    ``torch.mul`` and ``torch.add`` by plain tensor attributes (a float and an integer tensor), then a
    BatchNorm, all in the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, stride=1)
        self.bn = nn.BatchNorm2d(8, eps=0.001)
        self.tensor1 = torch.tensor(2.2)
        self.tensor2 = torch.tensor(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.add(torch.mul(self.conv(x), self.tensor1), self.tensor2))


class LeftBlock(nn.Module):
    """conv -> ``c - y`` or ``c / y`` -> BN, the constant on the left: a number, a plain tensor attribute
    or a buffer (one value per channel).  ``c - y`` is ``-y + c``, an affine map: it folds; ``c / y`` is
    not affine in ``y``: it stays."""

    def __init__(self, op: str, kind: str, c: int = 8) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        const = torch.linspace(1.5, 3.0, c).view(1, c, 1, 1)
        if kind == "buffer":
            self.register_buffer("c", const)
        else:
            self.c = 2.5 if kind == "number" else const
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(self.c - y if self.op == "sub" else self.c / y)


class LeftNet(nn.Module):
    """``c - y`` and ``c / y`` before a BatchNorm, with ``c`` a number, a tensor attribute and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({f"{op}_{kind}": LeftBlock(op, kind) for op in ("sub", "div")
                                     for kind in ("number", "attribute", "buffer")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([b(x) for b in self.blocks.values()]).sum(0)

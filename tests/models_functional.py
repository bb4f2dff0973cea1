"""Batch norms written as ``F.batch_norm`` calls in a module's own forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvFBN(nn.Module):
    """conv -> F.batch_norm with the module's own statistics and affine parameters -> relu."""

    def __init__(self, cin: int = 3, cout: int = 8, training: bool = False, also_return: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.register_buffer("running_mean", torch.linspace(-0.5, 0.5, cout))
        self.register_buffer("running_var", torch.linspace(0.3, 1.7, cout))
        self.weight = nn.Parameter(torch.linspace(0.6, 1.4, cout))
        self.bias = nn.Parameter(torch.linspace(-0.3, 0.3, cout))
        self.training_stats, self.also_return = training, also_return

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = F.relu(F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training_stats, 0.0, 1e-3))
        return z + y if self.also_return else z


class FunctionalNet(nn.Module):
    """Three functional batch norms: one folds, one normalises with batch statistics (stays), one
    whose conv output is also added to its result (stays); and a BatchNorm module."""

    def __init__(self) -> None:
        super().__init__()
        self.a = ConvFBN(3, 8)
        self.b = ConvFBN(8, 8, training=True)
        self.c = ConvFBN(8, 8, also_return=True)
        self.conv = nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.c(self.b(self.a(x)))))


def _stats(channels: int, seed: int) -> "tuple[torch.Tensor, ...]":
    """Statistics the way PyTorch's own folding tests make them: measured on a random batch, and kept
    as plain tensor attributes (neither buffers nor parameters); seeded, so the model's code makes the
    same ones again when bnfuse rebuilds it."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.rand(3, channels, 6, 6, generator=g) * 2 - 0.5
    return (torch.mean(batch, dim=(0, 2, 3)), torch.var(batch, dim=(0, 2, 3)),
            torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g))


class ConvFunctionalBN(nn.Module):
    """PyTorch's ``ConvFunctionalBN`` (test/inductor/test_inductor_freezing.py): ``F.batch_norm`` on a
    conv's output in the model's own forward, its statistics and affine parameters plain tensor
    attributes.  ``shared``: two calls read the same conv output (its
    ``test_conv_functional_bn_with_multi_bn_share_conv``): neither may fold into that conv."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, bias=True)
        self.running_mean, self.running_var, self.weight, self.bias = _stats(8, seed=11)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tmp = self.conv(x)
        tmp1 = F.batch_norm(tmp, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5)
        if not self.shared:
            return tmp1
        tmp2 = F.batch_norm(tmp, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5)
        return tmp1 + tmp2


def SharedConvFunctionalBN() -> nn.Module:  # noqa: N802
    return ConvFunctionalBN(shared=True)


#: a tensor of this module, not of the model: bnfuse cannot read it by a name the model holds
GLOBAL_MEAN = torch.linspace(-0.2, 0.2, 8)


class Unresolved(nn.Module):
    """Functional batch norms whose tensors bnfuse cannot resolve: a global mean (``a``), a variance
    computed in the forward (``b``), a weight from a closure (``c``); and one that folds (``d``), its
    mean a buffer and its variance a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(3 if i == 0 else 8, 8, 1) for i in range(4))
        self.register_buffer("mean", torch.linspace(-0.5, 0.5, 8))
        self.var = torch.linspace(0.5, 1.5, 8)
        closed = torch.linspace(0.8, 1.2, 8)
        self.weight_of = lambda: closed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(self.a(x), GLOBAL_MEAN, self.var, None, None, False, 0.1, 1e-5)
        x = F.batch_norm(self.b(x), self.mean, self.var.clamp(min=0.6), None, None, False, 0.1, 1e-5)
        x = F.batch_norm(self.c(x), self.mean, self.var, self.weight_of(), None, False, 0.1, 1e-5)
        return F.batch_norm(self.d(x), self.mean, self.var, None, None, False, 0.1, 1e-5)

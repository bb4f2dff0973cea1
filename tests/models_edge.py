"""Tiny hand-made models, one per edge case of finding fold sites (importable by any test).

Each model takes a small input (``x`` of shape (2, 3, 6, 6) unless its forward says otherwise)
and has random conv/linear weights; tests randomise the BN statistics with ``randomize_bn``
and compare in float64.  Names of the layers are chosen so a test can assert that a skip
reason names the right layer and the right reader.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# folds backward (BN after the layer that produced its input)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


class _ResidualBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv1(x)
        out = self.bn1(y)
        out += y  # the conv output is read again: folding would change the residual
        return out


class ResidualRead(nn.Module):
    """``layer1.0.conv1``'s output feeds ``bn1`` and a residual add in ``layer1.0``: skip."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(_ResidualBlock())

    def forward(self, x):
        return self.layer1(x)


class ConvReturned(nn.Module):
    """The conv output is returned as well as normalised: skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


class ConvTwiceBNOnce(nn.Module):
    """One conv called twice, BN after the first call only (pytorch#104593): skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


class ConvTwiceBNTwice(nn.Module):
    """One conv called twice, each call followed by the same BN: exact fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.bn(self.conv(torch.relu(y)))


class SharedBN(nn.Module):
    """One BN module normalises the outputs of two different convs: both convs absorb it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn(self.c1(x)) * self.bn(self.c2(x))


class BNReadTwice(nn.Module):
    """The same BN applied twice to one conv output: the output only feeds this BN, so it folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) - 0.5 * self.bn(y)


class RegistrationOrder(nn.Module):
    """Layers registered in an order that pairs them wrongly by adjacency (all have 6 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(6, 6, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 6, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.conv_a(x)))
        return self.bn_b(self.conv_b(y))


class ConcatBN(nn.Module):
    """DenseNet-like: BN after a cat of the block input and a conv output: skip ("follows cat")."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.norm(torch.cat([x, self.c1(x)], 1))


class MixedConvBN(nn.Module):
    """MixNet-like: split the channels, one conv per part, cat, BN: each conv takes its slice."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Conv2d(2, 5, 5, padding=2)])
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):  # x: (N, 4, H, W)
        parts = torch.split(x, 2, dim=1)
        return self.bn(torch.cat([conv(p) for conv, p in zip(self.convs, parts)], dim=1))


class CatOnWrongAxis(nn.Module):
    """A cat along the width, then BN: the producers' channels are not split by it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.cat([self.c1(x), self.c2(x)], dim=3))


class LinearFlattenBN(nn.Module):
    """levit-like: Linear on (B, N, C), ``flatten(0, 1)``, BatchNorm1d over C, reshaped back."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 6, bias=False)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):  # x: (B, N, 5)
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class LinearViewWrongAxis(nn.Module):
    """Linear on (B, 6, 4) viewed as (B*4, 6): the BN's axis mixes Linear features and rows."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):  # x: (B, 6, 4)
        return self.bn(self.linear(x).transpose(1, 2).reshape(-1, 6))


class ConvFlattenBN1d(nn.Module):
    """A 1x1-spatial conv output flattened to (N, C), then BatchNorm1d(C)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 6)
        self.bn = nn.BatchNorm1d(7)

    def forward(self, x):  # x: (N, 3, 6, 6) -> (N, 7, 1, 1)
        return self.bn(torch.flatten(self.conv(x), 1))


class PreActivation(nn.Module):
    """conv -> ReLU -> BN -> ReLU -> conv: the BN follows a ReLU and is followed by one: skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv0(x))
        return self.conv1(F.relu(self.bn(y)))


class InplaceReluBetween(nn.Module):
    """conv -> in-place ReLU -> BN: the BN reads the conv's tensor object after a ReLU changed it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.act(self.conv(x)))


# --------------------------------------------------------------------------------------------
# folds forward (BN before the layer that reads its output)


class InputBNConv(nn.Module):
    """BN on the model input, then a conv: folds forward unless the conv zero-pads."""

    def __init__(self, padding: int = 0, padding_mode: str = "zeros", groups: int = 1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, 3, padding=padding, padding_mode=padding_mode, groups=groups)

    def forward(self, x):
        return self.conv(self.bn(x))


class BNPadConv(nn.Module):
    """BN on the model input (1-D, 2-D or 3-D), optionally ``F.pad`` (``pad``), then a conv built from
    ``conv`` (kernel_size, padding...): for padding on one axis only, or on one side only."""

    def __init__(self, dim: int, pad: "tuple[int, ...] | None" = None, **conv) -> None:  # noqa: ANN003
        super().__init__()
        self.bn = getattr(nn, f"BatchNorm{dim}d")(3)
        self.pad = pad
        self.conv = getattr(nn, f"Conv{dim}d")(3, 4, **conv)

    def forward(self, x):
        x = self.bn(x)
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.conv(x)


class BN1dLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.bn(x))


class LinearBN1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 7, bias=False)
        self.bn = nn.BatchNorm1d(7)

    def forward(self, x):
        return self.bn(self.fc(x))


class LinearBN1dWrongAxis(nn.Module):
    """Linear on (N, C, L) then BatchNorm1d(C) with C == out_features: BN is on the wrong axis."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(4, channels)
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x):  # x: (N, channels, 4)
        return self.bn(self.fc(x))


# --------------------------------------------------------------------------------------------
# norm and producer variants


class ConvNorm(nn.Module):
    """conv -> ``norm``, for any norm-like module and any producer."""

    def __init__(self, norm: nn.Module, conv: "nn.Module | None" = None) -> None:
        super().__init__()
        self.conv = conv if conv is not None else nn.Conv2d(3, 4, 3, padding=1)
        self.bn = norm

    def forward(self, x):
        return self.bn(self.conv(x))


class PlainBNSubclass(nn.BatchNorm2d):
    """Changes nothing in forward: folds like a BatchNorm2d."""

    def extra_repr(self) -> str:
        return "plain subclass, " + super().extra_repr()


class ClampedBN(nn.BatchNorm2d):
    """Overrides forward: it does more than normalise, so it must stay."""

    def forward(self, x):
        return super().forward(x).clamp(-0.5, 0.5)


class MyConv3d(nn.Conv3d):
    """Like torchvision's ``Conv3DSimple``: an ``nn.Conv3d`` subclass that keeps forward."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, kernel_size=(3, 3, 3), padding=1, bias=False)


class StdConv2d(nn.Conv2d):
    """Weight standardisation inside ``_conv_forward``: the stored weight is not the one used."""

    def _conv_forward(self, input, weight, bias):
        w = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(input, w, bias)


# --------------------------------------------------------------------------------------------
# control flow, several inputs and outputs, shared parameters


class DataDependent(nn.Module):
    """Python control flow on values: ``torch.fx.symbolic_trace`` cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return self.bn2(self.conv2(x)) * 2


class MultiIO(nn.Module):
    """Two tensor inputs; a dict holding a tuple and a list comes out."""

    def __init__(self) -> None:
        super().__init__()
        self.ca = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bna = nn.BatchNorm2d(4)
        self.fb = nn.Linear(5, 6)
        self.bnb = nn.BatchNorm1d(6)

    def forward(self, a, b):
        ya = self.bna(self.ca(a))
        yb = self.bnb(self.fb(b))
        return {"a": (ya, ya.mean()), "b": [yb, torch.relu(yb)]}


class BNParamsRead(nn.Module):
    """The BN's weight is also read by the model (a scale derived from it): skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.weight.abs().mean()


class TiedConvWeights(nn.Module):
    """``conv_b`` shares ``conv_a``'s weight Parameter; only ``conv_a`` is followed by a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.conv_b = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.conv_b.weight = self.conv_a.weight

    def forward(self, x):
        return self.conv_b(self.bn(self.conv_a(x))) + 0


class ConvWeightReadFunctionally(nn.Module):
    """Another module convolves with ``conv``'s weight through ``F.conv2d``: skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.head = _WeightReader(self.conv)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


class _WeightReader(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self._conv = [conv]  # not registered: the weight is only *read* from here

    def forward(self, x):
        return F.conv2d(x, self._conv[0].weight, padding=1)



class PassThroughOps(nn.Module):
    """conv -> no-op ``.to``/``.contiguous`` -> Dropout (eval) -> BN: nothing reads the values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = x.type_as(self.conv.weight)  # reads only the weight's dtype
        y = self.conv(x).to(x.dtype).contiguous()
        return self.bn(self.drop(y)) + torch.zeros_like(y)


class InplaceLeakyBetween(nn.Module):
    """conv -> LeakyReLU(inplace=True) (passed positionally by torch) -> BN: skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.LeakyReLU(0.1, True)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.act(self.conv(x)))


class FunctionalBN(nn.Module):
    """The BN module's buffers are used through ``F.batch_norm``; the module is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        b = self.bn
        return F.batch_norm(self.conv(x), b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)


# --------------------------------------------------------------------------------------------
# reads that are easy to miss: each must keep the BN in place


class AtenOpRead(nn.Module):
    """The conv output is also read through ``torch.ops.aten``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + torch.ops.aten.mul(y, 2.0)


class _Triple(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y * 3

    @staticmethod
    def backward(ctx, g):
        return g * 3


class CustomFunctionRead(AtenOpRead):
    """The conv output is also read by a custom autograd Function."""

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + _Triple.apply(y)


class _Head(nn.Module):
    def forward(self, y):
        return y * 2


class ScriptedReader(AtenOpRead):
    """A TorchScript submodule (no hooks, no visible ops) also reads the conv output."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.jit.script(_Head())

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + self.head(y)


@dataclasses.dataclass
class Features:
    normalised: torch.Tensor
    raw: torch.Tensor


class DataclassOutput(AtenOpRead):
    """The raw conv output leaves the model inside a dataclass (pytree does not look inside)."""

    def forward(self, x):
        y = self.conv(x)
        return Features(self.bn(y), y)


class StoredFeature(AtenOpRead):
    """The raw conv output is kept on the module for later (feature extraction)."""

    def forward(self, x):
        y = self.conv(x)
        self.feat = y
        return self.bn(y)


class SwitchesBNToTrain(AtenOpRead):
    """The model puts its BN in training mode itself: batch statistics, not foldable."""

    def forward(self, x):
        self.bn.train()
        out = self.bn(self.conv(x))
        self.bn.eval()
        return out


class StorageSharedWeight(nn.Module):
    """The conv weight is a view of another parameter's memory (create in the final dtype)."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        big = torch.randn(8, 3, 3, 3, dtype=dtype)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=dtype)
        self.conv.weight = nn.Parameter(big[:4])
        self.other = nn.Parameter(big)
        self.bn = nn.BatchNorm2d(4, dtype=dtype)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.other.sum()


class LinearUnsqueezeBN1d(nn.Module):
    """Linear (N, F) -> ``unsqueeze(-1)`` (N, F, 1) -> BatchNorm1d(F): axis 1 is still F."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):  # x: (N, 5)
        return self.bn(self.fc(x).unsqueeze(-1))


class ConcatenateAxisKwarg(nn.Module):
    """``torch.concatenate(..., axis=1)`` of two conv outputs, then BN."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 2, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn(torch.concatenate([self.c1(x), self.c2(x)], axis=1))


class CatPartReadTwice(nn.Module):
    """A cat of two conv outputs, but one of them also feeds a residual add: skip."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        a, b = self.c1(x), self.c2(x)
        return self.bn(torch.cat([a, b], 1))[:, :4] + a


class GatedByMean(nn.Module):
    """Conv -> BN, fed zeros unless the input's mean is above 2: random inputs never reach the
    conv's weight (nor does the activation its fold site sees), only shifted real data does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = (x.mean() > 2).to(x.dtype)
        return self.bn(self.conv(x * gate)).mean((2, 3))


class SeqConvNorm(nn.Sequential):
    """RepViT's ``ConvNorm``: a Sequential of a conv and its BatchNorm."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, 3, padding=1, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class WrappedConvs(nn.Module):
    """A ``ConvNorm`` Sequential (folds, then the conv takes its place) and torchvision's
    conv-BN-ReLU Sequential (the BN is in the middle: every index stays)."""

    def __init__(self) -> None:
        super().__init__()
        self.cn = SeqConvNorm(3, 4)
        self.cbr = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.cbr(torch.relu(self.cn(x)))

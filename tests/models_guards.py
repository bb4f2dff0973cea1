"""One tiny model per guard of a pass (``models_guards:NAME``): each is a model a pass must refuse to
rewrite, written as people write models (hooks registered in ``__init__``, a layer called twice, a
tensor returned beside the output, a statistic computed in the forward, a constant on the left of
``-`` and ``/``).  tests/test_guards.py fuses each and checks the refusal and that the model stays exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def plus_one(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """A forward hook that changes the output (an affine hook: a fold through it is wrong)."""
    return out + 1.0


def double_input(module: nn.Module, args: tuple) -> tuple:
    """A forward pre-hook that changes the input."""
    return (args[0] * 2.0,)


def count(module: nn.Module, *args: object) -> None:
    """An observing hook (a feature extractor's, a profiler's): it only counts the calls it sees."""
    module.seen = getattr(module, "seen", 0) + 1


class Stem(nn.Module):
    """A conv and a ReLU before the block under test: a BatchNorm on its output cannot fold backward."""

    def __init__(self, block: nn.Module, cin: int = 3, c: int = 4, relu: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(cin, c, 3, padding=1)
        self.relu = relu
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.block(torch.relu(y) if self.relu else y)


# ----------------------------------------------------------------------------- fold: backward


class NormHooked(nn.Module):
    """conv -> bn, the BatchNorm with a forward hook (``pre``: a forward pre-hook) that changes its output."""

    def __init__(self, pre: bool = False) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        if pre:
            self.bn.register_forward_pre_hook(double_input)
        else:
            self.bn.register_forward_hook(plus_one)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def NormPreHooked() -> nn.Module:  # noqa: N802
    return NormHooked(pre=True)


class LayerHooked(nn.Module):
    """conv -> bn, the conv with a forward hook (``pre``: a forward pre-hook) that changes what it computes."""

    def __init__(self, pre: bool = False) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        if pre:
            self.conv.register_forward_pre_hook(double_input)
        else:
            self.conv.register_forward_hook(plus_one)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def LayerPreHooked() -> nn.Module:  # noqa: N802
    return LayerHooked(pre=True)


class CatReadElsewhere(nn.Module):
    """bn(cat(c1, c2)), the cat also read by a mean (``returned``: also returned)."""

    def __init__(self, returned: bool = False) -> None:
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(5)
        self.returned = returned

    def forward(self, x: torch.Tensor) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
        c = torch.cat([self.c1(x), self.c2(x)], 1)
        return (self.bn(c), c) if self.returned else self.bn(c) + c.mean()


def CatReturned() -> nn.Module:  # noqa: N802
    return CatReadElsewhere(returned=True)


class CatSwapped(nn.Module):
    """One BatchNorm on cat(c1, c2) and on cat(c2, c1): each conv gives other channels on its two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.c1(x), self.c2(x)], 1)) + self.bn(torch.cat([self.c2(x), self.c1(x)], 1))


class ReshapeAcross(nn.Module):
    """A conv's (N, 2, 2, 1) output reshaped to (2N, 2) before a BatchNorm1d(2): its axis 1 is the
    height, not the conv's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 2, (5, 6)), nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x).reshape(-1, 2))


# ----------------------------------------------------------------------------- fold: forward (a BatchNorm on the input)


class InputNormTwoLayers(nn.Module):
    """One BatchNorm on the input, called twice, each output into another conv."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.c1, self.c2 = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c1(self.bn(x)) + self.c2(self.bn(x))


class InputNormRead(nn.Module):
    """bn(x) into an unpadded conv, and also read by a mean (``returned``: also returned)."""

    def __init__(self, returned: bool = False) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)
        self.returned = returned

    def forward(self, x: torch.Tensor) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
        y = self.bn(x)
        return (self.conv(y), y) if self.returned else self.conv(y) + y.mean()


def InputNormReturned() -> nn.Module:  # noqa: N802
    return InputNormRead(returned=True)


class InputNormConvTwice(nn.Module):
    """conv(bn(x)) + conv(x): the conv after the BatchNorm also reads the raw input."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x)) + self.conv(x)


class InputNormTransposed(nn.Module):
    """bn(x) into a ConvTranspose2d."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.up = nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.bn(x))


class InputNorm1dLinear(nn.Module):
    """BatchNorm1d on (N, C, L), then a Linear over L: its features are not the BatchNorm's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


def InputNormAct() -> nn.Module:  # noqa: N802
    """timm's BatchNormAct2d (norm, then ReLU) on the input before an unpadded conv."""
    from timm.layers import BatchNormAct2d

    return nn.Sequential(BatchNormAct2d(3, act_layer=nn.ReLU), nn.Conv2d(3, 4, 1))


# ----------------------------------------------------------------------------- standardise (timm)


class StdConvs(nn.Module):
    """timm's StdConv2d: ``kind`` "same" pads at run time (StdConv2dSame, stride 2), "unused" is never
    called, "hooked" has an observing forward hook."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        from timm.layers import StdConv2d, StdConv2dSame

        self.kind = kind
        self.conv = StdConv2dSame(3, 4, 3, stride=2, padding="SAME") if kind == "same" else StdConv2d(3, 4, 3, padding=1)
        self.plain = nn.Conv2d(3, 4, 3, stride=2 if kind == "same" else 1, padding=1)
        if kind == "hooked":
            self.conv.register_forward_hook(count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain(x) if self.kind == "unused" else self.conv(x)


def StdSame() -> nn.Module:  # noqa: N802
    return StdConvs("same")


def StdUnused() -> nn.Module:  # noqa: N802
    return StdConvs("unused")


def StdHooked() -> nn.Module:  # noqa: N802
    return StdConvs("hooked")


# ----------------------------------------------------------------------------- chain (affine steps before a BatchNorm)


class Chain(nn.Module):
    """conv -> affine steps -> bn, written in the ways ``kind`` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.register_buffer("offset", torch.linspace(0.5, 1.5, 4).view(1, 4, 1, 1))
        self.register_buffer("mask", torch.linspace(0.5, 1.5, 4 * 36).view(1, 4, 6, 6))  # one value per position

    def forward(self, x: torch.Tensor) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
        k = self.kind
        y = self.conv(x)
        if k == "kept":
            self.last = y
        if k == "read":
            z = y * 2.0
            return self.bn(z) + z.mean()
        if k == "layer_read":
            return self.bn(y * 2.0) + y.mean()
        if k == "rsub":
            return self.bn(1.5 - y)
        if k == "rsub_held":
            return self.bn(self.offset - y)
        if k == "rdiv":
            return self.bn(2.0 / y)
        if k == "mask":
            return self.bn(y * self.mask)
        return self.bn(y * 2.0 + 0.5)


class ChainLinear(nn.Module):
    """fc (on the last axis of an (N, C, L) input) -> * 2 -> BatchNorm1d on axis 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x) * 2.0)


def ChainRead() -> nn.Module:  # noqa: N802
    return Chain("read")


def ChainLayerRead() -> nn.Module:  # noqa: N802
    return Chain("layer_read")


def ChainRsub() -> nn.Module:  # noqa: N802
    return Chain("rsub")


def ChainRsubHeld() -> nn.Module:  # noqa: N802
    return Chain("rsub_held")


def ChainRdiv() -> nn.Module:  # noqa: N802
    return Chain("rdiv")


def ChainMask() -> nn.Module:  # noqa: N802
    return Chain("mask")


def ChainKept() -> nn.Module:  # noqa: N802
    return Chain("kept")


class ChainTwice(nn.Module):
    """The conv is called twice; its second output goes through * 2 into the BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.conv(x)) * 2.0)


# ----------------------------------------------------------------------------- layout (a BatchNorm into a Linear through layout ops)


class Tokens(nn.Module):
    """norm -> flatten(2).transpose(1, 2) -> qkv (FastViT's attention input), on a ReLU'd conv output;
    ``kind`` says what else happens."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.stem, self.norm = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.qkv, self.other = nn.Linear(4, 6), nn.Linear(4, 6)
        if kind == "norm_hook":
            self.norm.register_forward_hook(plus_one)
        if kind == "tied":
            self.other.weight = self.qkv.weight

    def forward(self, x: torch.Tensor) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
        k = self.kind
        y = torch.relu(self.stem(x))
        if k == "train":
            self.norm.train()
        z = self.norm(y)
        self.norm.eval()
        f = z.flatten(2)
        t = f.transpose(1, 2)
        out = self.qkv(t)
        if k == "read":
            return out + z.mean()
        if k == "read_flat":
            return out + f.mean()
        if k == "returned":
            return out, t
        if k == "twice":
            return out + self.qkv(y.flatten(2).transpose(1, 2))
        if k == "tied":
            return out + self.other(y.flatten(2).transpose(1, 2))
        return out


class TokensPositions(nn.Module):
    """norm -> flatten(2) -> a Linear over the positions (4 of them, as many as the channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.norm, self.mix = nn.Conv2d(3, 4, 3, stride=3), nn.BatchNorm2d(4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.norm(torch.relu(self.stem(x))).flatten(2))


def TokensNormHook() -> nn.Module:  # noqa: N802
    return Tokens("norm_hook")


def TokensTrain() -> nn.Module:  # noqa: N802
    return Tokens("train")


def TokensRead() -> nn.Module:  # noqa: N802
    return Tokens("read")


def TokensReadFlat() -> nn.Module:  # noqa: N802
    return Tokens("read_flat")


def TokensReturned() -> nn.Module:  # noqa: N802
    return Tokens("returned")


def TokensTwice() -> nn.Module:  # noqa: N802
    return Tokens("twice")


def TokensTied() -> nn.Module:  # noqa: N802
    return Tokens("tied")


# ----------------------------------------------------------------------------- functional (F.batch_norm in a forward)


class FBlock(nn.Module):
    """conv -> F.batch_norm with statistics and affine parameters the block holds; ``kind`` says what
    else happens."""

    def __init__(self, kind: str, c: int = 4) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(c if kind == "twice" else 3, c, 3, padding=1)
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        if kind == "layer_hook":
            self.conv.register_forward_pre_hook(double_input)
        if kind == "block_hook":
            self.register_forward_hook(count)

    def forward(self, x: torch.Tensor) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
        k = self.kind
        y = self.conv(self.conv(x)) if k == "twice" else self.conv(x)
        if k == "relu":
            y = torch.relu(y)
        mean = self.running_mean * 1.0 if k == "stats" else self.running_mean
        weight = self.weight * 1.0 if k == "affine" else self.weight
        z = F.batch_norm(y, mean, self.running_var, weight, self.bias, False, 0.0, 1e-3)
        return (z, y) if k == "returned" else z


class FNet(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.pre = nn.Conv2d(3, 4, 1) if kind == "twice" else nn.Identity()
        self.b = FBlock(kind)

    def forward(self, x: torch.Tensor) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
        return self.b(self.pre(x))


class FLinear3d(nn.Module):
    """A Linear on (N, C, L) and F.batch_norm over axis 1 of its output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.fc(x), self.running_mean, self.running_var, None, None, False, 0.0, 1e-5)


class FNetLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = FLinear3d()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x)


class FUntraceable(FBlock):
    """F.batch_norm in a forward with data-dependent control flow."""

    def __init__(self) -> None:
        super().__init__("plain")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if float(x.sum()) > 1e9:
            y = y * 0.5
        return F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-3)


def FStats() -> nn.Module:  # noqa: N802
    return FNet("stats")


def FAffine() -> nn.Module:  # noqa: N802
    return FNet("affine")


def FRelu() -> nn.Module:  # noqa: N802
    return FNet("relu")


def FReturned() -> nn.Module:  # noqa: N802
    return FNet("returned")


def FTwice() -> nn.Module:  # noqa: N802
    return FNet("twice")


def FLayerHook() -> nn.Module:  # noqa: N802
    return FNet("layer_hook")


def FBlockHook() -> nn.Module:  # noqa: N802
    return FNet("block_hook")


class FNetUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = FUntraceable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x)


# ----------------------------------------------------------------------------- merge (a sum of branches)


class ConvBN(nn.Module):
    def __init__(self, c: int = 4, k: int = 3) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Branches(nn.Module):
    """RepVGG's block: a 3x3 conv-BN, a 1x1 conv-BN and a BatchNorm on the input, summed; ``kind`` says
    what makes one branch different."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.id = ConvBN(4, 3), nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 1, bias=False) if kind == "tied" else ConvBN(4, 1)
        self.other = nn.Conv2d(4, 4, 1, bias=False)
        if kind == "tied":
            self.other.weight = self.b.weight
        if kind == "layer_hook":
            self.b.conv.register_forward_hook(plus_one)
        if kind == "wrapper_hook":
            self.b.register_forward_hook(count)
        if kind == "norm_hook":
            self.id.register_forward_pre_hook(double_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "norm_train":
            self.id.train()
        out = self.a(x) + self.b(x) + self.id(x)
        self.id.eval()
        return torch.relu(out) + self.other(x).mean() if self.kind == "tied" else out


def MergeTied() -> nn.Module:  # noqa: N802
    return Stem(Branches("tied"))


def MergeLayerHook() -> nn.Module:  # noqa: N802
    return Stem(Branches("layer_hook"))


def MergeWrapperHook() -> nn.Module:  # noqa: N802
    return Stem(Branches("wrapper_hook"))


def MergeNormHook() -> nn.Module:  # noqa: N802
    return Stem(Branches("norm_hook"))


def MergeNormTrain() -> nn.Module:  # noqa: N802
    return Stem(Branches("norm_train"))


class LinearAndNorm(nn.Module):
    """fc(x) + bn(x) on (N, C, L) with C == L: the BatchNorm normalises axis 1, the Linear maps the last."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.bn(x)


class MergeLinear3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = LinearAndNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(x))


# ----------------------------------------------------------------------------- scale (a per-channel scale)


class LayerScale(nn.Module):
    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ScaleAfter(nn.Module):
    """ls(proj(x)) (a scale after a Linear) on (N, 4) rows; ``kind`` says what else happens."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.proj, self.ls = nn.Linear(4, 4), LayerScale()
        if kind == "layer_hook":
            self.proj.register_forward_hook(plus_one)
        if kind == "scale_hook":
            self.ls.register_forward_hook(count)

    def forward(self, x: torch.Tensor) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
        if self.kind == "twice":
            return self.ls(self.proj(self.proj(x)))
        y = self.proj(x)
        return (self.ls(y), y) if self.kind == "returned" else self.ls(y)


class TokenScale(nn.Module):
    """One value per token (axis 1 of (N, L, C)), after a Linear over the channels."""

    def __init__(self, tokens: int = 3) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, tokens).view(1, tokens, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ScaleTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.ls = nn.Linear(5, 3), TokenScale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls(self.proj(x))


def ScaleLayerTwice() -> nn.Module:  # noqa: N802
    return ScaleAfter("twice")


def ScaleLayerHook() -> nn.Module:  # noqa: N802
    return ScaleAfter("layer_hook")


def ScaleLayerReturned() -> nn.Module:  # noqa: N802
    return ScaleAfter("returned")


def ScaleHooked() -> nn.Module:  # noqa: N802
    return ScaleAfter("scale_hook")


class ScaleBefore(nn.Module):
    """fc(ls(relu(x))) (a scale before a Linear, ResMLP's ``Affine``); ``kind`` says what else happens."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.ls, self.fc = LayerScale(), nn.Linear(4, 5)
        self.other = nn.Linear(4, 5)
        if kind == "tied":
            self.other.weight = self.fc.weight

    def forward(self, x: torch.Tensor) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
        v = self.ls(torch.relu(x))
        out = self.fc(v)
        if self.kind == "returned":
            return out, v
        if self.kind == "twice":
            return out + self.fc(x)
        return out + self.other(x)


def ScaleForwardReturned() -> nn.Module:  # noqa: N802
    return ScaleBefore("returned")


def ScaleForwardTwice() -> nn.Module:  # noqa: N802
    return ScaleBefore("twice")


def ScaleForwardTied() -> nn.Module:  # noqa: N802
    return ScaleBefore("tied")


class GammaBlock(nn.Module):
    """``gamma * fc(x)`` with gamma a parameter of the block (CaiT's ``gamma_1``); ``kind`` says what else."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 4)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.full = nn.Parameter(torch.linspace(0.5, 1.5, 12).view(3, 4))  # one value per token and channel
        if kind == "block_hook":
            self.register_forward_hook(count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "path_read":  # the permuted output is also read by a mean
            t = self.fc(x).permute(0, 2, 1)
            return (self.gamma.view(4, 1) * t).permute(0, 2, 1) + t.mean()
        if self.kind == "not_channel":
            return self.full * self.fc(x)
        return self.gamma * self.fc(x)


class Cached(nn.Module):
    """A Linear whose wrapper keeps a statistic of its output (read again by the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        self.stat = y.mean()
        return y


class GammaCached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Cached()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * self.inner(x)


class Gamma(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.embed, self.block = nn.Linear(5, 4), block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(torch.relu(self.embed(x)))
        stat = getattr(getattr(self.block, "inner", None), "stat", None)
        return out if stat is None else out + stat


def GammaBlockHook() -> nn.Module:  # noqa: N802
    return Gamma(GammaBlock("block_hook"))


def GammaPathRead() -> nn.Module:  # noqa: N802
    return Gamma(GammaBlock("path_read"))


def GammaNotChannel() -> nn.Module:  # noqa: N802
    return Gamma(GammaBlock("not_channel"))


def GammaLayerRead() -> nn.Module:  # noqa: N802
    return Gamma(GammaCached())


# ----------------------------------------------------------------------------- horizontal (siblings on one tensor)


class Siblings(nn.Module):
    """Two 1x1 convs on one tensor, each followed by its own activation ``acts``; ``kind`` says what else."""

    def __init__(self, acts: "tuple[nn.Module, nn.Module] | None" = None, kind: str = "") -> None:
        super().__init__()
        self.kind = kind
        self.stem = nn.Conv2d(3, 4, 1)
        self.a = nn.Conv2d(4, 3, 1)
        self.b = nn.Conv2d(4, 3, 1) if kind != "wrapped" else nn.Sequential(nn.Conv2d(4, 3, 1))
        self.act_a, self.act_b = acts or (nn.ReLU(), nn.ReLU())
        if kind == "layer_hook":
            self.b.register_forward_hook(plus_one)
        self.other = nn.Conv2d(4, 3, 1)
        if kind == "tied":
            self.other.weight = self.b.weight
        if kind in ("wrapped", "act_hook"):
            (self.b if kind == "wrapped" else self.act_b).register_forward_hook(count)
            (self.b if kind == "wrapped" else self.act_a).register_forward_hook(count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        ya = self.a(x)
        out = torch.cat([self.act_a(ya), self.act_b(self.b(x))], 1)
        if self.kind == "twice":
            return out + self.b(x).mean()
        if self.kind == "tied":
            return out + self.other(torch.relu(x)).mean()
        return out + ya.mean() if self.kind == "act_read" else out


class FunctionalSiblings(nn.Module):
    """Two 1x1 convs on one tensor, through F.leaky_relu with other slopes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return torch.cat([F.leaky_relu(self.a(x), 0.1), F.leaky_relu(self.b(x), negative_slope=0.5)], 1)


def SiblingsLeaky() -> nn.Module:  # noqa: N802
    return Siblings((nn.LeakyReLU(0.1), nn.LeakyReLU(0.5)))


def SiblingsElu() -> nn.Module:  # noqa: N802
    return Siblings((nn.ELU(1.0), nn.ELU(0.3)))


def SiblingsGelu() -> nn.Module:  # noqa: N802
    return Siblings((nn.GELU(), nn.GELU(approximate="tanh")))


def SiblingsHardtanh() -> nn.Module:  # noqa: N802
    return Siblings((nn.Hardtanh(-1.0, 1.0), nn.Hardtanh(-0.5, 0.5)))


def SiblingsLayerHook() -> nn.Module:  # noqa: N802
    return Siblings(kind="layer_hook")


def SiblingsWrapped() -> nn.Module:  # noqa: N802
    return Siblings(kind="wrapped")


def SiblingsActRead() -> nn.Module:  # noqa: N802
    return Siblings(kind="act_read")


def SiblingsActHook() -> nn.Module:  # noqa: N802
    return Siblings(kind="act_hook")


def SiblingsTwice() -> nn.Module:  # noqa: N802
    return Siblings(kind="twice")


def SiblingsTied() -> nn.Module:  # noqa: N802
    return Siblings(kind="tied")


# ----------------------------------------------------------------------------- clone (a copy of a layer read elsewhere)


class Shared(nn.Module):
    """bn(conv(x)) + conv(x).mean(): the conv's output is also read elsewhere; ``kind`` says what else."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        if kind == "norm_hook":
            self.bn.register_forward_hook(plus_one)
        if kind == "layer_hook":
            self.conv.register_forward_hook(plus_one)
        if kind == "block_hook":
            self.register_forward_hook(count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.kind == "in_place":
            y.relu_()
        if self.kind == "train":
            self.bn.train()
        out = self.bn(y) + y.mean()
        self.bn.eval()
        return out


class SharedLinear3d(nn.Module):
    """fc on (N, C, L) and BatchNorm1d(C) on its output, the output also read elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.bn(y) + y.mean()


class SharedOtherBlock(nn.Module):
    """The conv lives in another block than its BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.bn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.enc(x)
        return self.bn(y) + y.mean()


class Block(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.blk = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blk(x)


def SharedNormHook() -> nn.Module:  # noqa: N802
    return Block(Shared("norm_hook"))


def SharedTrain() -> nn.Module:  # noqa: N802
    return Block(Shared("train"))


def SharedLayerHook() -> nn.Module:  # noqa: N802
    return Block(Shared("layer_hook"))


def SharedBlockHook() -> nn.Module:  # noqa: N802
    return Block(Shared("block_hook"))


def SharedInPlace() -> nn.Module:  # noqa: N802
    return Block(Shared("in_place"))


# ----------------------------------------------------------------------------- unwrap (a wrapper of one call)


class Wrapper(nn.Module):
    """A Sequential of a conv and its BatchNorm (RepViT's ConvNorm) with an observing hook of ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.cn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        if kind == "forward":
            self.cn.register_forward_hook(count)
        elif kind == "pre":
            self.cn.register_forward_pre_hook(count)
        else:
            self.cn.register_full_backward_hook(count)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.cn(x)))


def WrapperHook() -> nn.Module:  # noqa: N802
    return Wrapper("forward")


def WrapperPreHook() -> nn.Module:  # noqa: N802
    return Wrapper("pre")


def WrapperBackwardHook() -> nn.Module:  # noqa: N802
    return Wrapper("backward")


# ----------------------------------------------------------------------------- the verdict (tests/test_judge.py)


class Judged(nn.Module):
    """conv -> bn -> relu -> head: a fold site (conv) and a layer no pass changes (head); ``kind``
    "saturated" clamps the output (a wrong fold does not move it), "ranked" returns the top-3
    positions of the head's scores (post-processing: a head scaled by 2 ranks them the same)."""

    def __init__(self, kind: str = "") -> None:
        super().__init__()
        self.kind = kind
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.kind == "saturated":
            return torch.clamp(y, min=100.0)
        scores = self.head(torch.relu(y)).flatten(1)
        if self.kind == "ranked":
            return scores.topk(3, dim=1).indices.to(x.dtype)
        return scores


def Saturated() -> nn.Module:  # noqa: N802
    return Judged("saturated")


def Ranked() -> nn.Module:  # noqa: N802
    return Judged("ranked")

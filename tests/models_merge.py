"""Tiny hand-made blocks with parallel branches, one per rule of merging, each inside a small model
(``models_merge:NAME`` builds one, so the CLI tests can use them too): bnfuse rewrites the module
that computes a sum, so a sum in a model's own forward is left alone."""

from __future__ import annotations

import torch
from torch import nn


def _cbn(cin: int, cout: int, k, stride: int = 1, padding=0, groups: int = 1, dilation: int = 1) -> nn.Sequential:  # noqa: ANN001
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN + BN on the input, summed (in place, as timm writes it), then ReLU."""

    def __init__(self, c: int = 8, groups: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.kxk = _cbn(c, c, 3, padding=1, groups=groups)
        self.k1 = _cbn(c, c, 1, groups=groups)
        self.identity = nn.BatchNorm2d(c)
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        ident = self.identity(x)
        y = self.k1(x) + self.kxk(x)
        y = self.drop_path(y)
        y += ident
        return torch.relu(y)


class ACNetBlock(nn.Module):
    """3x3 + 1x3 + 3x1 (asymmetric kernels, centred by their padding), each with its BN."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.square = _cbn(c, c, 3, padding=1)
        self.hor = _cbn(c, c, (1, 3), padding=(0, 1))
        self.ver = _cbn(c, c, (3, 1), padding=(1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(torch.add(self.square(x), self.hor(x)), self.ver(x))


class ResidualBlock(nn.Module):
    """A depthwise conv plus the input itself (RepCPE), written with ``sum``; and a plain conv
    without BN next to a conv+BN (RepViT's conv1), with dilation 2."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.pe = nn.Conv2d(c, c, 5, padding=2, groups=c)
        self.a = _cbn(c, c, 3, padding=2, dilation=2)
        self.b = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = sum([self.pe(x), x])
        return self.a(x) + self.b(x)


class StridedBlock(nn.Module):
    """A 3x3 stride-2 branch and a 5x5 stride-1 branch whose outputs happen to match in size
    (8x8 in, 4x4 out): different strides, so they must not merge."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.a = _cbn(c, c, 3, stride=2, padding=1)
        self.b = _cbn(c, c, 5, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class ReadTwiceBlock(nn.Module):
    """A branch output also returned: must not merge."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.a = _cbn(c, c, 3, padding=1)
        self.b = _cbn(c, c, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.b(x)
        return self.a(x) + b, b


class ReluInBranchBlock(nn.Module):
    """A ReLU inside a branch: must not merge."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.a = _cbn(c, c, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class MisalignedBlock(nn.Module):
    """A 1x1 branch with padding 1 next to a 3x3 with padding 1, both stride 3: on a 10x10 input
    both give 4x4, but the 1x1 does not read the 3x3's centre tap, so they must not merge."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.a = _cbn(c, c, 3, stride=3, padding=1)
        self.b = _cbn(c, c, 1, stride=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class SharedConvBlock(nn.Module):
    """A branch conv that is also called elsewhere: must not merge."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.a = _cbn(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) + self.b(x))


class ReflectPadBlock(nn.Module):
    """Branches that pad by reflection: left as they are (only zero padding merges)."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(c))
        self.b = _cbn(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class AvgPoolBranchBlock(nn.Module):
    """An average-pool branch (DiverseBranchBlock): left as it is, with its reason."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.a = _cbn(c, c, 3, padding=1)
        self.pool = nn.AvgPool2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.pool(x)


class PostSumBNBlock(nn.Module):
    """``bn(conv(x) + conv1(x) + x)`` (RepViT): merged, then the BN after the sum folds next round."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = _cbn(c, c, 3, padding=1, groups=c)
        self.conv1 = nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


class Wrapped(nn.Module):
    """A model holding one block (as real models hold their blocks)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        return self.block(x)


class PrefixNamedBlock(nn.Module):
    """A RepVGG sum whose 3x3 branch is ``kxk``, then a conv+BN named ``kxk2``: its name starts with the
    branch's name, but it is a layer of its own (folded, not merged)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.kxk = _cbn(c, c, 3, padding=1)
        self.k1 = _cbn(c, c, 1)
        self.kxk2 = _cbn(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.kxk2(torch.relu(self.kxk(x) + self.k1(x)))


def PrefixNamed(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(PrefixNamedBlock(**kwargs))


def RepVGG(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(RepVGGBlock(**kwargs))


def ACNet(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(ACNetBlock(**kwargs))


def Residual(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(ResidualBlock(**kwargs))


def Strided(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(StridedBlock(**kwargs))


def ReadTwice(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(ReadTwiceBlock(**kwargs))


def ReluInBranch(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(ReluInBranchBlock(**kwargs))


def Misaligned(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(MisalignedBlock(**kwargs))


def SharedConv(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(SharedConvBlock(**kwargs))


def ReflectPad(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(ReflectPadBlock(**kwargs))


def AvgPoolBranch(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(AvgPoolBranchBlock(**kwargs))


def PostSumBN(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(PostSumBNBlock(**kwargs))


class InPlaceActBlock(nn.Module):
    """torchvision's FusedMBConv: conv+BN+SiLU(inplace=True) plus the input; the in-place activation
    returns the BN's output tensor itself, changed, so the branch is not linear."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.SiLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        out += x
        return out


class InputChangedBlock(nn.Module):
    """The branches' input is changed in place before the sum reads it: must not merge."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.a = _cbn(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)  # a tensor of the block's own, so the caller's input is not changed
        y = self.a(x)
        x.mul_(2)
        return y + x


def InPlaceAct(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(InPlaceActBlock(**kwargs))


def InputChanged(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(InputChangedBlock(**kwargs))


class InPlaceBetweenBlock(nn.Module):
    """``y = a(x) + b(x); relu_(y); y + c(x)``: the in-place ReLU between the sums returns its input,
    changed, so it is not an identity to flatten through: only a + b merges."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.a = _cbn(c, c, 3, padding=1)
        self.b = _cbn(c, c, 1)
        self.act = nn.ReLU(inplace=True)
        self.c = _cbn(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) + self.b(x)
        y = self.act(y)
        return y + self.c(x)


def InPlaceBetween(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(InPlaceBetweenBlock(**kwargs))


class FlatRepBlock(nn.Module):
    """RepVGG written with every conv and BN a direct child (as many re-implementations do), the
    sum in any order: ``relu(bn3(conv3(x)) + bn1(conv1(x)) + bn_id(x))``; ``relu_in`` puts a ReLU
    inside the 3x3 branch (must not merge)."""

    def __init__(self, c: int = 8, relu_in: bool = False) -> None:
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.bn_id = nn.BatchNorm2d(c)
        self.relu_in = relu_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv3(x)
        a = self.bn3(torch.relu(a) if self.relu_in else a)
        return torch.relu(self.bn_id(x) + (self.bn1(self.conv1(x)) + a))


class FlatStack(nn.Module):
    """Three flat blocks in a row after a stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(FlatRepBlock(), FlatRepBlock(), FlatRepBlock())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def FlatRelu(**kwargs) -> nn.Module:  # noqa: N802
    return Wrapped(FlatRepBlock(relu_in=True))


class TopLevelSum(nn.Module):
    """The sum in the model's own forward: ``a(y) + b(y) + y`` after a stem."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a, self.b = _cbn(c, c, 3, padding=1), _cbn(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return torch.relu(self.a(y) + self.b(y) + y)


class InputBranches(nn.Module):
    """Branches on the model's input itself, in its own forward: a conv+BN, a BatchNorm, the input."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a, self.bn = _cbn(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.bn(x) + x

"""The arithmetic of merging parallel branches into one convolution: tensors in, one kernel out.

A sum of branches that all read the same tensor ``x`` with the same stride, dilation, groups and
output channels is one convolution when their kernel centres align: each branch kernel is
zero-padded to the largest kernel, centred (exact when ``padding_b = padding - dilation *
(k - k_b) / 2`` per axis), an identity branch (``x`` itself, or a BatchNorm on ``x``) becomes a
kernel with a one at its centre, and the kernels and biases add up.  Everything in float64; the
caller casts once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ....errors import FoldError

if TYPE_CHECKING:
    import torch

__all__ = ["pad_kernel", "identity_kernel", "merge_kernels", "centre_padding"]


def centre_padding(padding: Sequence[int], dilation: Sequence[int], kernel: Sequence[int],
                   branch_kernel: Sequence[int]) -> "tuple[int, ...] | None":
    """The padding a branch with ``branch_kernel`` needs to stay centred in ``kernel`` (per axis
    ``padding - dilation * (k - k_b) / 2``); None when that is not a whole number >= 0."""
    out = []
    for p, d, k, kb in zip(padding, dilation, kernel, branch_kernel):
        twice = 2 * p - d * (k - kb)
        if kb > k or (k - kb) % 2 or twice < 0 or twice % 2:  # an odd difference has no centred place
            return None
        out.append(twice // 2)
    return tuple(out)


def pad_kernel(weight: "torch.Tensor", kernel: Sequence[int]) -> "torch.Tensor":
    """``weight`` (out, in/groups, *k_b) zero-padded to ``kernel``, centred, in float64."""
    import torch.nn.functional as F

    import torch

    w = weight.detach().to(torch.float64)
    pads: list[int] = []
    for k, kb in zip(reversed(tuple(kernel)), reversed(tuple(w.shape[2:]))):
        if kb > k or (k - kb) % 2:
            raise FoldError(f"a {tuple(w.shape[2:])} kernel cannot be centred in a {tuple(kernel)} kernel")
        pads += [(k - kb) // 2, (k - kb) // 2]
    return F.pad(w, pads) if any(pads) else w.clone()


def identity_kernel(channels: int, groups: int, kernel: Sequence[int]) -> "torch.Tensor":
    """The convolution that returns its input: (channels, channels/groups, *kernel), float64,
    a one at the centre for each output channel's own input channel within its group."""
    import torch

    if groups < 1 or channels % groups:
        raise FoldError(f"{channels} channels cannot be split into {groups} groups")
    if any(k % 2 == 0 for k in kernel):
        raise FoldError(f"an even kernel {tuple(kernel)} has no centre for an identity branch")
    if not kernel:  # a Linear: the identity matrix
        return torch.eye(channels, dtype=torch.float64)
    per_group = channels // groups
    w = torch.zeros((channels, per_group, *kernel), dtype=torch.float64)
    centre = tuple(k // 2 for k in kernel)
    idx = torch.arange(channels)
    w[(idx, idx % per_group, *centre)] = 1.0
    return w


def merge_kernels(branches: "Sequence[tuple[torch.Tensor, torch.Tensor | None]]",
                  kernel: Sequence[int]) -> "tuple[torch.Tensor, torch.Tensor]":
    """Sum ``(weight, bias)`` branches (already folded, any kernel no larger than ``kernel``)
    into one float64 ``(weight, bias)``; a missing bias is zero."""
    import torch

    if not branches:
        raise FoldError("no branches to merge")
    out_ch = branches[0][0].shape[0]
    weight = torch.zeros((out_ch, *branches[0][0].shape[1:2], *kernel), dtype=torch.float64)
    bias = torch.zeros(out_ch, dtype=torch.float64)
    for w, b in branches:
        if w.shape[:2] != weight.shape[:2] or w.dim() != weight.dim():
            raise FoldError(f"a branch kernel {tuple(w.shape)} does not match {tuple(weight.shape)}")
        if b is not None and tuple(b.shape) != (out_ch,):
            raise FoldError(f"a branch bias of shape {tuple(b.shape)} does not match {out_ch} output channels")
        weight += pad_kernel(w, kernel)
        if b is not None:
            bias += b.detach().to(torch.float64)
    if not bool(torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise FoldError("merging the branches gives a non-finite kernel")
    return weight, bias

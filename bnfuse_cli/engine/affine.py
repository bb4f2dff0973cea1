"""The arithmetic of folding, and nothing else: tensors in, folded weight and bias out.

In eval mode a BatchNorm computes ``z = (y - mean) / sqrt(var + eps) * gamma + beta`` per channel,
an affine map ``z = scale * y + shift``.  Folding it into the layer before (``y = W x + b``) scales
each output channel of ``W``; folding it into the layer after scales each input channel and moves
the shift into the bias.  Everything is computed in float64 and cast back once, so a half-precision
model is folded from exact statistics rather than rounded ones.

A layer's fold happens in two steps so that a model is never left half-folded and never needs a
second copy of its weights: :func:`prepare_fold` checks everything that can go wrong (corrupt
statistics, a result that overflows the layer's dtype) and computes the new bias, writing
nothing; :func:`apply_fold_` then rescales the weight in place, a few rows at a time (each block
goes to float64, is scaled and is written back), so the extra memory is a fixed small block and
the work stays in the CPU cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import FoldError

if TYPE_CHECKING:
    import torch

__all__ = [
    "affine_from_stats",
    "LayerFold",
    "prepare_fold",
    "apply_fold_",
]

#: float64 elements per block when scaling a weight on the CPU (2 MiB: stays in cache)
_BLOCK = 1 << 18


def affine_from_stats(
    mean: "torch.Tensor",
    var: "torch.Tensor",
    gamma: "torch.Tensor | None",
    beta: "torch.Tensor | None",
    eps: float,
    *,
    name: str = "BatchNorm",
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Return ``(scale, shift)`` in float64 with ``bn(y) == scale * y + shift`` per channel.

    ``gamma``/``beta`` of None (``affine=False``) mean 1 and 0.  Raises :class:`FoldError`
    naming ``name`` for NaN or negative running variance, or a non-finite result.
    """
    import torch

    var64 = var.detach().to(torch.float64)
    # one reduction each, NaN propagating: NaN fails every comparison below
    lo, hi = (float(v) for v in torch.aminmax(var64)) if var64.numel() else (0.0, 0.0)
    if hi == float("inf") and var.dtype in (torch.float16, torch.bfloat16):
        raise FoldError(
            f"{name} has an infinite running_var in {var.dtype}: a variance above the type's "
            "range (65504 for float16) overflowed when the model was cast; fold the float32 "
            "model and cast the fused model afterwards"
        )
    if not (lo >= 0.0 and hi < float("inf")):
        raise FoldError(
            f"{name} has NaN, infinite or negative running_var: its statistics are corrupt "
            "and folding them would give a broken model; re-export or recalibrate the checkpoint"
        )
    scale = torch.rsqrt(var64 + float(eps))
    if gamma is not None:
        scale.mul_(gamma.detach().to(torch.float64))
    shift = mean.detach().to(torch.float64) * scale
    shift.neg_()
    if beta is not None:
        shift.add_(beta.detach().to(torch.float64))
    if scale.numel() and not all(math.isfinite(float(t.abs().max())) for t in (scale, shift)):
        raise FoldError(
            f"{name}: folding gives non-finite values (running_var + eps is zero, or the "
            "statistics are NaN/inf); check the checkpoint's BN statistics"
        )
    return scale, shift


@dataclass
class LayerFold:
    """What folding does to one layer ``y = W x + b``, checked and ready to apply.

    ``W'[o, i, k...] = backward_scale[o] * W[o, i, k...] * forward_scale[i]`` (for a ConvTranspose,
    whose weight is laid out ``(in, out/groups, k...)``, the same per output and input channel),
    and the bias becomes ``bias``, already computed and cast to the layer's dtype.
    """

    name: str
    #: float64, one per output channel (a BatchNorm after the layer), or None
    backward_scale: "torch.Tensor | None"
    #: float64, one per input channel (a BatchNorm before the layer), or None
    forward_scale: "torch.Tensor | None"
    bias: "torch.Tensor"
    transposed: bool = False
    groups: int = 1


class _Layout:
    """Channel bookkeeping of a weight, by rows (dim 0) and columns (dim 1) of the weight.

    Conv/Linear ``(out, in/groups, k...)``: row ``r`` is output channel ``r`` and column ``c``
    input channel ``(r // (out/groups)) * (in/groups) + c``.  ConvTranspose
    ``(in, out/groups, k...)``: row ``r`` is input channel ``r`` and column ``c`` output
    channel ``(r // (in/groups)) * (out/groups) + c``.
    """

    def __init__(self, weight: "torch.Tensor", transposed: bool, groups: int, name: str) -> None:
        if weight.dim() < 2:
            raise FoldError(f"{name}: weight of shape {tuple(weight.shape)} is not a Conv/Linear weight")
        rows, cols = int(weight.shape[0]), int(weight.shape[1])
        if groups < 1 or rows % groups:
            raise FoldError(f"{name}: weight shape {tuple(weight.shape)} does not split into groups={groups}")
        self.rows, self.cols, self.groups, self.transposed = rows, cols, groups, transposed
        self.rows_per_group = rows // groups
        # (channels along rows, channels along columns) for out and in
        self.out_channels = cols * groups if transposed else rows
        self.in_channels = rows if transposed else cols * groups
        self.kernel_dims = tuple(range(2, weight.dim()))

    def by_axis(self, backward_scale: "torch.Tensor | None", forward_scale: "torch.Tensor | None"
                ) -> "tuple[torch.Tensor | None, torch.Tensor | None]":
        """The (row, column) scales: (out, in) for Conv/Linear, (in, out) for ConvTranspose."""
        return (forward_scale, backward_scale) if self.transposed else (backward_scale, forward_scale)

    def factors(self, backward_scale: "torch.Tensor | None", forward_scale: "torch.Tensor | None", r0: int, r1: int
                ) -> "tuple[torch.Tensor | None, torch.Tensor | None]":
        """(per-row factor of shape (n, 1), per-element factor of shape (n, cols)) for rows r0:r1."""
        row_scale, col_scale = self.by_axis(backward_scale, forward_scale)
        row = None if row_scale is None else row_scale[r0:r1].reshape(-1, 1)
        col = None
        if col_scale is not None:
            g0, g1 = r0 // self.rows_per_group, (r1 - 1) // self.rows_per_group
            per_group = col_scale.reshape(self.groups, self.cols)
            if g0 == g1:
                col = per_group[g0].reshape(1, -1)
            else:
                import torch

                col = per_group[torch.arange(r0, r1, device=col_scale.device) // self.rows_per_group]
        return row, col

    def blocks(self, weight: "torch.Tensor") -> "list[tuple[int, int]]":
        per_row = max(1, weight[0].numel())
        step = self.rows if weight.device.type != "cpu" else max(1, _BLOCK // per_row)
        return [(r, min(r + step, self.rows)) for r in range(0, self.rows, step)]


def _factor(row: "torch.Tensor | None", col: "torch.Tensor | None") -> "torch.Tensor | None":
    if row is None:
        return col
    if col is None:
        return row
    return row * col


def _expand(f: "torch.Tensor", kernel_dims: int) -> "torch.Tensor":
    return f.reshape(*f.shape, *([1] * kernel_dims))


def _abs_max(block: "torch.Tensor", kernel_dims: tuple[int, ...]) -> "torch.Tensor":
    """|block| maximised over the kernel dimensions: shape (rows, cols), NaN if any value is NaN."""
    import torch

    if not kernel_dims:
        return block.abs()
    hi = torch.amax(block, dim=kernel_dims)
    lo = torch.amin(block, dim=kernel_dims)
    return torch.maximum(hi, -lo)  # propagates NaN


def _check_scale(scale: "torch.Tensor | None", channels: int, name: str, where: str) -> None:
    if scale is not None and scale.numel() != channels:
        raise FoldError(f"{name}: {channels} {where} channels but the BatchNorm has {scale.numel()}")


def _check_weight(w: "torch.Tensor", lay: _Layout, backward_scale: "torch.Tensor | None",
                  forward_scale: "torch.Tensor | None", name: str) -> None:
    """Refuse a weight that already holds NaN/inf, or whose folded values would overflow its dtype.

    One ``aminmax`` over the weight bounds every folded value by ``max|W| * max|factor|``; only
    when that bound does not fit the dtype (rare: float16 with a tiny variance) are the exact
    per-(row, column) maxima computed, block by block.  Rounding is monotonic, so the largest
    folded magnitude overflows exactly when the folded weight would.
    """
    import torch

    if w.numel() == 0 or not w.is_floating_point():
        return
    lo, hi = (float(v) for v in torch.aminmax(w))
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN or inf (aminmax propagates NaN)
        raise FoldError(
            f"{name}: its weight already holds NaN or infinite values; the checkpoint is corrupt "
            "(nothing was folded)"
        )
    finfo_max = torch.finfo(w.dtype).max
    bound = max(-lo, hi)
    for s in (backward_scale, forward_scale):
        if s is not None and s.numel():
            bound *= float(s.abs().max())
    if bound <= finfo_max:
        return
    worst = 0.0
    for r0, r1 in lay.blocks(w):
        row, col = lay.factors(backward_scale, forward_scale, r0, r1)
        mag = _abs_max(w[r0:r1], lay.kernel_dims).to(torch.float64) * _factor(row, col).abs()
        worst = max(worst, float(mag.max()))
    if not bool(torch.isfinite(torch.tensor(worst, dtype=torch.float64).to(w.dtype))):
        raise FoldError(
            f"{name}: the folded weight overflows {w.dtype} (a value reaches {worst:.3g}, above the "
            f"type's largest {finfo_max:g}); convert the model to float32 before folding, or leave "
            "this layer unfolded"
        )


def prepare_fold(
    weight: "torch.Tensor",
    bias: "torch.Tensor | None",
    *,
    backward: "tuple[torch.Tensor, torch.Tensor] | None" = None,
    forward: "tuple[torch.Tensor, torch.Tensor] | None" = None,
    transposed: bool = False,
    groups: int = 1,
    name: str = "layer",
) -> LayerFold:
    """Check a fold of one layer and compute its new bias, without changing anything.

    ``backward`` is the ``(scale, shift)`` of a BatchNorm that reads this layer's output
    (``z = scale * (W x + b) + shift``); ``forward`` that of a BatchNorm whose output this
    layer reads (``W (scale * x + shift) + b``), exact only when the layer does not zero-pad
    (the caller checks).  Both may be given.  Raises :class:`FoldError` naming ``name`` when the
    shapes disagree, the weight holds NaN/inf, or the folded weight or bias would overflow the
    layer's dtype (float16 above 65504).  Apply the result with :func:`apply_fold_`.
    """
    import torch

    lay = _Layout(weight, transposed, groups, name)
    backward_scale = forward_scale = backward_shift = forward_shift = None
    if backward is not None:
        backward_scale, backward_shift = backward
        _check_scale(backward_scale, lay.out_channels, name, "output")
    if forward is not None:
        if transposed:
            raise FoldError(
                f"{name}: a BatchNorm before a ConvTranspose cannot be folded into it exactly "
                "(border outputs receive fewer kernel taps)"
            )
        forward_scale, forward_shift = forward
        _check_scale(forward_scale, lay.in_channels, name, "input")
    device = weight.device
    backward_scale = None if backward_scale is None else backward_scale.to(device=device, dtype=torch.float64)
    forward_scale = None if forward_scale is None else forward_scale.to(device=device, dtype=torch.float64)

    b64 = (torch.zeros(lay.out_channels, dtype=torch.float64, device=device) if bias is None
           else bias.detach().to(torch.float64))
    w = weight.detach()
    _check_weight(w, lay, backward_scale, forward_scale, name)
    extra = None
    if forward_shift is not None:  # a forward BN's shift reaches the bias through the weight: W . shift
        forward_shift = forward_shift.to(device=device, dtype=torch.float64)
        extra = torch.zeros(lay.out_channels, dtype=torch.float64, device=device)
        for r0, r1 in lay.blocks(w):
            block = w[r0:r1].to(torch.float64)
            summed = block.sum(dim=lay.kernel_dims) if lay.kernel_dims else block
            extra[r0:r1] = (summed * lay.factors(None, forward_shift, r0, r1)[1]).sum(dim=1)
    if extra is not None:
        b64 = b64 + extra
    if backward_scale is not None:
        b64 = b64 * backward_scale + backward_shift.to(device=device, dtype=torch.float64)
    like = weight if bias is None else bias
    new_bias = b64.to(dtype=like.dtype, device=like.device)
    if new_bias.is_floating_point() and not bool(torch.isfinite(new_bias).all()):
        raise FoldError(
            f"{name}: the folded bias overflows {like.dtype} (a value exceeds its range); convert the "
            "model to float32 before folding, or leave this layer unfolded"
        )
    return LayerFold(name, backward_scale, forward_scale, new_bias, transposed, groups)


def apply_fold_(weight: "torch.Tensor", fold: LayerFold, *, workspace: "torch.Tensor | None" = None
                ) -> "torch.Tensor | None":
    """Rescale ``weight`` in place as checked by :func:`prepare_fold` (float64, cast once).

    Works a block of rows at a time through one float64 buffer, so it needs no copy of the
    weight and allocates (and page-faults) nothing per block; any memory layout (channels_last
    included) is kept.  Pass the returned buffer as ``workspace`` to the next call to reuse it.
    The bias is the caller's to set (``fold.bias``).
    """
    import torch

    if fold.backward_scale is None and fold.forward_scale is None:
        return workspace
    lay = _Layout(weight, fold.transposed, fold.groups, fold.name)
    kdims = len(lay.kernel_dims)
    # a factor per row only (the common case: a BN after a Conv): expand it once for all blocks
    row_scale, col_scale = lay.by_axis(fold.backward_scale, fold.forward_scale)
    whole = _expand(row_scale.reshape(-1, 1), kdims) if col_scale is None else None
    with torch.no_grad():
        w = weight.detach()
        for r0, r1 in lay.blocks(w):
            block = w[r0:r1]
            n = block.numel()
            if workspace is None or workspace.numel() < n or workspace.device != w.device:
                workspace = torch.empty(max(n, _BLOCK if w.device.type == "cpu" else n), dtype=torch.float64,
                                        device=w.device)
            if whole is not None:
                factor = whole[r0:r1]
            else:
                factor = _expand(_factor(*lay.factors(fold.backward_scale, fold.forward_scale, r0, r1)), kdims)
            out = workspace[:n].view(block.shape)
            torch.mul(block, factor, out=out)  # float64 (the factor's type), then cast once below
            block.copy_(out)
    return workspace


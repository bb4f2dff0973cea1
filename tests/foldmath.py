"""Folding on a copy, for the arithmetic tests: new ``(weight, bias)`` from the package's real
two-step fold (:func:`~bnfuse_cli.engine.affine.prepare_fold` checks and computes the bias,
:func:`~bnfuse_cli.engine.affine.apply_fold_` rescales the weight in place), applied to a clone so
the layer's own tensors stay unchanged."""

from __future__ import annotations

import torch

from bnfuse_cli.engine.affine import apply_fold_, prepare_fold


def _on_copy(weight: torch.Tensor, fold) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    new = weight.detach().clone()
    apply_fold_(new, fold)
    return new, fold.bias


def fold_into_previous(weight: torch.Tensor, bias: "torch.Tensor | None", scale: torch.Tensor,
                       shift: torch.Tensor, *, transposed: bool = False, groups: int = 1,
                       name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``z = scale * y + shift`` into the layer ``y = W x + b`` that produced ``y``
    (``transposed``: a ConvTranspose weight, laid out ``(in, out/groups, k...)``)."""
    fold = prepare_fold(weight, bias, backward=(scale, shift), transposed=transposed, groups=groups, name=name)
    return _on_copy(weight, fold)


def fold_into_next(weight: torch.Tensor, bias: "torch.Tensor | None", scale: torch.Tensor,
                   shift: torch.Tensor, *, groups: int = 1, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``x' = scale * x + shift`` into the Conv or Linear ``y = W x' + b`` that reads it
    (exact only when the layer does not zero-pad its input)."""
    fold = prepare_fold(weight, bias, forward=(scale, shift), groups=groups, name=name)
    return _on_copy(weight, fold)

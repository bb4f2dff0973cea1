"""``--data`` files: real inputs, and labels when there are any, in the forms people save them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .table import read_object

if TYPE_CHECKING:
    import torch

__all__ = ["read_data", "INPUT_KEYS", "LABEL_KEYS"]

#: keys under which a data file keeps its inputs and its labels
INPUT_KEYS = ("inputs", "input", "x", "images", "data", "features")
LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def read_data(path: "str | os.PathLike[str]", *, allow_pickle: bool = False) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """``(inputs, labels or None)`` from a tensor file.

    Accepted: a tensor of inputs; a dict with inputs under ``inputs``/``x``/``images``/... and
    labels under ``labels``/``targets``/``y``/...; a tuple or list ``(inputs[, labels])``.
    Labels are class indices (N,) or one-hot/probabilities (N, classes).
    """
    import torch


    path = Path(path)
    obj = read_object(path, allow_pickle=allow_pickle, what="data")
    labels = None
    if isinstance(obj, torch.Tensor):
        inputs = obj
    elif isinstance(obj, dict):
        ikey = next((k for k in INPUT_KEYS if isinstance(obj.get(k), torch.Tensor)), None)
        if ikey is None:
            keys = ", ".join(map(repr, list(obj)[:8])) or "none"
            raise CheckpointError(
                f"--data {path}: found keys {keys} but no inputs: store the input tensor under one of "
                f"{', '.join(INPUT_KEYS)} (and labels under {', '.join(LABEL_KEYS)})"
            )
        inputs = obj[ikey]
        lkey = next((k for k in LABEL_KEYS if k in obj), None)
        labels = obj[lkey] if lkey is not None else None
    elif isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 2 and isinstance(obj[0], torch.Tensor):
        inputs = obj[0]
        labels = obj[1] if len(obj) == 2 else None
    else:
        raise CheckpointError(
            f"--data {path} holds a {type(obj).__name__}: give a tensor of inputs, a dict "
            "{'inputs': Tensor, 'labels': Tensor}, or a tuple (inputs, labels)"
        )
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise CheckpointError(f"--data {path}: the inputs tensor is empty (shape {tuple(inputs.shape)})")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise CheckpointError(f"--data {path}: the labels are a {type(labels).__name__}, not a tensor")
        if labels.dim() == 2 and labels.is_floating_point():
            labels = labels.argmax(1)
        if labels.dim() != 1 or labels.shape[0] != inputs.shape[0] or labels.is_floating_point():
            raise CheckpointError(
                f"--data {path}: labels of shape {tuple(labels.shape)} ({labels.dtype}) do not fit "
                f"{inputs.shape[0]} inputs: give one integer class index per input"
            )
    return inputs, labels

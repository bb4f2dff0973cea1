"""``verify``: prove that a fused model computes what the original computes.

Both models are loaded in any form bnfuse reads (a model name, a state_dict with ``arch``, a
nested training checkpoint, a pickled module with ``allow_pickle``, TorchScript, .safetensors,
bnfuse's own outputs rebuilt from their metadata), run on the same seeded random inputs and,
optionally, on a file of real inputs with labels.  The report gives the max absolute error, the
relative error ``||a - b|| / ||a||``, the cosine similarity, top-1 agreement for classifier
logits, accuracy on labelled data, and the structure: which BatchNorm layers are gone and the
parameter counts of both.

The verdict is per output tensor: ``max |orig - fused| <= atol + rtol * max |orig|``.  Scaling by
the output's own magnitude keeps the test meaningful for logits of any size; elements near zero
are not judged on their own, because a correct float32 fold moves every output by rounding noise
of the output's scale, not of the element's.  Nothing here prints or exits.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .conversion import count_tensors, input_spec
from .errors import UsageError
from .inputs import Comparison, InputSpec, as_args, make_input, model_dtype
from .loading import Source, load_source

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["VerifyReport", "DataResult", "Structure", "verify", "default_tolerances", "read_data"]

#: keys under which a data file keeps its inputs and its labels
INPUT_KEYS = ("inputs", "input", "x", "images", "data", "features")
LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def default_tolerances(dtype: Any) -> tuple[float, float]:
    """``(rtol, atol)`` that a correct fold passes with a wide margin, by the models' dtype.

    A float32 fold of a resnet50 moves the logits by about 1e-6 of their largest magnitude,
    so ``rtol=1e-4`` leaves two orders of magnitude; a wrong fold moves them by 1e-1 or more.
    """
    import torch

    return {
        torch.float64: (1e-9, 1e-12),
        torch.float16: (2e-2, 1e-3),
        torch.bfloat16: (5e-2, 1e-2),
    }.get(dtype, (1e-4, 1e-6))


@dataclass
class DataResult:
    """How both models did on the inputs (and labels) of ``--data``."""

    path: str
    count: int
    error: Comparison
    #: largest ``max_abs / (atol + rtol * scale)`` over output tensors; at most 1 within tolerance
    worst: float
    #: fraction of inputs on which both models predict the same class (classifier outputs only)
    agreement: "float | None" = None
    accuracy_orig: "float | None" = None
    accuracy_fused: "float | None" = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "count": self.count,
            "max_abs_error": _num(self.error.max_abs),
            "rel_error": _num(self.error.rel),
            "cosine": _num(self.error.cosine),
            "mismatch": self.error.mismatch,
            "worst_ratio": _num(self.worst),
            "top1_agreement": self.agreement,
            "accuracy_orig": self.accuracy_orig,
            "accuracy_fused": self.accuracy_fused,
        }


@dataclass
class Structure:
    """BatchNorm layers and tensor counts of both models."""

    bn_orig: list[str]
    bn_fused: list[str]
    params_orig: int
    params_fused: int
    buffers_orig: int
    buffers_fused: int

    @property
    def removed(self) -> list[str]:
        """BatchNorm layers of the original that the fused model no longer has."""
        left = set(self.bn_fused)
        return [n for n in self.bn_orig if n not in left]

    def to_dict(self) -> dict[str, Any]:
        return {
            "bn_orig": len(self.bn_orig),
            "bn_fused": len(self.bn_fused),
            "bn_removed": self.removed,
            "bn_remaining": list(self.bn_fused),
            "params_orig": self.params_orig,
            "params_fused": self.params_fused,
            "buffers_orig": self.buffers_orig,
            "buffers_fused": self.buffers_fused,
        }


@dataclass
class VerifyReport:
    """Everything ``bnfuse verify`` prints, as data (``to_dict`` for --json); ``ok`` is the verdict."""

    orig: str
    fused: str
    orig_kind: str
    fused_kind: str
    arch: "str | None"
    fused_arch: "str | None"
    input: InputSpec
    dtype: str
    samples: int
    seed: int
    rtol: float
    atol: float
    #: over all random samples
    error: Comparison
    worst: float
    structure: Structure
    top1_agreement: "float | None" = None
    top1_rows: int = 0
    data: "DataResult | None" = None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Both models' outputs agree within ``atol + rtol * scale`` on every input checked."""
        checks = [(self.error, self.worst)] if self.samples else []
        if self.data is not None:
            checks.append((self.data.error, self.data.worst))
        return bool(checks) and all(c.mismatch is None and w <= 1.0 for c, w in checks)

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return {
            "ok": self.ok,
            "orig": self.orig,
            "fused": self.fused,
            "orig_kind": self.orig_kind,
            "fused_kind": self.fused_kind,
            "arch": self.arch,
            "fused_arch": self.fused_arch,
            "input": self.input.to_dict(),
            "dtype": self.dtype,
            "samples": self.samples,
            "seed": self.seed,
            "rtol": self.rtol,
            "atol": self.atol,
            "max_abs_error": _num(self.error.max_abs),
            "rel_error": _num(self.error.rel),
            "cosine": _num(self.error.cosine),
            "mismatch": self.error.mismatch,
            "worst_ratio": _num(self.worst),
            "top1_agreement": self.top1_agreement,
            "top1_rows": self.top1_rows,
            "data": None if self.data is None else self.data.to_dict(),
            "structure": self.structure.to_dict(),
            "notes": self.notes,
            "seconds": self.seconds,
            "bnfuse_version": __version__,
        }


def _num(x: float) -> "float | None":
    """JSON has no inf/NaN: those become null (the ``mismatch``/``ok`` fields say why)."""
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------- comparing outputs


def _float_leaves(out: Any) -> list["torch.Tensor"]:
    import torch
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


class _Tally:
    """Accumulates the error between two models' outputs over several batches, in float64."""

    def __init__(self, rtol: float, atol: float) -> None:
        self.rtol, self.atol = rtol, atol
        self.max_abs = 0.0
        self.diff_sq = self.ref_sq = self.out_sq = self.dot = 0.0
        self.leaf_err: list[float] = []
        self.leaf_scale: list[float] = []
        self.mismatch: "str | None" = None
        self.nonfinite_both = 0
        self.rows = self.agree = 0
        self.labelled = self.correct_ref = self.correct_out = 0

    def add(self, ref: Any, out: Any, labels: "torch.Tensor | None" = None) -> None:
        import torch

        a, b = _float_leaves(ref), _float_leaves(out)
        if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
            self.mismatch = self.mismatch or (
                f"the outputs differ in structure: {[tuple(x.shape) for x in a]} (original) vs "
                f"{[tuple(y.shape) for y in b]} (fused)"
            )
            return
        if not self.leaf_err:
            self.leaf_err, self.leaf_scale = [0.0] * len(a), [0.0] * len(a)
        elif len(self.leaf_err) != len(a):
            self.mismatch = self.mismatch or "the models return a different number of outputs on different inputs"
            return
        for i, (x, y) in enumerate(zip(a, b)):
            x = x.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
            y = y.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
            finite = torch.isfinite(x) & torch.isfinite(y)
            if not bool(finite.all()):
                same = (x.isnan() & y.isnan()) | (x == y)
                if not bool((finite | same).all()):
                    self.leaf_err[i] = math.inf
                    self.max_abs = math.inf
                self.nonfinite_both += int((~finite & same).sum())
                x, y = x[finite], y[finite]
            if x.numel() == 0:
                continue
            d = x - y
            self.max_abs = max(self.max_abs, float(d.abs().max()))
            self.leaf_err[i] = max(self.leaf_err[i], float(d.abs().max()))
            self.leaf_scale[i] = max(self.leaf_scale[i], float(x.abs().max()))
            self.diff_sq += float(d.dot(d))
            self.ref_sq += float(x.dot(x))
            self.out_sq += float(y.dot(y))
            self.dot += float(x.dot(y))
        if len(a) == 1 and a[0].dim() == 2 and a[0].shape[1] > 1:  # classifier logits (N, classes)
            pa, pb = a[0].argmax(1).cpu(), b[0].argmax(1).cpu()
            self.rows += pa.numel()
            self.agree += int((pa == pb).sum())
            if labels is not None:
                self.labelled += labels.numel()
                self.correct_ref += int((pa == labels).sum())
                self.correct_out += int((pb == labels).sum())

    def comparison(self) -> Comparison:
        if self.mismatch:
            return Comparison(math.inf, math.inf, math.nan, mismatch=self.mismatch)
        na, nb = math.sqrt(self.ref_sq), math.sqrt(self.out_sq)
        if math.isinf(self.max_abs):
            rel = math.inf
        else:
            rel = math.sqrt(self.diff_sq) / na if na > 0 else (0.0 if self.max_abs == 0 else math.inf)
        cos = self.dot / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        return Comparison(self.max_abs, rel, cos)

    def worst(self) -> float:
        """Largest share of its allowance that any output tensor used (at most 1 passes)."""
        if self.mismatch:
            return math.inf
        ratios = []
        for err, scale in zip(self.leaf_err, self.leaf_scale):
            allowed = self.atol + self.rtol * scale
            ratios.append(err / allowed if allowed > 0 else (0.0 if err == 0 else math.inf))
        return max(ratios, default=0.0)

    def agreement(self) -> "float | None":
        return self.agree / self.rows if self.rows else None


# ----------------------------------------------------------------------------- data files


def read_data(path: "str | os.PathLike[str]", *, allow_pickle: bool = False) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """``(inputs, labels or None)`` from a tensor file.

    Accepted: a tensor of inputs; a dict with inputs under ``inputs``/``x``/``images``/... and
    labels under ``labels``/``targets``/``y``/...; a tuple or list ``(inputs[, labels])``.
    Labels are class indices (N,) or one-hot/probabilities (N, classes).
    """
    import torch

    from .checkpoint import read_object
    from .errors import CheckpointError

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


# ----------------------------------------------------------------------------- verify


def _norm_names(model: "nn.Module") -> list[str]:
    from .patterns import is_norm_like

    return [name for name, m in model.named_modules() if is_norm_like(m)]


def _structure(orig: "nn.Module", fused: "nn.Module") -> Structure:
    po, bo = count_tensors(orig)
    pf, bf = count_tensors(fused)
    return Structure(_norm_names(orig), _norm_names(fused), po, pf, bo, bf)


def _pick_spec(orig: Source, fused: Source, input_shape: Any, data: "torch.Tensor | None") -> InputSpec:
    if input_shape is None and data is not None:
        return InputSpec((min(4, int(data.shape[0])), *map(int, data.shape[1:])))
    # a bnfuse output records the input its conversion was checked with
    return input_spec(fused if fused.metadata.get("input") else orig, input_shape)


def _lower_precision(*dtypes: Any) -> Any:
    import torch

    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    known = [d for d in dtypes if d in order]
    return min(known, key=order.index) if known else torch.float32


def verify(
    orig: "str | os.PathLike[str]",
    fused: "str | os.PathLike[str]",
    *,
    arch: "str | None" = None,
    weights: str = "default",
    input_shape: "str | tuple[int, ...] | None" = None,
    samples: int = 3,
    seed: int = 0,
    rtol: "float | None" = None,
    atol: "float | None" = None,
    data: "str | os.PathLike[str] | None" = None,
    batch_size: int = 256,
    allow_pickle: bool = False,
) -> VerifyReport:
    """Compare ``fused`` with ``orig`` on ``samples`` seeded random inputs and, with ``data``, on real ones.

    ``arch`` is used for a file that holds only a state_dict (a bnfuse output brings its own in
    its metadata).  ``rtol``/``atol`` default by dtype (:func:`default_tolerances`).  The report's
    ``ok`` is the verdict; a model that cannot be loaded or run raises a :class:`BnfuseError`.
    """
    import torch

    if samples < 0 or (samples == 0 and data is None):
        raise UsageError(f"--samples {samples}: give at least 1 random sample, or --data with real inputs")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: give a positive number of inputs per batch")
    for name, value in (("--rtol", rtol), ("--atol", atol)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"{name} {value}: give a finite number >= 0")
    t0 = time.perf_counter()
    inputs = labels = None
    if data is not None:
        inputs, labels = read_data(data, allow_pickle=allow_pickle)
    src_o = load_source(orig, arch=arch, weights=weights, allow_pickle=allow_pickle)
    src_f = load_source(fused, arch=arch, weights=weights, allow_pickle=allow_pickle)
    model_o, model_f = src_o.model, src_f.model
    dtype_o, dev_o = model_dtype(model_o)
    dtype_f, dev_f = model_dtype(model_f)
    d_rtol, d_atol = default_tolerances(_lower_precision(dtype_o, dtype_f))
    rtol = d_rtol if rtol is None else float(rtol)
    atol = d_atol if atol is None else float(atol)
    spec = _pick_spec(src_o, src_f, input_shape, inputs)
    t1 = time.perf_counter()

    def run(model: "nn.Module", args: tuple[Any, ...], what: str) -> Any:
        try:
            with torch.no_grad():
                return model(*args)
        except Exception as exc:  # wrong input shape for this model, most often
            from .errors import BnfuseError

            raise BnfuseError(
                f"running the {what} model ({orig if what == 'original' else fused}) on an input of shape "
                f"{spec.kind} {'x'.join(map(str, spec.shape)) if inputs is None else tuple(inputs.shape[1:])} "
                f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. "
                "Pass --input-shape with the shape the model takes"
            ) from exc

    tally = _Tally(rtol, atol)
    for i in range(samples):
        # a fresh copy for each model: a model may modify its input in place
        ref = run(model_o, as_args(make_input(spec, dtype=dtype_o, device=dev_o, seed=seed + i)), "original")
        out = run(model_f, as_args(make_input(spec, dtype=dtype_f, device=dev_f, seed=seed + i)), "fused")
        tally.add(ref, out)
        del ref, out
    t2 = time.perf_counter()

    data_result = None
    if inputs is not None:
        dt = _Tally(rtol, atol)
        for start in range(0, int(inputs.shape[0]), batch_size):
            chunk = inputs[start:start + batch_size]
            lab = None if labels is None else labels[start:start + batch_size]
            ref = run(model_o, (_cast(chunk, dtype_o, dev_o),), "original")
            out = run(model_f, (_cast(chunk, dtype_f, dev_f),), "fused")
            dt.add(ref, out, lab)
        data_result = DataResult(
            path=str(data), count=int(inputs.shape[0]), error=dt.comparison(), worst=dt.worst(),
            agreement=dt.agreement(),
            accuracy_orig=dt.correct_ref / dt.labelled if dt.labelled else None,
            accuracy_fused=dt.correct_out / dt.labelled if dt.labelled else None,
        )
    t3 = time.perf_counter()

    structure = _structure(model_o, model_f)
    report = VerifyReport(
        orig=str(orig), fused=str(fused), orig_kind=src_o.kind, fused_kind=src_f.kind,
        arch=src_o.arch, fused_arch=src_f.arch, input=spec,
        dtype=str(_lower_precision(dtype_o, dtype_f)).replace("torch.", ""),
        samples=samples, seed=seed, rtol=rtol, atol=atol, error=tally.comparison(), worst=tally.worst(),
        structure=structure, top1_agreement=tally.agreement(), top1_rows=tally.rows, data=data_result,
        notes=_notes(src_o, src_f, structure, tally, labels, data_result),
        seconds={"load": t1 - t0, "samples": t2 - t1, "data": t3 - t2, "total": time.perf_counter() - t0},
    )
    return report


def _cast(x: "torch.Tensor", dtype: Any, device: Any) -> "torch.Tensor":
    """A private copy in the model's dtype; integer inputs (token ids) keep their dtype."""
    return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype, copy=True)


def _notes(src_o: Source, src_f: Source, st: Structure, tally: _Tally, labels: Any,
           data: "DataResult | None") -> list[str]:
    notes = [f"original: {n}" for n in src_o.notes] + [f"fused: {n}" for n in src_f.notes]
    if not st.removed:
        notes.append(
            f"the fused model still has all {len(st.bn_orig)} BatchNorm layers of the original: nothing was "
            "folded (is the second file the fused one?)" if st.bn_orig else
            "the original model has no BatchNorm layers"
        )
    added = [n for n in st.bn_fused if n not in set(st.bn_orig)]
    if added:
        notes.append(f"the fused model has BatchNorm layers the original lacks: {', '.join(added[:5])}")
    recorded = {row[1] for row in src_f.metadata.get("folds", []) if isinstance(row, list) and len(row) == 4}
    kept = sorted(recorded & set(st.bn_fused))
    if kept:
        notes.append(f"the fused file's metadata says these were folded, yet they are still BatchNorm: {', '.join(kept[:5])}")
    if tally.nonfinite_both:
        notes.append(f"{tally.nonfinite_both} output values are NaN or infinite in both models (compared as equal)")
    if data is not None and labels is not None and data.accuracy_orig is None:
        notes.append("the models do not return classifier logits (N, classes): no accuracy was computed")
    if src_o.weights == "none":
        notes.append("original built with random weights (--weights none)")
    return notes

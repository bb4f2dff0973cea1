"""End to end: how far the fused model's outputs are from an exact reference, against the
original's own error there, and the one table of tolerances (``--rtol``/``--atol``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["TOLERANCES", "NOISE_FACTOR", "Tolerance", "Comparison", "json_number", "OutputCheck", "Magnitude",
           "compare", "judge_post_processing"]

#: dtype name -> (rtol, atol, site rtol).  rtol/atol: the floor of the end-to-end allowance, of
#: each output's largest magnitude; site rtol: the largest relative (norm) error of a fused layer
#: against its float64 reference, a few units of rounding of the weight's dtype.
TOLERANCES: dict[str, tuple[float, float, float]] = {
    "float64": (1e-9, 1e-12, 1e-10),
    "float32": (1e-4, 1e-6, 1e-5),
    "float16": (2e-2, 1e-3, 4e-3),
    "bfloat16": (5e-2, 1e-2, 3e-2),
}
#: how many times the original's own error (against float64) the fused model may add
NOISE_FACTOR = 4.0


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Tolerance:
    """The end-to-end allowance ``atol + rtol * scale + noise_factor * noise`` and the site limit."""

    rtol: float
    atol: float
    site_rtol: float
    noise_factor: float = NOISE_FACTOR

    @classmethod
    def for_dtype(cls, dtype: Any, rtol: "float | None" = None, atol: "float | None" = None) -> "Tolerance":
        """The defaults for ``dtype`` (float32's for an unknown one), with ``rtol``/``atol`` overriding."""
        for name, value in (("--rtol", rtol), ("--atol", atol)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} {value}: give a finite number >= 0")
        d_rtol, d_atol, site = TOLERANCES.get(_dtype_name(dtype), TOLERANCES["float32"])
        return cls(d_rtol if rtol is None else float(rtol), d_atol if atol is None else float(atol), site)

    def to_dict(self) -> dict[str, float]:
        return {"rtol": self.rtol, "atol": self.atol, "site_rtol": self.site_rtol, "noise_factor": self.noise_factor}


# ----------------------------------------------------------------------------- comparing outputs


@dataclass(frozen=True)
class Comparison:
    """Max absolute error, relative error ``||a - b|| / ||a||`` and cosine similarity."""

    max_abs: float
    rel: float
    cosine: float
    #: the outputs differ in structure or shape (tensors could not be compared element-wise)
    mismatch: "str | None" = None

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs": json_number(self.max_abs), "rel": json_number(self.rel), "cosine": json_number(self.cosine),
                "mismatch": self.mismatch}


def json_number(x: float) -> "float | None":
    """JSON has no inf/NaN: those become null (``mismatch`` or ``ok`` says why)."""
    return x if math.isfinite(x) else None


def _leaves(out: Any) -> list["torch.Tensor"]:
    import torch
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


class _Norms:
    """Running sums for one pair of outputs: max error and the norms behind rel and cosine."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.diff_sq = self.ref_sq = self.out_sq = self.dot = 0.0

    def add(self, x: "torch.Tensor", y: "torch.Tensor") -> float:
        d = x - y
        m = float(d.abs().max()) if d.numel() else 0.0
        self.max_abs = max(self.max_abs, m)
        self.diff_sq += float(d.dot(d))
        self.ref_sq += float(x.dot(x))
        self.out_sq += float(y.dot(y))
        self.dot += float(x.dot(y))
        return m

    def comparison(self, mismatch: "str | None" = None) -> Comparison:
        if mismatch:
            return Comparison(math.inf, math.inf, math.nan, mismatch=mismatch)
        na, nb = math.sqrt(self.ref_sq), math.sqrt(self.out_sq)
        if math.isinf(self.max_abs):
            rel = math.inf
        else:
            rel = math.sqrt(self.diff_sq) / na if na > 0 else (0.0 if self.max_abs == 0 else math.inf)
        cos = self.dot / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        return Comparison(self.max_abs, rel, cos)


class OutputCheck:
    """Accumulates, over one or more batches, the fused model's error against a reference and
    the original's own error against it, per output tensor, in float64."""

    def __init__(self, tol: Tolerance, *, reference: str = "original") -> None:
        self.tol = tol
        #: what the reference is: "float64" (the original in float64) or "original" (its own output)
        self.reference = reference
        self.fused = _Norms()
        self.orig = _Norms()
        self.leaf_err: list[float] = []
        self.leaf_noise: list[float] = []
        self.leaf_scale: list[float] = []
        #: the rounding floor of the reference run: its unit roundoff times the largest magnitude its
        #: activations reached (:class:`Magnitude`); where the reference is no more precise than the
        #: models (float64, or the original's own output) it stands in for the original's own error
        self.floor = 0.0
        self.mismatch: "str | None" = None
        self.nonfinite_both = 0
        #: why this check does not count (its outputs come after post-processing that rounding flipped,
        #: and the tensors feeding post-processing were judged instead); None: it counts
        self.waived: "str | None" = None
        self.batches = 0
        self.rows = self.agree = 0
        self.labelled = self.correct_orig = self.correct_fused = 0

    def _flat(self, t: "torch.Tensor") -> "torch.Tensor":
        import torch

        return t.detach().to(device="cpu", dtype=torch.float64).reshape(-1)

    def add(self, ref: Any, fused: Any, orig: Any = None, labels: "torch.Tensor | None" = None,
            floor: float = 0.0) -> None:
        """Compare one batch: ``ref`` the reference output, ``orig`` the original's output at the
        precision in use (None when ``ref`` is that output), ``labels`` class indices or None, ``floor``
        the rounding floor of the reference run (:meth:`Magnitude.floor`)."""
        import torch

        self.floor = max(self.floor, floor)
        r, f = _leaves(ref), _leaves(fused)
        o = r if orig is None else _leaves(orig)
        self.batches += 1
        shapes = [tuple(x.shape) for x in r]
        if [tuple(y.shape) for y in f] != shapes or [tuple(y.shape) for y in o] != shapes:
            self.mismatch = self.mismatch or (
                f"the outputs differ in structure: {shapes} (original) vs {[tuple(y.shape) for y in f]} (fused)"
            )
            return
        if not self.leaf_err:
            self.leaf_err, self.leaf_noise, self.leaf_scale = [0.0] * len(r), [0.0] * len(r), [0.0] * len(r)
        elif len(self.leaf_err) != len(r):
            self.mismatch = self.mismatch or "the models return a different number of outputs on different inputs"
            return
        for i, (a, b, c) in enumerate(zip(r, f, o)):
            a, b = self._flat(a), self._flat(b)
            c = a if orig is None else self._flat(c)
            finite = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(c)
            if not bool(finite.all()):
                same = ((a.isnan() & b.isnan()) | (a == b)) & ((c.isnan() & b.isnan()) | (c == b))
                if not bool((finite | same).all()):
                    self.leaf_err[i] = self.fused.max_abs = math.inf
                self.nonfinite_both += int((~finite & same).sum())
                a, b, c = a[finite], b[finite], c[finite]
            if a.numel() == 0:
                continue
            self.leaf_err[i] = max(self.leaf_err[i], self.fused.add(a, b))
            self.leaf_noise[i] = max(self.leaf_noise[i], self.orig.add(a, c))
            self.leaf_scale[i] = max(self.leaf_scale[i], float(a.abs().max()))
        self._classes(o, f, labels)

    def _classes(self, o: list["torch.Tensor"], f: list["torch.Tensor"], labels: "torch.Tensor | None") -> None:
        """Top-1 agreement (and accuracy with labels) for classifier logits (N, classes)."""
        if len(o) == 1 and o[0].dim() == 2 and o[0].shape[1] > 1:
            pa, pb = o[0].argmax(1).cpu(), f[0].argmax(1).cpu()
            self.rows += pa.numel()
            self.agree += int((pa == pb).sum())
            if labels is not None:
                self.labelled += labels.numel()
                self.correct_orig += int((pa == labels.cpu()).sum())
                self.correct_fused += int((pb == labels.cpu()).sum())

    @property
    def error(self) -> Comparison:
        """The fused model against the reference."""
        return self.fused.comparison(self.mismatch)

    @property
    def noise(self) -> Comparison:
        """The original at the precision in use against the reference (zero when it is the reference)."""
        return self.orig.comparison(self.mismatch)

    def allowed(self) -> list[float]:
        t = self.tol
        return [t.atol + t.rtol * s + t.noise_factor * (n + self.floor) for s, n in zip(self.leaf_scale, self.leaf_noise)]

    @property
    def worst(self) -> float:
        """Largest share of its allowance that any output tensor used (at most 1 passes)."""
        if self.mismatch:
            return math.inf
        ratios = [e / a if a > 0 else (0.0 if e == 0 else math.inf) for e, a in zip(self.leaf_err, self.allowed())]
        return max(ratios, default=0.0)

    @property
    def ok(self) -> bool:
        return self.batches > 0 and self.mismatch is None and self.worst <= 1.0

    @property
    def agreement(self) -> "float | None":
        return self.agree / self.rows if self.rows else None

    def reason(self, label: str) -> "str | None":
        """Why this check failed, in one sentence (None when it passed or is waived)."""
        if self.waived:
            return None
        if self.batches == 0:
            return f"{label}: nothing was compared"
        if self.mismatch:
            return f"{label}: {self.mismatch}"
        if self.worst <= 1.0:
            return None
        i = max(range(len(self.leaf_err)), key=lambda j: self.leaf_err[j] / max(self.allowed()[j], 1e-300))
        return (f"{label}: output {i} is {self.leaf_err[i]:.3g} away from the {self.reference} reference, above "
                f"the {self.allowed()[i]:.3g} allowed ({self.tol.atol:g} + {self.tol.rtol:g} x {self.leaf_scale[i]:.3g}"
                f" + {self.tol.noise_factor:g} x the original's own error {self.leaf_noise[i]:.3g}"
                + (f" + {self.tol.noise_factor:g} x the rounding floor {self.floor:.3g}" if self.floor else "") + ")")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "waived": self.waived,
            "reference": self.reference,
            "error": self.error.to_dict(),
            "noise": self.noise.to_dict(),
            "worst_ratio": json_number(self.worst),
            "allowed": [json_number(a) for a in self.allowed()],
            "floor": json_number(self.floor),
            "top1_agreement": self.agreement,
            "nonfinite_both": self.nonfinite_both,
        }


class Magnitude:
    """The largest magnitude the activations of one run of a model reach, and the rounding floor it
    sets: a model whose activations pass through 1e8 on their way to outputs of 1 carries about
    ``eps x 1e8`` of rounding in its outputs, whatever the fold, and a reference computed in the
    same precision as the model (float64) cannot show it.  It sees every module's output during the
    runs inside :meth:`hooks` (a global module hook, so no module carries a hook of bnfuse's), with
    torch functions off (a recording run does not see it read anything); ``aminmax`` reduces
    without a copy of the activation."""

    def __init__(self) -> None:
        self.peak = 0.0

    def see(self, x: Any) -> None:
        import torch

        with torch._C.DisableTorchFunction():
            for t in _leaves(x):
                if t.numel():
                    lo, hi = t.detach().aminmax()
                    seen = max(abs(float(lo)), abs(float(hi)))
                    if math.isfinite(seen):
                        self.peak = max(self.peak, seen)

    def floor(self, dtype: Any) -> float:
        """``eps(dtype) x`` the peak: the rounding one operation at the peak makes in ``dtype``."""
        import torch

        return float(torch.finfo(dtype).eps) * self.peak if getattr(dtype, "is_floating_point", False) else 0.0

    @contextlib.contextmanager
    def hooks(self, model: Any) -> Iterator["Magnitude"]:
        """See every output of ``model``'s modules during the runs inside this block."""
        from torch.nn.modules.module import register_module_forward_hook

        mine = {id(m) for m in model.modules()}
        handle = register_module_forward_hook(lambda m, _i, out: self.see(out) if id(m) in mine else None)
        try:
            yield self
        finally:
            handle.remove()


def compare(reference: Any, output: Any) -> Comparison:
    """Max abs error, relative error ``||a-b|| / ||a||`` and cosine similarity over all float outputs."""
    check = OutputCheck(Tolerance.for_dtype("float32"))
    check.add(reference, output)
    return check.error



#: the label of the check on the tensors that feed post-processing
BEFORE_POST = "before post-processing"


def judge_post_processing(outputs: "dict[str, OutputCheck]", final: str, pre: "OutputCheck | None",
                          label: str = BEFORE_POST) -> None:
    """Add ``pre`` (the tensors that feed post-processing, :class:`~.postproc.SelectionProbe`) to
    ``outputs`` when the model has any, and waive the ``final`` outputs' check when only their
    structure differs after post-processing while the tensors feeding it agree in structure: a
    rounding-level difference kept or dropped a detection, and the scores are what is judged."""
    if pre is None or not pre.leaf_err and pre.mismatch is None:
        return
    outputs[label] = pre
    last = outputs[final]
    if last.mismatch is not None and pre.mismatch is None:
        last.waived = (f"{last.mismatch}, after post-processing (score thresholds, top-k, NMS), where a "
                       "rounding-level difference keeps or drops a detection: judged on the tensors that feed "
                       "post-processing instead")

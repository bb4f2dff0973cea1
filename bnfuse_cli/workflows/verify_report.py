"""What ``verify`` returns: the verdict with its errors, the structure of both models, and the
results on ``--data``; as data and as JSON (``to_dict``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..checks import Comparison, OutputCheck, Verdict, json_number as _num
from ..inputs import InputSpec

__all__ = ["VerifyReport", "DataResult", "Structure"]


@dataclass
class DataResult:
    """How both models did on the inputs (and labels) of ``--data``."""

    path: str
    count: int
    check: OutputCheck

    @property
    def error(self) -> Comparison:
        return self.check.error

    @property
    def worst(self) -> float:
        """Largest share of its allowance that any output tensor used; at most 1 within tolerance."""
        return self.check.worst

    @property
    def agreement(self) -> "float | None":
        """Fraction of inputs on which both models predict the same class (classifier outputs only)."""
        return self.check.agreement

    @property
    def accuracy_orig(self) -> "float | None":
        c = self.check
        return c.correct_orig / c.labelled if c.labelled else None

    @property
    def accuracy_fused(self) -> "float | None":
        c = self.check
        return c.correct_fused / c.labelled if c.labelled else None

    def to_dict(self) -> dict[str, Any]:
        e = self.error
        return {
            "path": self.path,
            "count": self.count,
            "ok": self.check.ok,
            "max_abs_error": _num(e.max_abs),
            "rel_error": _num(e.rel),
            "cosine": _num(e.cosine),
            "mismatch": e.mismatch,
            "worst_ratio": _num(self.worst),
            "noise_max_abs": _num(self.check.noise.max_abs),
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
    #: the dtype the outputs were computed in (the lower of the two models', or --dtype)
    dtype: str
    device: str
    autocast: "str | None"
    samples: int
    seed: int
    #: the judge's verdict: random samples, --data, and every fold site
    verdict: Verdict
    structure: Structure
    data: "DataResult | None" = None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    #: where the original's architecture came from when neither its file nor --arch gave it (the fused file's record)
    arch_from: "str | None" = None

    @property
    def ok(self) -> bool:
        """Every fold site and every output checked are within tolerance."""
        return self.verdict.ok

    @property
    def rtol(self) -> float:
        return self.verdict.tolerance.rtol

    @property
    def atol(self) -> float:
        return self.verdict.tolerance.atol

    @property
    def _samples(self) -> "OutputCheck | None":
        return self.verdict.outputs.get("random inputs")

    @property
    def error(self) -> Comparison:
        """Over all random samples."""
        c = self._samples
        return Comparison(math.nan, math.nan, math.nan) if c is None else c.error

    @property
    def worst(self) -> float:
        c = self._samples
        return 0.0 if c is None else c.worst

    @property
    def top1_agreement(self) -> "float | None":
        c = self._samples
        return None if c is None else c.agreement

    @property
    def top1_rows(self) -> int:
        c = self._samples
        return 0 if c is None else c.rows

    def to_dict(self) -> dict[str, Any]:
        from ..version import __version__

        return {
            "ok": self.ok,
            "orig": self.orig,
            "fused": self.fused,
            "orig_kind": self.orig_kind,
            "fused_kind": self.fused_kind,
            "arch": self.arch,
            "arch_from": self.arch_from,
            "fused_arch": self.fused_arch,
            "input": self.input.to_dict(),
            "dtype": self.dtype,
            "device": self.device,
            "autocast": self.autocast,
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
            "check": self.verdict.to_dict(),
            "structure": self.structure.to_dict(),
            "notes": self.notes,
            "seconds": self.seconds,
            "bnfuse_version": __version__,
        }

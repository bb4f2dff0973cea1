"""What ``bench`` returns: per model the times, their median and spread, the speedup and the
judge's verdict; for all, the settings and the machine; as JSON and as a Markdown table.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from ..version import __version__
from ..checks import json_number
from .timing import threads_text

if TYPE_CHECKING:
    from ..checks import Comparison, Verdict
    from ..inputs import InputSpec
    from .timing import Contention

__all__ = ["Stats", "ModelBench", "BenchReport", "verdict", "DEVICE_RUN"]

#: the verdict's name for the run on the benchmark's device, dtype and autocast
DEVICE_RUN = "benchmark run"


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted data (numpy's default method)."""
    if not sorted_xs:
        return float("nan")
    pos = (len(sorted_xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Stats:
    """Median, quartiles and extremes of a sample (times in milliseconds, or ratios)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, xs: Sequence[float]) -> "Stats":
        s = sorted(xs)
        if not s:
            nan = float("nan")
            return cls(nan, nan, nan, nan, nan, 0)
        return cls(statistics.median(s), _quantile(s, 0.25), _quantile(s, 0.75), s[0], s[-1], len(s))

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "iqr": self.iqr,
                "min": self.min, "max": self.max, "n": self.n}


@dataclass
class ModelBench:
    """One model's race: times of the original and the fused model, their ratio, and the verdict."""

    model: str
    arch: "str | None"
    weights: str
    input: "InputSpec"
    bn_found: int
    bn_folded: int
    #: BatchNorms left in the fused model, as (layer, reason)
    bn_left: list[tuple[str, str]]
    #: the judge's verdict: fold sites, the fold's own check, and the run on the benchmark's device
    check: "Verdict"
    #: per-call times in milliseconds, one per timed pair
    original_ms: list[float]
    fused_ms: list[float]
    #: calls of each model per timed sample (more than one only for models faster than ~1 ms)
    calls_per_sample: int = 1
    warmup: int = 0
    fold_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    #: what both models ran in: eager, export (torch.export programs) or onnxruntime
    runtime: str = "eager"
    #: onnxruntime only: per graph ("original", "fused") its nodes after onnxruntime's own optimisation:
    #: ``bn``, ``conv`` (all conv-like ops), ``nodes``, ``conv_ops`` (by op type)
    graph_ops: "dict[str, dict[str, Any]] | None" = None
    #: how contended the CPUs were while it was timed (None: not measured)
    contention: "Contention | None" = None

    @property
    def contended(self) -> bool:
        """Timed on a busy machine, or with more threads than usable CPUs: its times are not trustworthy."""
        return self.contention is not None and self.contention.contended

    def graph_text(self) -> str:
        """``BN a -> b, conv c -> d`` (original -> fused, after onnxruntime's optimisation), or ``""``."""
        g = self.graph_ops
        if not g:
            return ""
        o, f = g.get("original", {}), g.get("fused", {})
        return f"BN {o.get('bn', '?')} -> {f.get('bn', '?')}, conv {o.get('conv', '?')} -> {f.get('conv', '?')}"

    @property
    def error(self) -> "Comparison":
        """The fused model's output on the benchmark's device against the exact reference."""
        return self.check.outputs[DEVICE_RUN].error

    @property
    def noise(self) -> "Comparison":
        """The original's own error there: the noise floor of the precision in use."""
        return self.check.outputs[DEVICE_RUN].noise

    @property
    def tolerance(self) -> float:
        return self.check.tolerance.rtol

    @property
    def correct(self) -> bool:
        """Every fold site, the fold's check and the device run within tolerance."""
        return self.check.ok

    @property
    def original(self) -> Stats:
        return Stats.of(self.original_ms)

    @property
    def fused(self) -> Stats:
        return Stats.of(self.fused_ms)

    @property
    def speedup(self) -> Stats:
        """Ratios original/fused of each alternating pair (above 1: the fused model is faster)."""
        return Stats.of([o / f for o, f in zip(self.original_ms, self.fused_ms) if f > 0])

    @property
    def within_noise(self) -> bool:
        """The speedup's interquartile range contains 1.0: no difference can be claimed."""
        s = self.speedup
        return s.n == 0 or s.q1 <= 1.0 <= s.q3

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "runtime": self.runtime,
            "arch": self.arch,
            "weights": self.weights,
            "input": self.input.to_dict(),
            "bn_found": self.bn_found,
            "bn_folded": self.bn_folded,
            "bn_left": [{"norm": n, "reason": r} for n, r in self.bn_left],
            "error": {
                **self.error.to_dict(), "tolerance": self.tolerance, "ok": self.correct,
                "noise_rel": json_number(self.noise.rel), "noise_max_abs": json_number(self.noise.max_abs),
            },
            "check": self.check.to_dict(),
            "original_ms": self.original.to_dict(),
            "fused_ms": self.fused.to_dict(),
            "speedup": self.speedup.to_dict(),
            "within_noise": self.within_noise,
            "samples": {"original_ms": self.original_ms, "fused_ms": self.fused_ms},
            "calls_per_sample": self.calls_per_sample,
            "warmup": self.warmup,
            "fold_seconds": self.fold_seconds,
            "graph_ops": self.graph_ops,
            "contended": self.contended,
            "contention": None if self.contention is None else self.contention.to_dict(),
            "notes": self.notes,
        }


@dataclass
class BenchReport:
    """All models' results, the settings they ran under, and the machine."""

    results: list[ModelBench]
    settings: dict[str, Any]
    environment: dict[str, Any]
    date: str = ""
    #: what the reader must know before trusting the times: a busy machine, oversubscribed threads,
    #: a thread count bench chose for the load
    warnings: list[str] = field(default_factory=list)

    def slower_than(self, min_speedup: "float | None") -> list[ModelBench]:
        """Models whose median speedup is below ``min_speedup`` (none when it is None)."""
        if min_speedup is None:
            return []
        return [r for r in self.results if not (r.speedup.median >= min_speedup)]

    def incorrect(self) -> list[ModelBench]:
        """Models whose fused model the judge rejects."""
        return [r for r in self.results if not r.correct]

    def passed(self, min_speedup: "float | None" = None) -> bool:
        return not self.incorrect() and not self.slower_than(min_speedup)

    def to_dict(self, min_speedup: "float | None" = None) -> dict[str, Any]:
        return {
            "bnfuse_version": __version__,
            "date": self.date,
            "environment": self.environment,
            "settings": self.settings,
            "min_speedup": min_speedup,
            "passed": self.passed(min_speedup),
            "contended": any(r.contended for r in self.results),
            "warnings": self.warnings,
            "models": [r.to_dict() for r in self.results],
        }

    def to_markdown(self, min_speedup: "float | None" = None) -> str:
        """A GitHub-flavoured Markdown table for a CI job summary."""
        env, st = self.environment, self.settings
        graphs = any(r.graph_ops for r in self.results)
        lines = [
            "### bnfuse bench",
            "",
            f"{env.get('device_name', '?')} ({st.get('device')}), torch {env.get('torch')}, {st.get('dtype')}, "
            f"{'channels_last, ' if st.get('channels_last') else ''}"
            f"{'torch.compile, ' if st.get('compile') else ''}{threads_text(env.get('threads'))}, "
            f"runtime {st.get('runtime', 'eager')}"
            + (f" (onnxruntime {env['onnxruntime']}, ORT_ENABLE_ALL)" if env.get("onnxruntime") else "")
            + f", {self.date}",
            "",
            *[f"> **warning:** {w}" for w in self.warnings],
            *([""] if self.warnings else []),
            "| model | runtime | input | BN folded | original ms (IQR) | fused ms (IQR) | speedup (IQR) | max abs err "
            "| rel err | noise | " + ("ORT graph BN / conv (orig -> fused) | " if graphs else "") + "verdict |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | " + ("--- | " if graphs else "")
            + "--- |",
        ]
        for r in self.results:
            o, f, s = r.original, r.fused, r.speedup
            lines.append(
                f"| {r.model} | {r.runtime} | {'x'.join(map(str, r.input.shape))} | {r.bn_folded}/{r.bn_found} "
                f"| {o.median:.3f} ({o.iqr:.3f}) | {f.median:.3f} ({f.iqr:.3f}) "
                f"| {s.median:.3f}x ({s.q1:.3f}-{s.q3:.3f}) | {r.error.max_abs:.2e} | {r.error.rel:.2e} "
                f"| {r.noise.rel:.2e} | " + (f"{r.graph_text() or '-'} | " if graphs else "")
                + f"{verdict(r, min_speedup)} |"
            )
        left = [(r.model, n, why) for r in self.results for n, why in r.bn_left]
        if left:
            lines += ["", "BatchNorm layers left unfolded:", ""]
            lines += [f"- {m}: `{n}`: {why}" for m, n, why in left]
        lines += ["", "Speedup = original time / fused time per alternating pair; median and interquartile range. "
                  "\"within noise\": the IQR contains 1.0. rel err: the fused output against the original in "
                  "float64; noise: the original's own relative error there (the precision's floor)."
                  + (" ORT graph: BatchNormalization and conv-like nodes (Conv, FusedConv, NCHWc Conv) left in "
                     "each graph after onnxruntime's own optimisation at ORT_ENABLE_ALL." if graphs else ""), ""]
        return "\n".join(lines)


def verdict(r: ModelBench, min_speedup: "float | None" = None) -> str:
    """One short phrase: wrong output, below the gate, within noise, faster or slower; flagged when the
    times were taken on a busy machine or with oversubscribed threads."""
    if not r.correct:
        return "WRONG OUTPUT"
    s = r.speedup
    if min_speedup is not None and not (s.median >= min_speedup):
        phrase = f"BELOW {min_speedup:g}x"
    elif r.within_noise:
        phrase = "within noise"
    else:
        phrase = "faster" if s.median > 1.0 else "slower"
    if r.contention is not None and r.contention.oversubscribed:
        return f"{phrase} (threads oversubscribed)"
    return f"{phrase} (busy machine)" if r.contended else phrase

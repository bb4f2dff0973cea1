"""``bench``: time an original model and its fused copy side by side, and check they agree.

Numbers a team can gate on need a fair race: both models live in one process, on the same
device, dtype, memory format, thread count and backend flags (TF32, cudnn.benchmark), and they
run alternately (orig, fused, fused, orig, ...) so that drift in clock speed or load hits both
alike.  Each pair of runs gives one speedup ratio; the report gives the median and the
interquartile range (IQR) of the times and of the ratios, and says when the ratios' IQR
contains 1.0, i.e. when the difference is within noise.  On CUDA the runs are timed with CUDA
events after a synchronisation.  The fused model's output is compared with the original's on
the same input first, because a fast wrong model is worthless.

Nothing here prints: progress goes to an optional callback, results to a :class:`BenchReport`.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import __version__
from .checks import json_number
from .errors import BnfuseError, UsageError
from .precision import parse_dtype, resolve_device

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .checks import Comparison, Verdict
    from .fusion import FuseResult
    from .inputs import InputSpec
    from .files.load import Source

__all__ = [
    "DEFAULT_MODELS",
    "BenchReport",
    "ModelBench",
    "Stats",
    "bench",
    "resolve_device",
    "machine_info",
]

#: representative torchvision architectures with BatchNorm (plain, bottleneck, depthwise, SE, RegNet)
DEFAULT_MODELS: tuple[str, ...] = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf")

#: defaults by device type: (batch size, timed pairs, warm-up pairs, time budget per model in s)
_DEFAULTS = {"cpu": (1, 20, 3, 8.0), "cuda": (32, 100, 10, 10.0)}

#: a progress callback: (description, completed steps, total steps) for the current model
ProgressFn = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------- small helpers


def machine_info() -> dict[str, Any]:
    """CPU model, core count, OS, Python, and the torch version, without importing torch."""
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 0

    def version(dist: str) -> "str | None":
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu": cpu,
        "cores": cores,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "bnfuse": __version__,
    }


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

    @property
    def error(self) -> "Comparison":
        """The fused model's output on the benchmark's device against the exact reference."""
        return self.check.outputs[_DEVICE_RUN].error

    @property
    def noise(self) -> "Comparison":
        """The original's own error there: the noise floor of the precision in use."""
        return self.check.outputs[_DEVICE_RUN].noise

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
            "notes": self.notes,
        }


@dataclass
class BenchReport:
    """All models' results, the settings they ran under, and the machine."""

    results: list[ModelBench]
    settings: dict[str, Any]
    environment: dict[str, Any]
    date: str = ""

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
            "models": [r.to_dict() for r in self.results],
        }

    def to_markdown(self, min_speedup: "float | None" = None) -> str:
        """A GitHub-flavoured Markdown table for a CI job summary."""
        env, st = self.environment, self.settings
        lines = [
            "### bnfuse bench",
            "",
            f"{env.get('device_name', '?')} ({st.get('device')}), torch {env.get('torch')}, {st.get('dtype')}, "
            f"{'channels_last, ' if st.get('channels_last') else ''}"
            f"{'torch.compile, ' if st.get('compile') else ''}{env.get('threads')} threads, "
            f"{self.date}",
            "",
            "| model | input | BN folded | original ms (IQR) | fused ms (IQR) | speedup (IQR) | max abs err | rel err "
            "| noise | verdict |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in self.results:
            o, f, s = r.original, r.fused, r.speedup
            lines.append(
                f"| {r.model} | {'x'.join(map(str, r.input.shape))} | {r.bn_folded}/{r.bn_found} | {o.median:.3f} ({o.iqr:.3f}) | {f.median:.3f} ({f.iqr:.3f}) "
                f"| {s.median:.3f}x ({s.q1:.3f}-{s.q3:.3f}) | {r.error.max_abs:.2e} | {r.error.rel:.2e} "
                f"| {r.noise.rel:.2e} | {verdict(r, min_speedup)} |"
            )
        left = [(r.model, n, why) for r in self.results for n, why in r.bn_left]
        if left:
            lines += ["", "BatchNorm layers left unfolded:", ""]
            lines += [f"- {m}: `{n}`: {why}" for m, n, why in left]
        lines += ["", "Speedup = original time / fused time per alternating pair; median and interquartile range. "
                  "\"within noise\": the IQR contains 1.0. rel err: the fused output against the original in "
                  "float64; noise: the original's own relative error there (the precision's floor).", ""]
        return "\n".join(lines)


def verdict(r: ModelBench, min_speedup: "float | None" = None) -> str:
    """One short phrase: wrong output, below the gate, within noise, faster or slower."""
    if not r.correct:
        return "WRONG OUTPUT"
    s = r.speedup
    if min_speedup is not None and not (s.median >= min_speedup):
        return f"BELOW {min_speedup:g}x"
    if r.within_noise:
        return "within noise"
    return "faster" if s.median > 1.0 else "slower"


# ----------------------------------------------------------------------------- the race


class _Timer:
    """Times ``calls`` calls of a function: perf_counter on CPU, CUDA events on CUDA."""

    def __init__(self, device: "torch.device") -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.device = device
        self.torch = torch

    def __call__(self, fn: Callable[[], Any], calls: int) -> float:
        """Milliseconds per call."""
        if self.cuda:
            cuda = self.torch.cuda
            start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            cuda.synchronize(self.device)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls


def _environment(device: "torch.device") -> dict[str, Any]:
    import torch

    env = machine_info()
    env["torch"] = torch.__version__
    env["threads"] = torch.get_num_threads()
    env["interop_threads"] = torch.get_num_interop_threads()
    env["device"] = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device_name"] = env["cpu"]
    env["backends"] = _backend_flags()
    return env


def _backend_flags() -> dict[str, Any]:
    import torch

    return {
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
    }


def _bench_spec(src: "Source", input_shape: "str | tuple[int, ...] | None", batch_size: "int | None",
                default_batch: int) -> "InputSpec":
    """The input as ``convert`` and ``verify`` take it (the one recorded in a fused file, the
    model's ``example_input_shape``, or ``--input-shape``), at the device's default batch size
    unless ``--batch-size`` or a full ``--input-shape`` says otherwise."""
    from .inputs import input_spec

    if batch_size is None and input_shape is None:
        batch_size = default_batch
    return input_spec(src, input_shape, batch_size=batch_size)


def _to_memory_format(x: Any, fmt: Any) -> Any:
    import torch

    if fmt is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.contiguous(memory_format=fmt) if x.dim() == (4 if fmt is torch.channels_last else 5) else x
    if isinstance(x, list):
        return [_to_memory_format(t, fmt) for t in x]
    return x


def _memory_format(spec: "InputSpec", channels_last: bool) -> Any:
    import torch

    if not channels_last:
        return None
    rank = len(spec.shape) + (1 if spec.kind == "images" and len(spec.shape) == 3 else 0)
    if rank == 4:
        return torch.channels_last
    if rank == 5:
        return torch.channels_last_3d
    raise UsageError(
        f"--channels-last needs a 4-D (N,C,H,W) or 5-D input; this model takes {'x'.join(map(str, spec.shape))}"
    )


def _finite(out: Any) -> bool:
    import torch
    from torch.utils._pytree import tree_flatten

    return all(bool(torch.isfinite(t).all()) for t in tree_flatten(out)[0]
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def _compiled(model: "nn.Module", name: str) -> Any:
    import torch

    if not hasattr(torch, "compile"):
        raise UsageError(f"--compile: torch {torch.__version__} has no torch.compile; run without --compile")
    return torch.compile(model)


def _first_call(fn: Callable[[], Any], name: str, compiled: bool) -> Any:
    """Run once; a torch.compile failure becomes a clear error instead of a traceback."""
    if not compiled:
        return fn()
    try:
        return fn()
    except BnfuseError:
        raise
    except Exception as exc:  # compilers fail in many ways; none of them is the user's model's fault
        first = (str(exc).strip().splitlines() or ["no details"])[0]
        raise UsageError(
            f"--compile: torch.compile failed on {name} ({type(exc).__name__}: {first[:300]}). "
            "It needs a working C/C++ compiler on CPU, or Triton on CUDA; run without --compile"
        ) from exc


@dataclass
class _Settings:
    """How every model is raced: one object instead of a long argument list."""

    device: "torch.device"
    dtype: "torch.dtype"
    autocast: "str | None"
    arch: "str | None"
    weights: str
    allow_pickle: bool
    key: "str | None"
    input_shape: Any
    batch_size: "int | None"
    channels_last: bool
    compile: bool
    iters: int
    warmup: int
    time_budget: "float | None"
    min_sample_ms: float
    seed: int
    rtol: "float | None"
    atol: "float | None"
    progress: "ProgressFn | None"

    def to_dict(self) -> dict[str, Any]:
        """The settings as the JSON report gives them."""
        shape = self.input_shape
        return {
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""), "autocast": self.autocast,
            "batch_size": self.batch_size,
            "input_shape": shape if isinstance(shape, (str, type(None))) else list(shape),
            "channels_last": self.channels_last, "threads": None, "compile": self.compile, "iters": self.iters,
            "warmup": self.warmup, "time_budget_s": self.time_budget, "min_sample_ms": self.min_sample_ms,
            "weights": self.weights, "rtol": self.rtol, "atol": self.atol, "seed": self.seed,
        }


@dataclass
class _Prepared:
    """Stage 1's result: the original in float32 on the CPU, in eval mode, and its input."""

    source: str
    src: "Source"
    original: "nn.Module"
    spec: "InputSpec"
    notes: list[str]


def _prepare(source: str, st: _Settings) -> _Prepared:
    """Stage 1: load the model; a randomly initialised one gets BN statistics worth folding."""
    import torch

    from .inputs import InputSpec, as_args, make_input, randomize_bn
    from .files.load import load_source

    src = load_source(source, arch=st.arch, weights=st.weights, allow_pickle=st.allow_pickle, key=st.key)
    original = src.model.eval().to(torch.float32)
    notes = list(src.notes)
    spec = _bench_spec(src, st.input_shape, st.batch_size, _DEFAULTS[st.device.type][0])
    if src.weights == "none":
        calib = InputSpec((2, *spec.shape[1:]), spec.kind) if spec.kind == "tensor" else spec
        n = randomize_bn(original, seed=st.seed, example=as_args(make_input(calib, dtype=torch.float32,
                                                                            seed=st.seed + 1)))
        notes.append(f"random weights: the {n} BatchNorm layers got random scale/shift and statistics "
                     "measured on random input, so the check is not trivial")
    return _Prepared(source, src, original, spec, notes)


def _fold(prep: _Prepared, st: _Settings) -> "FuseResult":
    """Stage 2: fuse a copy through the one pipeline, on the CPU in float32 (statistics in
    float64), before any cast: a model folded after a cast to float16 would be folded from
    rounded statistics.  The data flow does not depend on the batch, so one sample is enough."""
    import torch

    from .fusion import fuse
    from .inputs import InputSpec, as_args, make_input

    probe = InputSpec((1, *prep.spec.shape[1:]), prep.spec.kind)
    return fuse(prep.original, as_args(make_input(probe, dtype=torch.float32, seed=st.seed)), inplace=False,
                rtol=st.rtol, atol=st.atol)


#: the verdict's name for the run on the benchmark's device, dtype and autocast
_DEVICE_RUN = "benchmark run"


def _judge(prep: _Prepared, result: "FuseResult", runners: tuple[Any, Any], args32: tuple[Any, ...],
           args: tuple[Any, ...], st: _Settings) -> "Verdict":
    """Stage 3: both models as benchmarked against the original in float64 on the same device.

    The float64 copy is made before the models are cast and dropped before the timing starts."""
    import copy

    import torch

    from .checks import OutputCheck, Tolerance, Verdict
    from .precision import autocast, precision_flags

    ref_model = copy.deepcopy(prep.original).to(device=st.device, dtype=torch.float64)
    ref_args = tuple(_cast_floats(a, torch.float64) for a in args32)
    with torch.inference_mode():
        ref = ref_model(*ref_args)
    del ref_model, ref_args
    run_orig, run_fused = runners
    for m in (prep.original, result.model):
        m.to(device=st.device, dtype=st.dtype)
        fmt = _memory_format(prep.spec, st.channels_last)
        if fmt is not None:
            m.to(memory_format=fmt)
    runtime = getattr(torch, st.autocast) if st.autocast else st.dtype
    tol = Tolerance.for_dtype(runtime, st.rtol, st.atol)
    check = OutputCheck(tol, reference="float64")
    with torch.inference_mode(), autocast(st.device, st.autocast):
        orig = _first_call(lambda: run_orig(*args), prep.source, st.compile)
        fused = _first_call(lambda: run_fused(*args), prep.source, st.compile)
    check.add(ref, fused, orig)
    if not _finite(orig):
        prep.notes.append(f"the original model's own output is not finite in {str(st.dtype).replace('torch.', '')}: "
                          "the check cannot pass; try float32 or real weights")
    outputs = dict(result.verdict.outputs)
    outputs[_DEVICE_RUN] = check
    name = str(runtime).replace("torch.", "")
    return Verdict(tol, outputs, result.verdict.sites, precision_flags(st.device, st.autocast, st.dtype),
                   basis=f"fold sites in float64; the fold on the CPU in float32; the {name} run on {st.device} "
                         "against the original in float64 there")


def _cast_floats(x: Any, dtype: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_cast_floats(t, dtype) for t in x)
    return x


def _race(calls_of: tuple[Callable[[], Any], Callable[[], Any]], st: _Settings, tick: Callable[[str, int], None],
          notes: list[str]) -> tuple[list[float], list[float], int]:
    """Stage 4: warm-up, then timed pairs in alternating order; returns both time lists and the
    calls per sample (the fastest of three probe calls decides it, so a sub-millisecond model is
    not timed at the clock's resolution)."""
    import gc

    import torch

    from .precision import autocast

    call_orig, call_fused = calls_of
    timer = _Timer(st.device)
    with torch.inference_mode(), autocast(st.device, st.autocast):
        for i in range(st.warmup):
            timer(call_orig, 1)
            timer(call_fused, 1)
            tick("warm-up", i + 1)
        probe_ms = min(min(timer(call_orig, 1), timer(call_fused, 1)) for _ in range(3))
        calls = max(1, math.ceil(st.min_sample_ms / probe_ms)) if probe_ms > 0 else 1
        orig_ms: list[float] = []
        fused_ms: list[float] = []
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        started = time.perf_counter()
        try:
            for i in range(st.iters):
                first, second = (call_orig, call_fused) if i % 2 == 0 else (call_fused, call_orig)
                a, b = timer(first, calls), timer(second, calls)
                orig_ms.append(a if i % 2 == 0 else b)
                fused_ms.append(b if i % 2 == 0 else a)
                tick("timing", st.warmup + i + 1)
                if (st.time_budget is not None and 5 <= i + 1 < st.iters
                        and time.perf_counter() - started > st.time_budget):
                    notes.append(f"time budget of {st.time_budget:g} s reached after {i + 1} of {st.iters} pairs")
                    break
        finally:
            if gc_was_enabled:
                gc.enable()
    return orig_ms, fused_ms, calls


def _bench_one(source: str, st: _Settings) -> ModelBench:
    """Prepare, fold through :func:`bnfuse_cli.fuse`, judge, time, report."""
    import torch

    from .inputs import as_args, make_input

    total = st.warmup + st.iters

    def tick(what: str, done: int) -> None:
        if st.progress is not None:
            st.progress(f"{source}: {what}", done, total)

    tick("loading", 0)
    prep = _prepare(source, st)
    tick("folding", 0)
    t0 = time.perf_counter()
    result = _fold(prep, st)
    fold_seconds = time.perf_counter() - t0
    plan = result.plan

    tick("checking", 0)
    fmt = _memory_format(prep.spec, st.channels_last)
    args32 = as_args(_to_memory_format(make_input(prep.spec, dtype=torch.float32, device=st.device, seed=st.seed),
                                       fmt))
    args = tuple(_cast_floats(a, st.dtype) for a in args32)
    run_orig: Any = prep.original
    run_fused: Any = result.model
    if st.compile:
        run_orig, run_fused = _compiled(prep.original, source), _compiled(result.model, source)
    # the runners hold the modules, cast in place by _judge, so compiled ones see the cast weights
    check = _judge(prep, result, (run_orig, run_fused), args32, args, st)
    times = _race((lambda: run_orig(*args), lambda: run_fused(*args)), st, tick, prep.notes)
    tick("done", total)
    bench_result = ModelBench(
        model=source, arch=prep.src.arch, weights=prep.src.weights, input=prep.spec,
        bn_found=len(plan.norms), bn_folded=len(plan.folded_norms), bn_left=[(s.norm, s.reason) for s in plan.skipped],
        check=check, original_ms=times[0], fused_ms=times[1], calls_per_sample=times[2], warmup=st.warmup,
        fold_seconds=fold_seconds, notes=prep.notes,
    )
    return bench_result


def _check_counts(*, iters: int, warmup: int, batch_size: "int | None", threads: "int | None",
                  budget: "float | None") -> None:
    for name, value, low in (("--iters", iters, 1), ("--warmup", warmup, 0), ("--batch-size", batch_size, 1),
                             ("--threads", threads, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} {value}: must be at least {low}")
    if budget is not None and budget <= 0:
        raise UsageError(f"--time-budget {budget:g}: must be positive (seconds of timing per model)")


def bench(
    models: "Sequence[str] | None" = None,
    *,
    device: str = "auto",
    dtype: str = "float32",
    autocast: "str | None" = None,
    batch_size: "int | None" = None,
    input_shape: "str | tuple[int, ...] | None" = None,
    channels_last: bool = False,
    threads: "int | None" = None,
    iters: "int | None" = None,
    warmup: "int | None" = None,
    time_budget: "float | None" = -1.0,
    compile: bool = False,
    arch: "str | None" = None,
    weights: str = "none",
    allow_pickle: bool = False,
    key: "str | None" = None,
    rtol: "float | None" = None,
    atol: "float | None" = None,
    min_sample_ms: float = 2.0,
    seed: int = 0,
    progress: "ProgressFn | None" = None,
) -> BenchReport:
    """Time each model and its fused copy, alternating, and judge the fused model.

    ``models`` are torchvision names, ``timm:NAME``, ``pkg.mod:factory`` or checkpoint files
    (default: :data:`DEFAULT_MODELS`).  A model built with random weights (``weights="none"``,
    the default, so it runs offline) gets random BatchNorm statistics first.  The fold runs on
    the CPU in float32 through :func:`bnfuse_cli.fuse` (statistics in float64); both models are
    then cast to ``dtype`` and moved to ``device``, and run under ``autocast`` (float16 or
    bfloat16) when given.  The verdict (``rtol``/``atol`` as in ``convert`` and ``verify``)
    holds at that precision: see :mod:`bnfuse_cli.checks`.  Each of ``iters`` timed pairs runs
    both models once (or a few times, for models faster than ``min_sample_ms``) after
    ``warmup`` untimed pairs; a model stops early after ``time_budget`` seconds of timing
    (``-1``: the device default, None: no limit), with at least 5 pairs.  ``threads`` sets
    torch's intra-op threads for the run only.
    """
    import torch

    from .checks import Tolerance
    from .inputs import check_shape_option
    from .precision import check_autocast

    dev = resolve_device(device)
    dt = parse_dtype(dtype)
    amp = check_autocast(autocast)
    Tolerance.for_dtype(dt, rtol, atol)  # refuses a bad tolerance or shape before any model is built
    check_shape_option(input_shape)
    d_batch, d_iters, d_warmup, d_budget = _DEFAULTS[dev.type]
    iters = d_iters if iters is None else iters
    warmup = d_warmup if warmup is None else warmup
    budget = d_budget if time_budget is not None and time_budget < 0 else time_budget
    _check_counts(iters=iters, warmup=warmup, batch_size=batch_size, threads=threads, budget=budget)
    if compile:
        warmup = max(warmup, 2)  # the first calls compile
    sources = list(models) if models else list(DEFAULT_MODELS)
    if arch is not None and len(sources) > 1:
        raise UsageError("--arch applies to one checkpoint: bench one state_dict at a time with --arch")
    st = _Settings(device=dev, dtype=dt, autocast=amp, arch=arch, weights=weights, allow_pickle=allow_pickle, key=key,
                   input_shape=input_shape, batch_size=batch_size, channels_last=channels_last, compile=compile,
                   iters=iters, warmup=warmup, time_budget=budget, min_sample_ms=min_sample_ms, seed=seed,
                   rtol=rtol, atol=atol, progress=progress)

    old_threads = torch.get_num_threads()
    flags_before = _backend_flags()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        results = []
        for src in sources:
            results.append(_bench_one(src, st))
            if dev.type == "cuda":  # the last model's tensors are gone with _bench_one's frame
                torch.cuda.empty_cache()
        env = _environment(dev)
        if _backend_flags() != flags_before:  # pragma: no cover - a model changed global flags
            results[-1].notes.append("backend flags (TF32/cudnn.benchmark) changed during the run")
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
    settings = st.to_dict()
    settings["batch_size"] = batch_size if batch_size is not None else (None if input_shape else d_batch)
    settings["threads"] = threads
    date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    return BenchReport(results=results, settings=settings, environment=env, date=date)

"""``bench``: time an original model and its fused copy side by side, and check they agree.

Numbers a team can gate on need a fair race: both models live in one process, on the same
device, dtype, memory format, thread count and backend flags (TF32, cudnn.benchmark), and they
run alternately (orig, fused, fused, orig, ...) so that drift in clock speed or load hits both
alike.  Each pair of runs gives one speedup ratio; the report gives the median and the
interquartile range (IQR) of the times and of the ratios, and says when the ratios' IQR
contains 1.0, i.e. when the difference is within noise.  On CUDA the runs are timed with CUDA
events after a synchronisation (:mod:`.timing`).  The fused model is judged first
(:mod:`bnfuse_cli.checks`), because a fast wrong model is worthless: every fold site in float64,
and the output on the benchmark's own device, dtype and autocast against the original in float64
there, allowing a few times the original's own error (TF32 convolutions, half precision).

Stages, top to bottom: prepare (load, random BN statistics), fold (through :func:`fuse`), place
(the float64 reference, then the cast), the runtime (:data:`RUNTIMES`), judge, race, report
(:mod:`.bench_report`).

The runtime (``--runtime``) is what both models run in: ``eager`` (the modules themselves),
``export`` (each exported with ``torch.export`` through the files layer and run as
``ep.module()``), or ``onnxruntime`` (each exported to ONNX and run by onnxruntime on the CPU
with its own graph optimisations at ``ORT_ENABLE_ALL`` and the same session options (intra-op
threads not spinning between runs: two alternating sessions whose idle threads spin slow each
other down, about 2x for resnet18 on 2 cores): the
baseline is the original as onnxruntime optimises it, which already folds Conv+BN, so the race
measures what bnfuse adds over it).  The judge runs on the programs as raced.

Nothing here prints: progress goes to an optional callback, results to a :class:`BenchReport`.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import UsageError
from ..inputs import cast_floats, memory_format, to_memory_format
from ..precision import parse_dtype, resolve_device
from .bench_report import DEVICE_RUN, BenchReport, ModelBench, Stats, verdict
from .runtimes import RUNTIMES, check_runtime, ort_op_counts, programs
from .timing import Contention, LoadMeter, backend_flags, choose_threads, environment, first_call, machine_info, race
from .options import BenchSettings, split_call
from .source import SourceOptions, prepare

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..checks import Verdict
    from .fuse import FuseResult
    from ..inputs import InputSpec
    from ..files.load import Source

__all__ = [
    "DEFAULT_MODELS",
    "RUNTIMES",
    "ort_op_counts",
    "BenchReport",
    "ModelBench",
    "Stats",
    "bench",
    "verdict",
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


# ----------------------------------------------------------------------------- the race


def _finite(out: Any) -> bool:
    import torch
    from torch.utils._pytree import tree_flatten

    return all(bool(torch.isfinite(t).all()) for t in tree_flatten(out)[0]
               if isinstance(t, torch.Tensor) and t.is_floating_point())


@dataclass
class _Settings:
    """How every model is raced: one object instead of a long argument list."""

    device: "torch.device"
    dtype: "torch.dtype"
    autocast: "str | None"
    #: how each source is loaded (its weights, arch, key, input shape, seed)
    source: SourceOptions
    batch_size: "int | None"
    channels_last: bool
    compile: bool
    iters: int
    warmup: int
    #: seconds of timing per model (0: no limit)
    time_budget: float
    min_sample_ms: float
    rtol: "float | None"
    atol: "float | None"
    progress: "ProgressFn | None"
    #: torch intra-op threads for the run (None: torch's choice)
    threads: "int | None" = None
    #: how busy the machine is, read before and after each model's timing
    meter: "LoadMeter | None" = None
    #: the threads that time each model and compete for the CPUs (torch's intra-op threads; 1 on CUDA)
    race_threads: int = 1
    #: what both models run in: one of :data:`RUNTIMES`
    runtime: str = "eager"
    #: the options of the passes that make the fused side, by name, every one set (``FuseOptions.resolved``)
    passes: "dict[str, bool]" = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The settings as the JSON report gives them (the batch size the device's default when
        neither --batch-size nor --input-shape chose one)."""
        batch = self.batch
        shape = self.source.input_shape
        return {
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""), "autocast": self.autocast,
            "batch_size": batch,
            "input_shape": shape if isinstance(shape, (str, type(None))) else list(shape),
            "runtime": self.runtime, **self.passes,
            "channels_last": self.channels_last, "threads": self.threads, "compile": self.compile, "iters": self.iters,
            "warmup": self.warmup, "time_budget_s": self.time_budget, "min_sample_ms": self.min_sample_ms,
            "weights": self.source.weights, "rtol": self.rtol, "atol": self.atol, "seed": self.seed,
        }

    @property
    def seed(self) -> int:
        return self.source.seed

    @property
    def batch(self) -> "int | None":
        """The batch size: ``--batch-size``, else the device's default unless a whole ``--input-shape``
        gives one (then None: the shape's own)."""
        if self.batch_size is None and self.source.input_shape is None:
            return _DEFAULTS[self.device.type][0]
        return self.batch_size


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

    from ..inputs import InputSpec, as_args, make_input, randomize_bn

    prep = prepare(source, st.source, batch_size=st.batch)
    src, spec = prep.origin, prep.spec
    original = prep.model.to(torch.float32)
    notes = list(src.notes)
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

    from .fuse import fuse
    from .options import FuseOptions
    from ..inputs import InputSpec, as_args, make_input

    probe = InputSpec((1, *prep.spec.shape[1:]), prep.spec.kind)
    return fuse(prep.original, as_args(make_input(probe, dtype=torch.float32, seed=st.seed)),
                FuseOptions(st.rtol, st.atol, st.passes))


def _reference(prep: _Prepared, args32: tuple[Any, ...], st: _Settings) -> Any:
    """The original's output in float64 on the benchmark's device: made before the models are cast
    (a float64 copy of a float16 model would hold rounded weights) and dropped before the timing."""
    import copy

    import torch

    ref_model = copy.deepcopy(prep.original).to(device=st.device, dtype=torch.float64)
    ref_args = tuple(cast_floats(a, torch.float64) for a in args32)
    with torch.inference_mode():
        ref = ref_model(*ref_args)
    del ref_model, ref_args
    return ref


def _place(prep: _Prepared, result: "FuseResult", st: _Settings) -> None:
    """Both models cast in place to the benchmark's dtype, device and memory format."""
    for m in (prep.original, result.model):
        m.to(device=st.device, dtype=st.dtype)
        fmt = memory_format(prep.spec, st.channels_last)
        if fmt is not None:
            m.to(memory_format=fmt)


def _judge(prep: _Prepared, result: "FuseResult", runners: tuple[Any, Any], ref: Any, args: tuple[Any, ...],
           st: _Settings) -> "Verdict":
    """Stage 5: both programs as raced (runtime, device, dtype, autocast) against the original in
    float64 on that device; the fused one must be within the allowance of the original's own error."""
    import torch

    from ..checks import OutputCheck, Tolerance, Verdict
    from ..precision import autocast, precision_flags

    run_orig, run_fused = runners
    runtime = getattr(torch, st.autocast) if st.autocast else st.dtype
    tol = Tolerance.for_dtype(runtime, st.rtol, st.atol)
    check = OutputCheck(tol, reference="float64")
    with torch.inference_mode(), autocast(st.device, st.autocast):
        orig = first_call(lambda: run_orig(*args), prep.source, st.compile)
        fused = first_call(lambda: run_fused(*args), prep.source, st.compile)
    check.add(ref, fused, orig)
    if not _finite(orig):
        prep.notes.append(f"the original model's own output is not finite in {str(st.dtype).replace('torch.', '')}: "
                          "the check cannot pass; try float32 or real weights")
    outputs = dict(result.verdict.outputs)
    outputs[DEVICE_RUN] = check
    name = str(runtime).replace("torch.", "")
    where = "" if st.runtime == "eager" else f" in {st.runtime}"
    return Verdict(tol, outputs, result.verdict.sites, precision_flags(st.device, st.autocast, st.dtype),
                   basis=f"fold sites in float64; the fold on the CPU in float32; the {name} run{where} on "
                         f"{st.device} against the original in float64 there")


def _bench_one(source: str, st: _Settings) -> ModelBench:
    """Prepare, fold through :func:`bnfuse_cli.fuse`, place, build the runtime, judge, time, report."""
    import torch

    from ..inputs import as_args, make_input

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
    fmt = memory_format(prep.spec, st.channels_last)
    args32 = as_args(to_memory_format(make_input(prep.spec, dtype=torch.float32, device=st.device, seed=st.seed),
                                       fmt))
    args = tuple(cast_floats(a, st.dtype) for a in args32)
    ref = _reference(prep, args32, st)
    _place(prep, result, st)
    if st.runtime != "eager":
        tick(f"exporting for {st.runtime}", 0)
    # compiled runners and exported programs are made from the cast modules
    run_orig, run_fused, graph_ops = programs(prep, result, args, st)
    check = _judge(prep, result, (run_orig, run_fused), ref, args, st)
    del ref
    before = st.meter.others() if st.meter is not None else None
    times = race((lambda: run_orig(*args), lambda: run_fused(*args)), st, tick, prep.notes)
    contention = None if st.meter is None else Contention(st.meter.cpus, st.race_threads, before, st.meter.others())
    tick("done", total)
    bench_result = ModelBench(
        model=source, arch=prep.src.arch, weights=prep.src.weights, input=prep.spec,
        bn_found=len(plan.norms), bn_folded=len(plan.folded_norms), bn_left=[(s.norm, s.reason) for s in plan.skipped],
        check=check, original_ms=times[0], fused_ms=times[1], calls_per_sample=times[2], warmup=st.warmup,
        fold_seconds=fold_seconds, notes=prep.notes, runtime=st.runtime, graph_ops=graph_ops, contention=contention,
    )
    return bench_result


def _check_counts(*, iters: int, warmup: int, batch_size: "int | None", threads: "int | None",
                  budget: float) -> None:
    for name, value, low in (("--iters", iters, 1), ("--warmup", warmup, 0), ("--batch-size", batch_size, 1),
                             ("--threads", threads, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} {value}: must be at least {low}")
    if not (budget >= 0 and math.isfinite(budget)):
        raise UsageError(f"--time-budget {budget:g}: give seconds of timing per model, or 0 for no limit")


def _threads_for_the_load(st: _Settings, default: int) -> list[str]:
    """Start ``st``'s load meter and set torch's threads for the run: on the CPU ``--threads``, or
    ``default`` (torch's) or fewer, to leave the other work room (on CUDA one thread launches the
    kernels and competes; torch's threads are left as they are unless given).  The warnings the
    choice needs (none when it is torch's)."""
    import torch

    st.meter = LoadMeter()
    warnings: list[str] = []
    if st.device.type == "cpu":
        st.race_threads, why = choose_threads(st.threads, default, st.meter.cpus, st.meter.others())
        warnings += [why] if why else []
    torch.set_num_threads(st.race_threads if st.device.type == "cpu" else st.threads or default)
    return warnings


def bench(models: "Sequence[str] | None" = None, settings: "BenchSettings | None" = None,
          source_options: "SourceOptions | None" = None, *, progress: "ProgressFn | None" = None,
          **keywords: Any) -> BenchReport:
    """Time each model and its fused copy, alternating, and judge the fused model.

    ``models`` are torchvision names, ``timm:NAME``, ``pkg.mod:factory`` or checkpoint files
    (default: :data:`DEFAULT_MODELS`), loaded with ``source_options`` (a :class:`SourceOptions`:
    ``arch``, ``weights``, ``input_shape``, ``allow_pickle``, ``key``, ``seed``); ``settings``
    (:class:`BenchSettings`) say how they are timed and fused, and ``progress(description, done,
    total)`` hears how far it is.
    Without ``source_options`` the models get random weights (``weights="none"``, so bench runs offline);
    ``SourceOptions`` takes its own ``weights`` default (``"default"``): pass ``weights="none"`` to keep
    them random.  A model with random weights gets random BatchNorm statistics first.  The fold runs on
    the CPU in float32 through :func:`bnfuse_cli.fuse` (statistics in float64); both models are
    then cast to ``dtype`` and moved to ``device``, and run under ``autocast`` (float16 or
    bfloat16) when given.  The verdict (``rtol``/``atol`` as in ``convert`` and ``verify``)
    holds at that precision: see :mod:`bnfuse_cli.checks`.  Each of ``iters`` timed pairs runs
    both models once (or a few times, for models faster than ``min_sample_ms``) after
    ``warmup`` untimed pairs; a model stops early after ``time_budget`` seconds of timing
    (None: the device default; 0: no limit), with at least 5 pairs.  ``threads`` sets
    torch's intra-op threads for the run only; without it, on the CPU, bench takes torch's choice or
    fewer, so that its threads and the work the load average shows beside it fit the CPUs this process
    may use (said in the report's ``warnings``).  The load is read before and after each model's timing:
    a model timed on a busy machine, or with more threads than usable CPUs, carries the flag
    (``ModelBench.contention``) and its verdict says so.

    ``runtime`` (:data:`RUNTIMES`) is what both models run in: ``eager`` (default), ``export``
    (torch.export programs, ``ep.module()``) or ``onnxruntime`` (ONNX graphs, both sessions at
    ``ORT_ENABLE_ALL`` with ``threads`` or torch's thread count as intra-op threads, on the CPU,
    float32; the report gives each graph's BatchNorm and conv nodes after onnxruntime's optimisation).
    ``settings.fuse`` makes the fused side: its passes' options (``horizontal``, ``unwrap``, ...) as
    in ``convert``.
    """
    import torch

    from ..checks import Tolerance
    from ..precision import check_autocast

    weights_given = source_options is not None or isinstance(settings, SourceOptions) or "weights" in keywords
    bs, opts = split_call(BenchSettings, settings, source_options, keywords, "bnfuse_cli.bench")
    if not weights_given:
        opts = replace(opts, weights="none")  # no source options given: random weights, runs offline
    device, dtype, autocast, batch_size, channels_last = bs.device, bs.dtype, bs.autocast, bs.batch_size, bs.channels_last
    threads, iters, warmup, time_budget, compile = bs.threads, bs.iters, bs.warmup, bs.time_budget, bs.compile
    runtime, rtol, atol, min_sample_ms = bs.runtime, bs.fuse.rtol, bs.fuse.atol, bs.min_sample_ms

    dt = parse_dtype(dtype)
    amp = check_autocast(autocast)
    dev = check_runtime(runtime, device=device, dtype=dt, autocast=amp, channels_last=channels_last,
                         compile=compile)
    Tolerance.for_dtype(dt, rtol, atol)  # refuses a bad tolerance before any model is built
    d_batch, d_iters, d_warmup, d_budget = _DEFAULTS[dev.type]
    iters = d_iters if iters is None else iters
    warmup = d_warmup if warmup is None else warmup
    budget = d_budget if time_budget is None else float(time_budget)
    _check_counts(iters=iters, warmup=warmup, batch_size=batch_size, threads=threads, budget=budget)
    if compile:
        warmup = max(warmup, 2)  # the first calls compile
    sources = list(models) if models else list(DEFAULT_MODELS)
    if opts.arch is not None and len(sources) > 1:
        raise UsageError("--arch applies to one checkpoint: bench one state_dict at a time with --arch")
    st = _Settings(device=dev, dtype=dt, autocast=amp, source=opts, batch_size=batch_size,
                   channels_last=channels_last, compile=compile, iters=iters, warmup=warmup, time_budget=budget,
                   min_sample_ms=min_sample_ms, rtol=rtol, atol=atol, progress=progress, threads=threads,
                   runtime=runtime, passes=dict(bs.fuse.resolved(names_reach_user=False).passes))

    old_threads = torch.get_num_threads()
    flags_before = backend_flags()
    warnings = _threads_for_the_load(st, old_threads)
    try:
        results = []
        for src in sources:
            results.append(_bench_one(src, st))
            if dev.type == "cuda":  # the last model's tensors are gone with _bench_one's frame
                torch.cuda.empty_cache()
        env = environment(dev)
        if runtime == "onnxruntime":
            import onnxruntime

            env["onnxruntime"] = onnxruntime.__version__
        if backend_flags() != flags_before:  # pragma: no cover - a model changed global flags
            results[-1].notes.append("backend flags (TF32/cudnn.benchmark) changed during the run")
    finally:
        torch.set_num_threads(old_threads)
    settings = st.to_dict()
    date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    warnings += [f"{r.model}: {r.contention.warning()}" for r in results if r.contended]
    return BenchReport(results=results, settings=settings, environment=env, date=date, warnings=warnings)

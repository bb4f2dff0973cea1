"""The race's clock and its conditions: CUDA events or ``perf_counter``, alternating timed pairs
with the garbage collector off, and the machine, threads and backend flags the times were taken under;
how busy the CPUs were (the load average against the CPUs this process may use), and a thread count
that does not compete with that load.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..version import __version__
from ..errors import BnfuseError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Timer", "race", "machine_info", "environment", "backend_flags", "compiled", "first_call", "load_average",
           "usable_cpus", "LoadMeter", "Contention", "choose_threads", "threads_text"]

#: runnable work beyond the usable CPUs that still counts as an idle machine: the load average moves
#: by a few tenths on a machine doing nothing
SLACK = 0.5
#: the time constant of the kernel's 1-minute load average, in seconds
_LOAD_TAU = 60.0


def load_average() -> "float | None":
    """The machine's 1-minute load average (runnable tasks, averaged), None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover - not Unix
        return None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (all of the machine's where the OS does not say)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class LoadMeter:
    """Reads how much work besides this process the machine runs: the load average (:func:`load_average`)
    less this process's own share of it, estimated from its CPU time averaged the way the kernel
    averages runnable tasks (a time constant of a minute), so a long bench does not count its own
    threads as a busy machine.  Work done before the meter was made is not counted as its own."""

    def __init__(self) -> None:
        self.cpus = usable_cpus()
        self._at, self._cpu, self._own = time.monotonic(), time.process_time(), 0.0

    def others(self) -> "float | None":
        """Runnable tasks of other processes, averaged over about the last minute (None: unknown)."""
        now, cpu = time.monotonic(), time.process_time()
        elapsed = now - self._at
        if elapsed > 0:
            decay = math.exp(-elapsed / _LOAD_TAU)
            self._own = self._own * decay + (cpu - self._cpu) / elapsed * (1 - decay)
        self._at, self._cpu = now, cpu
        load = load_average()
        return None if load is None else max(0.0, load - self._own)


def choose_threads(requested: "int | None", default: int, cpus: int, others: "float | None") -> "tuple[int, str | None]":
    """The intra-op threads to time with, and why when that is not ``default`` (torch's choice): what was
    ``requested`` (``--threads``), else no more than the CPUs the other work leaves free, at least 1."""
    if requested is not None:
        return requested, None
    room = math.floor(cpus + SLACK - (others or 0.0))
    chosen = max(1, min(default, room))
    if chosen == default:
        return chosen, None
    return chosen, (f"{threads_text(chosen)} instead of torch's {default}: other work runs {others:.1f} tasks on "
                    f"average (1-minute load average) on the {cpus} usable CPUs, and more threads would compete "
                    "with it; --threads N sets the number")


def threads_text(n: Any) -> str:
    """``1 thread``, ``4 threads``."""
    return f"{n} thread{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Contention:
    """How contended the CPUs were while a model was timed: the other work before and after its timing
    (:meth:`LoadMeter.others`), against the ``cpus`` this process may use and the ``threads`` bench
    timed with (1 on CUDA: the thread that launches the kernels)."""

    cpus: int
    threads: int
    before: "float | None"
    after: "float | None"

    @property
    def others(self) -> "float | None":
        known = [x for x in (self.before, self.after) if x is not None]
        return max(known) if known else None

    @property
    def busy(self) -> bool:
        """Other work and bench's threads together need more CPUs than there are: they take turns."""
        return self.others is not None and self.others + self.threads > self.cpus + SLACK

    @property
    def oversubscribed(self) -> bool:
        """bench's own threads are more than the usable CPUs: they take turns with each other."""
        return self.threads > self.cpus

    @property
    def contended(self) -> bool:
        return self.busy or self.oversubscribed

    def cause(self) -> "str | None":
        """What contended the CPUs, in a phrase (None: nothing known)."""
        if self.oversubscribed:
            return f"threads oversubscribed: {threads_text(self.threads)} on {self.cpus} usable CPUs"
        if self.busy:
            return (f"busy machine: other work ran {self.others:.1f} tasks on average (1-minute load average) beside "
                    f"bench's {threads_text(self.threads)} on {self.cpus} usable CPUs")
        return None

    def warning(self) -> "str | None":
        """What makes these times untrustworthy and what to do, in a sentence (None: nothing known)."""
        if self.oversubscribed:
            return (f"{self.cause()} take turns with each other, so the times measure the scheduler as much as the "
                    f"model; use --threads {self.cpus} or fewer")
        if self.busy:
            return f"{self.cause()}, so they took turns: the times and speedups are not trustworthy; rerun on an idle machine"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "threads": self.threads, "load_others_before": self.before,
                "load_others_after": self.after, "busy": self.busy, "oversubscribed": self.oversubscribed,
                "warning": self.warning()}


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
    cores = usable_cpus()

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


class Timer:
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


def environment(device: "torch.device") -> dict[str, Any]:
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
    env["backends"] = backend_flags()
    return env


def backend_flags() -> dict[str, Any]:
    import torch

    return {
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
    }


def compiled(model: "nn.Module", name: str) -> Any:
    import torch

    if not hasattr(torch, "compile"):
        raise UsageError(f"--compile: torch {torch.__version__} has no torch.compile; run without --compile")
    return torch.compile(model)


def first_call(fn: Callable[[], Any], name: str, compiled: bool) -> Any:
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


def race(calls_of: tuple[Callable[[], Any], Callable[[], Any]], st: Any, tick: Callable[[str, int], None],
         notes: list[str]) -> tuple[list[float], list[float], int]:
    """Warm-up, then timed pairs in alternating order, as ``st`` (the bench settings: device,
    autocast, warmup, iters, min_sample_ms, time_budget) says; returns both time lists and the
    calls per sample (the fastest of three probe calls decides it, so a sub-millisecond model is
    not timed at the clock's resolution)."""
    import gc

    import torch

    from ..precision import autocast

    call_orig, call_fused = calls_of
    timer = Timer(st.device)
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
                if (st.time_budget > 0 and 5 <= i + 1 < st.iters
                        and time.perf_counter() - started > st.time_budget):
                    notes.append(f"time budget of {st.time_budget:g} s reached after {i + 1} of {st.iters} pairs")
                    break
        finally:
            if gc_was_enabled:
                gc.enable()
    return orig_ms, fused_ms, calls

"""The one path from a model to a fused model: record, plan, fold, judge.

``convert``, ``bench`` and the Python API all fuse through :func:`fuse`; the judge
(:mod:`bnfuse_cli.checks`) decides whether the result is correct.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..checks import Comparison, Magnitude, OutputCheck, SelectionProbe, SiteProbe, Tolerance, Verdict, judge_post_processing
from ..errors import UsageError
from ..engine.analyse import analyse
from ..engine.plan import Plan, Skip
from ..inputs import as_args, infer_spec, make_input, model_dtype
from ..precision import exact_math, precision_flags
from .options import FuseOptions, from_keywords

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FuseResult", "FuseOptions", "fuse", "fuse_prepared", "plan"]


@dataclass
class FuseResult:
    """The fused model, what was folded, what was left and why, and the judge's verdict."""

    model: "nn.Module"
    plan: Plan
    #: the fused model against the original on the example input, and every fold site
    verdict: Verdict
    #: the model was in training mode and was switched to eval before folding
    switched_to_eval: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    #: the original's output on the example input (kept with ``keep_reference=True``, to judge an
    #: exported copy of the fused model against the original later)
    reference: Any = None

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    @property
    def error(self) -> Comparison:
        """Error of the fused model against the original on the example input."""
        return self.verdict.error

    @property
    def folds(self) -> list[Any]:
        return self.plan.folds

    @property
    def skipped(self) -> list[Skip]:
        return self.plan.skipped


def _example(model: "nn.Module", example_input: Any, seed: int = 0) -> tuple[Any, ...]:
    if example_input is None:
        dtype, device = model_dtype(model)
        example_input = make_input(infer_spec(model), dtype=dtype, device=device, seed=seed)
    return as_args(example_input)


def _copy(model: "nn.Module") -> "nn.Module":
    """A deep copy of ``model``, for ``fuse(..., inplace=False)``.

    A module with the old hook-based ``torch.nn.utils.weight_norm`` keeps its last computed
    ``weight`` as a plain attribute; computed with autograd on it is not a leaf and
    ``copy.deepcopy`` refuses it.  That attribute is derived (the hook recomputes it on every
    call), so it is refreshed once without autograd and the copy retried.
    """
    import copy

    import torch
    from torch.nn.utils.weight_norm import WeightNorm

    try:
        return copy.deepcopy(model)
    except RuntimeError as first:
        refreshed = False
        with torch.no_grad():
            for m in model.modules():
                for hook in m._forward_pre_hooks.values():
                    if isinstance(hook, WeightNorm):
                        setattr(m, hook.name, hook.compute_weight(m))
                        refreshed = True
        if refreshed:
            try:
                return copy.deepcopy(model)
            except RuntimeError:
                pass
        raise UsageError(
            f"cannot copy {type(model).__name__} to fuse a copy of it ({first}); "
            "pass inplace=True to fuse the model itself"
        ) from first


def plan(model: "nn.Module", example_input: Any = None, options: "FuseOptions | None" = None) -> Plan:
    """What :func:`fuse` would fold and what it would leave in one round, without changing ``model``.

    ``model`` is analysed in eval mode; its training flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        return analyse(model, _example(model, example_input), options=dict((options or FuseOptions()).passes)).plan
    finally:
        model.train(was_training)


def fuse(model: "nn.Module", example_input: Any = None, options: "FuseOptions | None" = None, *,
         inplace: bool = False, **keywords: Any) -> FuseResult:
    """Fold every BatchNorm of ``model`` that can be folded exactly, make every other rewrite of the
    table of passes that is on (merge each sum of parallel branches into one conv, ...), and judge
    the result.

    ``example_input`` is a tensor, or a tuple of positional arguments (anything else, such as
    the list of images a torchvision detection model takes, is one argument); without it a
    seeded random input of an inferred shape is used.  The pairs are found from one recorded
    forward pass on it, whose output is kept as the reference, and a crop of the activation
    reaching each fold site is kept for the per-site check.  The recording and the check run
    with TF32 switched off (restored after), so the verdict does not depend on it.
    ``options`` (:class:`~bnfuse_cli.workflows.options.FuseOptions`): the tolerances of the check
    (by the model's dtype unless given) and the passes' options by name (``passes={"unwrap":
    True}``; ``bnfuse convert --help`` lists them).  With ``inplace=False`` (the default) the
    caller's model is left untouched.  Always use the result's ``model``: a sum of branches in the
    model's own forward is merged by rewriting that forward, so the fused model is then a new root
    module (a ``GraphModule``).  The result's ``ok`` is the verdict; nothing is raised for a
    negative one.  The keywords of bnfuse 0.1 (``rtol=``, ``merge=``, ``unwrap=``, ...) still work,
    with a DeprecationWarning.
    """
    opts = from_keywords(FuseOptions, options, keywords, "bnfuse_cli.fuse")
    dtype, device = model_dtype(model)
    Tolerance.for_dtype(dtype, opts.rtol, opts.atol)  # a bad tolerance is refused before the copy
    t0 = time.perf_counter()
    if not inplace:
        model = _copy(model)
    switched = model.training
    model.eval()
    args = _example(model, example_input)
    copied = time.perf_counter() - t0
    result = _fuse(model, args, dtype, device, opts)
    result.switched_to_eval = switched
    result.seconds = {"copy": copied, **result.seconds}
    return result


def fuse_prepared(prep: Any, options: "FuseOptions | None" = None) -> FuseResult:
    """:func:`fuse` of a :class:`~bnfuse_cli.workflows.source.Prepared` source, in place, on the
    example input, dtype and device it was prepared with (``convert``'s way in)."""
    return _fuse(prep.model, prep.args, prep.dtype, prep.device, options or FuseOptions())


def _fuse(model: "nn.Module", args: tuple[Any, ...], dtype: Any, device: Any, opts: "FuseOptions") -> FuseResult:
    """The pipeline on a model in eval mode: rounds of record, plan and rewrite, then the verdict."""
    import torch

    tol = Tolerance.for_dtype(dtype, opts.rtol, opts.atol)
    with exact_math():
        magnitude = Magnitude()
        model, plan, reference, sites, seconds, before = _rounds(model, args, dict(opts.passes), magnitude)
        _give_back_freed_memory()
        t3 = time.perf_counter()
        with torch.no_grad(), SelectionProbe() as after:
            fused_out = model(*args)
        flags = precision_flags(device, dtype=dtype)
    magnitude.see(reference)
    check = OutputCheck(tol, reference="original")
    check.add(reference, fused_out, floor=magnitude.floor(dtype))
    outputs = {"example input": check}
    pre = None
    if before:  # the model post-processes: the tensors that feed it are judged too
        pre = OutputCheck(tol, reference="original")
        pre.add(before, after.kept)
    judge_post_processing(outputs, "example input", pre)
    kept = reference if opts.keep_reference else None
    del reference, fused_out, before, after
    verdict = Verdict(
        tol, outputs, sites, flags,
        basis=f"the original's own output in {str(dtype).replace('torch.', '')} on {device.type}, TF32 off",
    )
    t4 = time.perf_counter()
    return FuseResult(
        model=model, plan=plan, verdict=verdict, reference=kept,
        seconds={"analyse": seconds["analyse"], "rewrite": seconds["rewrite"], "check": t4 - t3 + seconds["check"]},
    )


def _give_back_freed_memory() -> None:
    """Hand the heap pages the recording runs and the site checks freed back to the system before the
    checking forward pass.  glibc keeps freed memory in its heap, and the recorder's small objects,
    allocated between a forward pass's large activations, pin that free space: the next forward
    would grow on top of it (``docs/measured/bench_memory.md``: the fold's peak beyond one forward
    pass of regnet_y_32gf).  ``malloc_trim`` is glibc's; elsewhere this does nothing."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


#: at most this many rounds: a merge can leave a BatchNorm after the merged conv (RepViT's
#: ``bn(conv(x) + conv1(x) + x)``) that the next round folds
MAX_ROUNDS = 4


def _rounds(model: "nn.Module", args: tuple[Any, ...], options: "dict[str, Any]", magnitude: "Magnitude"
            ) -> "tuple[nn.Module, Plan, Any, list[Any], dict[str, float], list[Any]]":
    """Record, plan and apply each pass of the table until a round finds nothing for a pass that
    can make more possible (``Pass.again``); each round's sites are checked right after it.
    Returns the fused model (a new root when a pass rewrote the model's own forward), the combined
    plan, the original output, the site checks, timings, and the tensors that fed the original's
    post-processing (:class:`SelectionProbe`; none for most).  ``magnitude`` sees the original's
    activations in the first round."""
    import contextlib

    from ..engine.passes import PASSES

    plan = Plan()
    sites: list[Any] = []
    seconds = {"analyse": 0.0, "rewrite": 0.0, "check": 0.0}
    reference = None
    before: list[Any] = []
    for round_no in range(MAX_ROUNDS):
        t0 = time.perf_counter()
        probe = SiteProbe()
        with SelectionProbe() if reference is None else contextlib.nullcontext() as selection:
            with magnitude.hooks(model) if reference is None else contextlib.nullcontext():
                analysis = analyse(model, args, on_input=probe.capture, options=options)
        if reference is None:
            before = selection.kept
        step = analysis.plan
        if reference is None:
            reference, plan.norms = analysis.output, list(step.norms)
        del analysis.output
        probe.plan(model, step)
        _give_back_freed_memory()  # the recording's freed heap, before the judge's own run of the original
        probe.watch(model, args)
        probe.reference(model)
        t1 = time.perf_counter()
        for p in PASSES:
            if step.of(p.name):
                model = p.apply(model, step.of(p.name)) or model
        t2 = time.perf_counter()
        sites += probe.check(model)
        probe.release()  # its crops and references, before the checking forward pass
        seconds["analyse"] += t1 - t0
        seconds["rewrite"] += t2 - t1
        seconds["check"] += time.perf_counter() - t2
        plan.add_round(step)
        if not (step.more or any(p.again and step.of(p.name) for p in PASSES)):
            break
    return model, plan, reference, sites, seconds, before

"""``convert``: load a model, fold its BatchNorms in place, check the outputs, write the result."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..version import __version__
from ..files.write import check_output_path, write_checkpoint
from ..checks import Comparison, Verdict
from ..errors import FoldError, OutputError, UsageError
from .fuse import fuse_prepared
from .options import ConvertOptions, FuseOptions, split_call
from .source import Prepared, SourceOptions, count_tensors, prepare
from ..engine.analyse import analyse
from ..engine.plan import Plan
from ..inputs import InputSpec
from ..files.meta import FusedMeta, steps_of
from ..files.table import FORMATS, output_format, suffixes_text

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ConvertReport", "InspectReport", "convert", "inspect", "outputs_for"]


@dataclass
class ConvertReport:
    """Everything ``bnfuse convert`` prints, as data (``to_dict`` for --json)."""

    source: str
    output: "str | None"
    arch: "str | None"
    weights: str
    input: InputSpec
    dtype: str
    plan: Plan
    params_before: int = 0
    params_after: int = 0
    buffers_before: int = 0
    buffers_after: int = 0
    file_size: int = 0
    form: str = "state_dict"
    #: the judge's verdict on the fused model (None until checked)
    verdict: "Verdict | None" = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def error(self) -> "Comparison | None":
        return None if self.verdict is None else self.verdict.error

    @property
    def tolerance(self) -> float:
        """The relative tolerance (``rtol``) the check used."""
        return 0.0 if self.verdict is None else self.verdict.tolerance.rtol

    @property
    def removed(self) -> int:
        return (self.params_before + self.buffers_before) - (self.params_after + self.buffers_after)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "arch": self.arch,
            "weights": self.weights,
            "input": self.input.to_dict(),
            "dtype": self.dtype,
            **self.plan.to_dict(),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "buffers_before": self.buffers_before,
            "buffers_after": self.buffers_after,
            "removed": self.removed,
            "form": self.form,
            "file_size": self.file_size,
            "max_abs_error": None if self.error is None else self.error.max_abs,
            "rel_error": None if self.error is None else self.error.rel,
            "tolerance": self.tolerance,
            "check": None if self.verdict is None else self.verdict.to_dict(),
            "seconds": self.seconds,
            "notes": self.notes,
            "bnfuse_version": __version__,
        }


@dataclass
class InspectReport:
    """What would fold and what would not, and why (``bnfuse inspect``); nothing changed or written."""

    source: str
    arch: "str | None"
    input: InputSpec
    plan: Plan

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "arch": self.arch,
            "input": self.input.to_dict(),
            **self.plan.to_dict(),
            "bnfuse_version": __version__,
        }


def inspect(source: "str | os.PathLike[str] | Prepared", source_options: "SourceOptions | None" = None,
            options: "FuseOptions | None" = None, **keywords: Any) -> InspectReport:
    """The fold plan for ``source`` (its first round) without changing or writing anything.
    ``source_options`` say how to load it; ``options`` which passes are on."""
    options, source_options = split_call(FuseOptions, options, source_options, keywords, "bnfuse_cli.inspect")
    prep = prepare(source, source_options)
    plan = analyse(prep.model, prep.args, options=options.resolved(names_reach_user=True).passes).plan
    return InspectReport(prep.name, prep.arch, prep.spec, plan)


def outputs_for(sources: "list[str]", output: "str | os.PathLike[str] | None", out_dir: "str | os.PathLike[str] | None",
                suffix: str = ".pth") -> "list[Path | None]":
    """One output path per source: ``output`` for a single source, ``out_dir/<stem>.fused<suffix>``
    for several; None (check only) when neither is given for a single source."""
    if not sources:
        raise UsageError("give at least one source: a model name or a checkpoint file")
    if len(sources) > 1 and out_dir is None:
        raise UsageError("several sources need --out-dir DIR (one output per source) instead of -o")
    if output is not None and out_dir is not None:
        raise UsageError("give either -o/--output or --out-dir, not both")
    if not any(suffix.lower() in f.written for f in FORMATS):
        raise UsageError(f"--suffix {suffix!r}: use {suffixes_text()}")
    if out_dir is None:
        return [Path(output) if output is not None else None]
    if not Path(out_dir).is_dir():
        raise OutputError(f"--out-dir {out_dir} does not exist or is not a directory")
    dests = [Path(out_dir) / (Path(s).stem.replace(".", "_") + ".fused" + suffix) for s in sources]
    clash = next((d for d in dests if dests.count(d) > 1), None)
    if clash is not None:
        raise UsageError(f"two sources would both be written to {clash}: convert them in separate calls")
    return dests


def convert(source: "str | os.PathLike[str] | Prepared", output: "str | os.PathLike[str] | None" = None,
            options: "ConvertOptions | None" = None, source_options: "SourceOptions | None" = None, *,
            placed: "list[Path] | None" = None, **keywords: Any) -> ConvertReport:
    """Fold every foldable BatchNorm of ``source`` and write the fused model to ``output``.

    ``source`` is a model name or a checkpoint, loaded with ``source_options``
    (:class:`SourceOptions`: ``arch``, ``weights``, ``input_shape``, ``allow_pickle``, ``key``,
    ``seed``), or a source already :func:`prepared <bnfuse_cli.workflows.source.prepare>`.
    The model is fused in place through the one pipeline of :mod:`bnfuse_cli.workflows.fuse`
    (no copy of the model is made) and judged by :mod:`bnfuse_cli.checks`: every fold site on the
    activation that reaches it, and the output on a seeded random input, within
    ``atol + rtol * max|output|`` (``options.fuse``; defaults by dtype).  The seed draws the example
    input and, for a model name with ``weights="none"``, its random initialisation (recorded in the
    file, so ``verify`` rebuilds the same model).  Nothing is written when the verdict is negative
    (:class:`FoldError`).  ``output=None`` folds and checks without writing.  ``placed``, when
    given, gets the output appended the moment it is in place (see
    :func:`bnfuse_cli.files.write.write_checkpoint`).  An output whose format is a program (``.pt2``,
    ``.onnx``: :data:`bnfuse_cli.files.table.FORMATS`) is exported from the fused model and
    runs without bnfuse or the model's code; it is opened in its own runtime and judged against the
    original before it is placed.  ``options`` (:class:`ConvertOptions`): ``save_as``, ``force``,
    ``verbose`` (the exporter's messages) and the fuse options, the passes' among them.
    """
    t0 = time.perf_counter()
    if "tolerance" in keywords:  # bnfuse 0.1's alias of rtol
        keywords["rtol"] = _rtol(keywords.get("rtol"), keywords.pop("tolerance"))
    opts, src_opts = split_call(ConvertOptions, options, source_options, keywords, "bnfuse_cli.convert")
    out_path = Path(output) if output is not None else None
    given = source.path if isinstance(source, Prepared) else source
    _check_options(given, out_path, opts)
    prep = prepare(source, src_opts)
    form = _output_form(prep, out_path, opts.save_as)
    t1 = time.perf_counter()
    fmt = output_format(out_path) if out_path is not None else None
    program = bool(fmt and fmt.program)
    result = fuse_prepared(prep, replace(opts.fuse.resolved(names_reach_user=not program), keep_reference=program))
    t4 = time.perf_counter()
    report = _report(prep, out_path, result)
    report.notes += _defaults_taken(opts.fuse, result.plan, out_path) if program else []
    if not result.ok:
        raise FoldError(
            "the fused model does not compute what the original computes "
            f"({'; '.join(result.verdict.summary(more='bnfuse_cli.fuse(...).verdict.reasons lists them all'))}); "
            "nothing was written. This is a bug in bnfuse or a model it does not understand: please report it "
            "with the model"
        )
    if out_path is not None and form is not None:
        report.form = form.replace("-", "_")
        judge = _ProgramJudge(fmt, result.reference, prep.args, report, verbose=opts.verbose) if fmt.program else None
        report.file_size = _write(result.model, prep, report, out_path, form, opts.force, placed, judge)
    t5 = time.perf_counter()
    fs = result.seconds
    report.seconds = {"load": t1 - t0, "analyse": fs["analyse"], "fold": fs["rewrite"], "check": fs["check"],
                      "save": t5 - t4, "total": t5 - t0}
    return report


def _defaults_taken(given: FuseOptions, plan: Any, out_path: Path) -> "list[str]":
    """A note for each pass that ran because an exported program's names do not reach the user."""
    return [f"{p.option.flag} is on by default for {out_path.suffix}: no name of the fused model reaches you "
            f"there ({len(plan.of(p.name))} {p.verb}); {p.option.flag.replace('--', '--no-', 1)} keeps its "
            "structure" for p in plan.passes
            if p.option is not None and p.option.default is None and p.option.name not in given.passes]


def _report(prep: Prepared, out_path: "Path | None", result: Any) -> ConvertReport:
    """The report of a fused ``prep``: counts before (from the source) and after (the model now)."""
    params_after, buffers_after = count_tensors(result.model)
    src = prep.origin
    notes = list(src.notes)
    if src.seed is not None:
        notes.append(f"random initialisation ({_random_init(prep.options.weights, src.arch)}) from seed {src.seed}: "
                     "no pretrained weights were loaded; the same name and --seed rebuild the same model")
    return ConvertReport(
        source=prep.name, output=str(out_path) if out_path else None, arch=prep.arch, weights=src.weights,
        input=prep.spec, dtype=prep.dtype_name, plan=result.plan,
        params_before=prep.params, params_after=params_after,
        buffers_before=prep.buffers, buffers_after=buffers_after, verdict=result.verdict, notes=notes,
    )


def _random_init(weights: str, arch: "str | None") -> str:
    """How a random initialisation came about: asked for, or the only one ``arch`` has."""
    if weights.strip().lower() == "none":
        return "--weights none"
    return f"its own: {arch} has no pretrained weights bnfuse can load, so --weights default means this"


def _rtol(rtol: "float | None", tolerance: "float | None") -> "float | None":
    """``tolerance`` is bnfuse 0.1's alias of ``rtol``."""
    if tolerance is None:
        return rtol
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise UsageError(f"--tolerance {tolerance}: give a finite number >= 0 (it is an alias of --rtol)")
    if rtol is not None and rtol != tolerance:
        raise UsageError(f"--tolerance {tolerance:g} is an alias of --rtol, which is {rtol:g}: give one of them")
    return tolerance


def _check_options(source: Any, out_path: "Path | None", opts: ConvertOptions) -> None:
    """Every option that can be checked without the model, before any work (the options objects
    checked themselves when they were made)."""
    save_as = opts.save_as
    if out_path is not None:
        fmt = output_format(out_path)
        if save_as == "module" and not fmt.holds_module:
            raise UsageError(f"--save-as module needs a .pth output: {out_path.suffix} cannot hold a pickled module "
                             f"({out_path})")
        if save_as is not None and fmt.program:
            raise UsageError(f"--save-as does not apply to {out_path.suffix}: it is a program exported from the "
                             f"fused model ({out_path})")
        if fmt.require is not None:
            fmt.require()
        check_output_path(out_path, inputs=[Path(str(source))], force=opts.force)


def _output_form(prep: Prepared, out_path: "Path | None", save_as: "str | None") -> "str | None":
    """``module`` or ``state-dict``: mirror the input (a pickled module stays one, except in
    .safetensors, which holds tensors only).  Checked before the work, not after."""
    if out_path is None:
        return None
    fmt = output_format(out_path)
    if fmt.program:
        return "program"
    form = save_as or ("module" if prep.origin.kind == "module" and fmt.holds_module else "state-dict")
    if form == "state-dict" and not prep.arch:
        raise UsageError(
            f"{prep.name} is a pickled module of unknown architecture: a state_dict output ({out_path.name}) "
            "could not be rebuilt; pass --arch, or write a .pth with --save-as module"
        )
    return form


def _write(model: "nn.Module", prep: Prepared, report: ConvertReport, out_path: Path, form: str, force: bool,
           placed: "list[Path] | None", judge: "_ProgramJudge | None") -> int:
    """Write the fused model with the record that rebuilds it (a fused source's own rounds first:
    converting a bnfuse output again keeps the folds and merges that made it); the file's size."""
    src = prep.origin
    earlier = src.meta.steps if src.meta is not None else []
    meta = FusedMeta(
        arch=src.arch, steps=earlier + steps_of(report.plan), arch_kwargs=src.meta.arch_kwargs if src.meta else {},
        input=report.input.to_dict(), dtype=report.dtype, source=report.source, version=__version__, seed=src.seed,
    )
    program = None
    if judge is not None:  # exported before any file is opened: a model that cannot be exported leaves nothing
        program = judge.export(model, meta.to_dict())
    return write_checkpoint(out_path, state_dict=model.state_dict(), metadata=meta.to_dict(),
                            module=model if form == "module" else None, program=program, force=force,
                            placed=placed, prove=judge)


class _ProgramJudge:
    """Exports the fused model in a program format of the output table, and judges the exported file
    in its own runtime against the original before it is placed: the same allowance and report fields
    as the fused model itself."""

    def __init__(self, fmt: Any, reference: Any, args: tuple[Any, ...], report: ConvertReport, *,
                 verbose: bool) -> None:
        self.fmt, self.reference, self.args, self.report, self.verbose = fmt, reference, args, report, verbose

    def export(self, model: "nn.Module", metadata: dict[str, Any]) -> bytes:
        data, dims = self.fmt.export(model, self.args, metadata, verbose=self.verbose)
        self.report.notes += [f"exported for {self.fmt.runtime}: {d}" for d in dims]
        return data

    def __call__(self, tmp: Path) -> None:
        """Open ``tmp`` in its runtime and judge its output on the example input."""
        import torch

        from ..checks import OutputCheck
        from ..precision import exact_math

        verdict, label = self.report.verdict, f"read back: {self.fmt.runtime}"
        program, _ = self.fmt.open(tmp, "cpu")
        with exact_math(), torch.no_grad():
            out = program(*self.args)
        del program
        check = verdict.outputs[label] = OutputCheck(verdict.tolerance, reference="original")
        check.add(self.reference, out)
        sites = sum(s.skipped is None for s in verdict.sites)
        self.report.notes.append(
            f"the {Path(str(self.report.output)).suffix} file, opened in {self.fmt.runtime}, was judged against "
            f"the original on the example input; it holds the fused weights under their layer names, so the "
            f"{sites} fold site(s) checked are its own")
        if not check.ok:
            raise FoldError(
                f"{self.report.output}: the exported program does not compute what the original computes "
                f"({check.reason(label)}); nothing was written")

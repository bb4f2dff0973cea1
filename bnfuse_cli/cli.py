"""The ``bnfuse`` command: Typer only.

Each command checks its options, calls one library workflow, and renders the report it returns
(:mod:`bnfuse_cli.render`).  Results go to stdout (or, with ``--json -``, the JSON does and the
tables go to stderr); notes, progress and errors go to stderr.  Exit codes live in
``EXIT_CODES`` below.  Nothing here imports torch at module level, so ``bnfuse --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import inspect as _inspect
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

from .engine.passes import options as pass_options
from .errors import BnfuseError, DeviceError, OutputError, UnsafeCheckpointError, UsageError
from .files.table import suffixes_text
from .version import __version__

app = typer.Typer(
    name="bnfuse",
    help="Fold BatchNorm into Conv/Linear layers of PyTorch checkpoints, exactly, and prove it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's help: paragraphs wrapped to the terminal, flags shown as flags
)
out = Console()
err = Console(stderr=True)

#: exit codes, most specific first.  1 is reserved for "checked and found different/slower".
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UnsafeCheckpointError, 2),
    (DeviceError, 2),
    (OutputError, 2),
    (UsageError, 2),
    (BnfuseError, 2),
    (KeyboardInterrupt, 130),
)
EXIT_CHECK_FAILED = 1


def _run(fn: Callable[[list[Path]], Any]) -> Any:
    """Call ``fn(placed)`` and turn a bnfuse error into a message and an exit code (no traceback).

    ``placed`` is the list the files layer appends each output to the moment it is in place, so an
    interrupt's message names exactly what was written."""
    placed: list[Path] = []
    try:
        return fn(placed)
    except tuple(cls for cls, _ in EXIT_CODES) as exc:
        code = next(c for cls, c in EXIT_CODES if isinstance(exc, cls))
        if isinstance(exc, KeyboardInterrupt):
            if placed:  # exact even when the interrupt came mid-rename
                names = ", ".join(str(p) for p in placed)
                err.print(f"[red]interrupted[/red] after writing {names} (complete and checked); a model "
                          "file still being written was not placed", highlight=False, soft_wrap=True)
            else:
                err.print("[red]interrupted[/red]: nothing was written")
        else:
            err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None


@contextlib.contextmanager
def _library_output_to_stderr() -> Iterator[None]:
    """Whatever a library prints while a workflow runs (torch hub's ``Downloading: ...``) is a
    diagnostic: it goes to stderr, so stdout carries nothing but results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _check_report_path(option: str, path: "Path | None") -> None:
    """Refuse a ``--json``/``--markdown`` path that cannot be written, before any work."""
    if path is None or str(path) == "-":
        return
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory: give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{option} {path}: the folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{option} {path}: the folder {folder} is not writable; choose another path")


def _results(json_path: "Path | None") -> Console:
    """Where tables go: stdout, or stderr when ``--json -`` claims stdout for the JSON."""
    return err if json_path is not None and str(json_path) == "-" else out


def _fit_width(console: Console) -> "int | None":
    """The width tables must fit: a terminal's, or an explicit narrow ``COLUMNS`` (below
    :data:`~bnfuse_cli.render.NARROW`: the stacked layouts); None where the output goes to a file,
    a pipe or a CI log, which has no width: tables print at their natural width there, never squeezed
    (rich's 80-column default would split cells such as ``resn|et18``)."""
    from .render import NARROW

    if console.is_terminal:
        return console.width
    columns = os.environ.get("COLUMNS", "").strip()
    return int(columns) if columns.isdigit() and int(columns) < NARROW else None


class _AtWidth:
    """A renderable drawn at ``width`` columns, wider than the console if need be."""

    def __init__(self, renderable: Any, width: int) -> None:
        self.renderable, self.width = renderable, width

    def __rich_console__(self, console: Console, options: Any) -> Any:
        yield from console.render(self.renderable, options.update_width(self.width))


def _show(console: Console, *renderables: Any) -> None:
    """Print tables so that no cell is split: within :func:`_fit_width`, or at their natural width."""
    from rich.measure import Measurement

    for renderable in renderables:
        if _fit_width(console) is None:
            natural = Measurement.get(console, console.options.update_width(10_000), renderable).maximum
            if natural > console.width:
                console.print(_AtWidth(renderable, natural), crop=False)
                continue
        console.print(renderable)


def _write_report(option: str, path: "Path | None", text: str, placed: list[Path]) -> None:
    """The report to a file (whole or not at all), or to stdout for ``-``."""
    if path is None:
        return
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from .files.write import write_text  # the files layer's atomic writer (no torch)

    write_text(path, text, placed=placed)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"


def _note(text: str) -> None:
    err.print(f"[yellow]note:[/yellow] {escape(text)}", highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"bnfuse {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """Fold BatchNorm into Conv/Linear layers of PyTorch checkpoints, exactly, and prove it."""


# ----------------------------------------------------------------------------- help and the table's flags


class Command(TyperCommand):
    """A command whose help names its arguments as a person writes them (``SOURCE...``, ``ORIG
    FUSED``), in the usage line and in its own paragraph, and leaves their types out."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                name = p.metavar or p.name.upper()
                pieces.append(name if p.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args = [(p.metavar or p.name.upper(), getattr(p, "help", "") or "") for p in self.get_params(ctx)
                if p.param_type_name == "argument"]
        opts = [r for p in self.get_params(ctx) if p.param_type_name == "option" and (r := p.get_help_record(ctx))]
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        if opts:
            with formatter.section("Options"):
                formatter.write_dl(opts)


class _WithPassOptions:
    """A command that gains one flag per option of the table of passes (``--unwrap``, ``--no-merge``,
    ...: :func:`bnfuse_cli.engine.passes.options`), read from the table whenever the CLI is built, so
    a pass added to the table is a flag at once.  The command gets them as ``passes``, by name."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn

    @property
    def __signature__(self) -> _inspect.Signature:
        sig = _inspect.signature(self.fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "passes"]
        flags = [
            _inspect.Parameter(o.name, _inspect.Parameter.KEYWORD_ONLY, default=o.default, annotation=Annotated[
                Optional[bool], typer.Option(o.flag if o.default is False else f"{o.flag}/--no-{o.flag[2:]}",
                                             help=o.help, show_default=o.default is not None)])
            for o in pass_options()]
        return sig.replace(parameters=own + flags)

    def __call__(self, **kwargs: Any) -> Any:
        names = {o.name for o in pass_options()}
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        return self.fn(**kwargs, passes={k: v for k, v in given.items() if v is not None})


def _command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``fn`` as a command with person-readable help; the flags of the passes' options too
    when it takes ``passes``."""
    target = _WithPassOptions(fn) if "passes" in _inspect.signature(fn).parameters else fn
    app.command(cls=Command)(target)
    return fn


# ----------------------------------------------------------------------------- shared options

#: what a SOURCE can be, for every command's help
SOURCE_FORMS = ("a torchvision model name (resnet50), timm:NAME (the timm extra), package.module:factory (your "
                "own code), or a checkpoint file (.pth, .pt, .bin, .ckpt, .tar or .safetensors; a state_dict, a "
                "training checkpoint, a TorchScript or pickled module)")

ArchOpt = Annotated[Optional[str], typer.Option("--arch", metavar="NAME", help="Architecture for a state_dict: torchvision name, timm:NAME or package.module:factory.")]
WeightsOpt = Annotated[str, typer.Option("--weights", metavar="WEIGHTS", help="For a model name: default (its pretrained weights, or its own initialisation when it has none), a torchvision weights name, none (random), or a state_dict file.")]
ShapeOpt = Annotated[Optional[str], typer.Option("--input-shape", metavar="N,C,H,W", help="Input shape for the checks, e.g. 1,3,224,224 (default: inferred from the model).")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow full unpickling (runs code from the file): only for files you trust.")]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="INT", help="Seed of the random weights of a model name with --weights none (the same name and seed give the same model) and of the first random input.")]
KeyOpt = Annotated[Optional[str], typer.Option("--key", metavar="PATH", help="Where the weights are in a checkpoint that holds several, as a dotted path (for example model_state or ema.model).", show_default=False)]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", metavar="FILE", help="Also write the report as JSON to this file (- for stdout: the tables then go to stderr).", dir_okay=False)]
RtolOpt = Annotated[Optional[float], typer.Option("--rtol", metavar="X", help="Relative tolerance, of each output's largest magnitude, on top of the original's own error at this precision (default by dtype: 1e-4 for float32).", show_default=False)]
AtolOpt = Annotated[Optional[float], typer.Option("--atol", metavar="X", help="Absolute tolerance (default by dtype: 1e-6 for float32).", show_default=False)]
AutocastOpt = Annotated[Optional[str], typer.Option("--autocast", metavar="DTYPE", help="Run both models under torch.autocast: float16 or bfloat16 (mixed precision as deployed with AMP).", show_default=False)]


def _source_options(**given: Any) -> Any:
    from .workflows.source import SourceOptions

    return SourceOptions(**given)


# ----------------------------------------------------------------------------- commands


@_command
def convert(
    sources: Annotated[list[str], typer.Argument(metavar="SOURCE...", help=f"What to convert: {SOURCE_FORMS}.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="FILE", help=f"Output file: {suffixes_text()} (see the formats in the README).", dir_okay=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", metavar="DIR", help="Output directory, for several sources.", file_okay=False)] = None,
    suffix: Annotated[str, typer.Option("--suffix", metavar="SUFFIX", help=f"With --out-dir: {suffixes_text()}.")] = ".pth",
    arch: ArchOpt = None,
    weights: WeightsOpt = "default",
    input_shape: ShapeOpt = None,
    save_as: Annotated[Optional[str], typer.Option("--save-as", metavar="FORM", help="For .pth: module or state-dict (default mirrors the input).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    allow_pickle: PickleOpt = False,
    key: KeyOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    tolerance: Annotated[Optional[float], typer.Option("--tolerance", hidden=True, show_default=False)] = None,
    seed: SeedOpt = 0,
    json_file: JsonOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every fold and every BatchNorm left.")] = False,
    passes: "dict[str, bool] | None" = None,
) -> None:
    """Fold every BatchNorm that can be folded and write the fused model.

    Loads SOURCE, switches it to eval, finds fold sites by recording one forward pass, folds in place, checks every fold site in float64 and the output against the original on a seeded random input, and writes the output (nothing is written if the check fails).
    """

    def run(placed: list[Path]) -> None:
        from .workflows.convert import _rtol, convert as convert_fn, outputs_for
        from .workflows.options import ConvertOptions, FuseOptions
        from .render import convert_table, plan_tables

        _check_report_path("--json", json_file)
        src = _source_options(arch=arch, weights=weights, input_shape=input_shape, allow_pickle=allow_pickle, key=key,
                              seed=seed)
        opts = ConvertOptions(FuseOptions(_rtol(rtol, tolerance), atol, passes or {}), save_as=save_as, force=force,
                              verbose=verbose)
        dests = outputs_for(sources, output, out_dir, suffix)
        res = _results(json_file)
        reports = []
        for source, dest in zip(sources, dests):
            with _library_output_to_stderr():
                r = convert_fn(source, dest, opts, src, placed=placed)
            _show(res, convert_table(r), *plan_tables(r.plan, verbose=verbose))
            for note in r.notes:
                _note(note)
            if dest is None:
                _note("no -o given: checked only, nothing written")
            reports.append(r.to_dict())
        _write_report("--json", json_file, _json(reports[0] if len(reports) == 1 else reports), placed)

    _run(run)


@_command
def inspect(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help=f"What to inspect: {SOURCE_FORMS}.", show_default=False)],
    arch: ArchOpt = None,
    weights: WeightsOpt = "default",
    input_shape: ShapeOpt = None,
    allow_pickle: PickleOpt = False,
    key: KeyOpt = None,
    json_file: JsonOpt = None,
    passes: "dict[str, bool] | None" = None,
) -> None:
    """Show what would fold and what would not, and why, without writing anything."""

    def run(placed: list[Path]) -> None:
        from .workflows.convert import inspect as inspect_fn
        from .workflows.options import FuseOptions
        from .render import inspect_line, plan_tables

        _check_report_path("--json", json_file)
        src = _source_options(arch=arch, weights=weights, input_shape=input_shape, allow_pickle=allow_pickle, key=key)
        with _library_output_to_stderr():
            r = inspect_fn(source, src, FuseOptions(passes=passes or {}))
        res = _results(json_file)
        res.print(inspect_line(r), highlight=False)
        _show(res, *plan_tables(r.plan, verbose=True))
        _write_report("--json", json_file, _json(r.to_dict()), placed)

    _run(run)


@_command
def verify(
    orig: Annotated[str, typer.Argument(metavar="ORIG", help=f"The original: {SOURCE_FORMS}.", show_default=False)],
    fused: Annotated[str, typer.Argument(metavar="FUSED", help="The fused model: a bnfuse output (any format it writes) or any checkpoint form.", show_default=False)],
    arch: ArchOpt = None,
    weights: WeightsOpt = "default",
    input_shape: ShapeOpt = None,
    samples: Annotated[int, typer.Option("--samples", metavar="N", min=0, help="Number of seeded random inputs.")] = 3,
    seed: Annotated[int, typer.Option("--seed", metavar="INT", help="Seed of the first random input, and of the random weights of an original given as a name with --weights none (a fused file that records its seed brings its own).")] = 0,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="cpu, cuda (or cuda:N), or auto: run both models there.")] = "cpu",
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="DTYPE", help="float32, float16 or bfloat16 for both models (default: as stored).", show_default=False)] = None,
    autocast: AutocastOpt = None,
    data: Annotated[Optional[Path], typer.Option("--data", metavar="FILE", help="Tensor file of real inputs: a tensor, {'inputs': T, 'labels': T} or (inputs, labels).", dir_okay=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", min=1, help="Inputs per forward pass with --data.")] = 256,
    allow_pickle: PickleOpt = False,
    key: KeyOpt = None,
    json_file: JsonOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List the BatchNorm layers removed and remaining.")] = False,
) -> None:
    """Check that FUSED computes what ORIG computes, and what changed in its structure.

    Runs both models on seeded random inputs (and on --data, with accuracy when it has labels) and reports max abs error, relative error, cosine similarity, top-1 agreement for classifier logits, the BatchNorm layers removed and both parameter counts, on --device in --dtype (and under --autocast), as deployed.

    Exit 0: every fold site named in FUSED's record matches in float64 and every output is within atol + rtol x max|ref| + 4 x the original's own error of the original run in float64; 1: they differ; 2: error. --arch applies to a file holding only a state_dict (without it, ORIG takes the architecture FUSED records); bnfuse outputs carry their own, and an --arch that disagrees with FUSED's record is exit 2.
    """

    def run(placed: list[Path]) -> Any:
        from .render import verify_table
        from .workflows.options import JudgeOptions
        from .workflows.verify import verify as verify_fn

        _check_report_path("--json", json_file)
        src = _source_options(arch=arch, weights=weights, input_shape=input_shape, allow_pickle=allow_pickle, key=key,
                              seed=seed)
        judge = JudgeOptions(samples=samples, rtol=rtol, atol=atol, data=data, batch_size=batch_size, device=device,
                             dtype=dtype, autocast=autocast)
        with _library_output_to_stderr():
            r = verify_fn(orig, fused, judge, src)
        res = _results(json_file)
        _show(res, verify_table(r, verbose=verbose))
        for note in r.notes:
            _note(note)
        _write_report("--json", json_file, _json(r.to_dict()), placed)
        if r.ok:
            res.print("[bold green]OK[/bold green]: the fused model matches the original within tolerance")
        else:
            res.print("[bold red]DIFFERENT[/bold red]: the fused model does not compute what the original computes "
                      "(exit 1): " + "; ".join(r.verdict.reasons if verbose else r.verdict.summary()),
                      highlight=False, soft_wrap=True)
        return r

    report = _run(run)
    if not report.ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


@_command
def bench(
    models: Annotated[Optional[list[str]], typer.Argument(
        metavar="SOURCE...", help=f"What to time: {SOURCE_FORMS} (default: resnet18 resnet50 mobilenet_v3_large "
                                  "efficientnet_b0 regnet_y_400mf).", show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="cpu, cuda (or cuda:N), or auto: CUDA when available.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", metavar="N", help="Batch size (default 1 on CPU, 32 on CUDA).", show_default=False)] = None,
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="float32, float16 or bfloat16 (both models; the fold itself is float64).")] = "float32",
    autocast: AutocastOpt = None,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Run both models and the input in channels_last memory format.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="N", help="torch intra-op CPU threads (default: torch's choice, or fewer when other work keeps CPUs busy, so that the timed threads do not compete with it).", show_default=False)] = None,
    iters: Annotated[Optional[int], typer.Option("--iters", metavar="N", help="Timed pairs per model (default 20 on CPU, 100 on CUDA).", show_default=False)] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", metavar="N", help="Untimed pairs first (default 3 on CPU, 10 on CUDA).", show_default=False)] = None,
    time_budget: Annotated[Optional[float], typer.Option("--time-budget", metavar="SECONDS", help="Stop timing a model after this many seconds, with at least 5 pairs (default 8 on CPU, 10 on CUDA; 0: no limit).", show_default=False)] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile both models (compilation happens during warm-up).")] = False,
    runtime: Annotated[str, typer.Option("--runtime", metavar="RUNTIME", help="What both models run in: eager (the modules), export (torch.export programs, ep.module()) or onnxruntime (ONNX graphs, both at ORT_ENABLE_ALL with --threads intra-op threads, CPU, float32; needs the onnx extra).")] = "eager",
    input_shape: ShapeOpt = None,
    arch: ArchOpt = None,
    weights: Annotated[str, typer.Option("--weights", metavar="WEIGHTS", help="For a model name: none (random weights, random BN statistics; runs offline), default, a torchvision weights name, or a state_dict file.")] = "none",
    allow_pickle: PickleOpt = False,
    key: KeyOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    seed: SeedOpt = 0,
    json_file: JsonOpt = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", metavar="FILE", help="Also write a Markdown table (for a CI job summary) to this file.", dir_okay=False)] = None,
    min_speedup: Annotated[Optional[float], typer.Option("--min-speedup", metavar="X", help="Exit 1 when a model's median speedup (original/fused) is below this (on a busy machine too: the message then says the CPUs were contended).", show_default=False)] = None,
    passes: "dict[str, bool] | None" = None,
) -> None:
    """Time each model and its fused copy side by side, and check the fused output.

    Both run in this process on the same device, dtype and settings, alternately, after a warm-up; the table gives median and IQR of the times and of the speedup, and says "within noise" when the speedup's IQR contains 1.0. --runtime export or onnxruntime races the two as exported programs (onnxruntime: the original as onnxruntime's own optimisation leaves it). Exit 1 when a fused output is wrong or a median speedup is below --min-speedup; exit 2 for errors (no CUDA for --device cuda).
    """

    def run(placed: list[Path]) -> int:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from .workflows.bench import bench as bench_fn
        from .workflows.options import BenchSettings, FuseOptions
        from .render import bench_tables, left_tables

        _check_report_path("--json", json_file)
        src = _source_options(arch=arch, weights=weights, input_shape=input_shape, allow_pickle=allow_pickle, key=key,
                              seed=seed)
        settings = BenchSettings(device=device, dtype=dtype, autocast=autocast, batch_size=batch_size,
                                 channels_last=channels_last, threads=threads, iters=iters, warmup=warmup,
                                 time_budget=time_budget, compile=compile_, runtime=runtime,
                                 fuse=FuseOptions(rtol, atol, passes or {}))
        _check_report_path("--markdown", markdown)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=err, transient=True, disable=not err.is_terminal)
        task = progress.add_task("starting", total=None)

        def tick(description: str, done: int, total: int) -> None:
            progress.update(task, description=description, completed=done, total=total)

        with progress, _library_output_to_stderr():
            report = bench_fn(models or None, settings, src, progress=tick)
        res = _results(json_file)
        _show(res, *bench_tables(report, min_speedup, _fit_width(res)), *left_tables(report))
        for r in report.results:
            for note in r.notes:
                _note(f"{r.model}: {note}")
        _write_report("--json", json_file, _json(report.to_dict(min_speedup)), placed)
        _write_report("--markdown", markdown, report.to_markdown(min_speedup), placed)
        code = 0
        for r in report.incorrect():
            err.print(f"[bold red]check failed:[/bold red] {r.model}: {'; '.join(r.check.summary())}", highlight=False,
                      soft_wrap=True)
            code = EXIT_CHECK_FAILED
        for r in report.slower_than(min_speedup):
            busy = "" if not r.contended else (
                f"; it was measured on contended CPUs ({r.contention.cause()}): the gate fails as it would on free "
                "ones, but rerun it where the CPUs are free before trusting the number")
            err.print(f"[bold red]too slow:[/bold red] {r.model}: median speedup {r.speedup.median:.3f}x is below "
                      f"--min-speedup {min_speedup:g}{escape(busy)}", highlight=False, soft_wrap=True)
            code = EXIT_CHECK_FAILED
        return code

    code = _run(run)
    if code:
        raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

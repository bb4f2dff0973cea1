"""The ``bnfuse`` command: a thin Typer layer over the library.

Each command parses options, calls one library function, and renders its report with Rich.
Results go to stdout, diagnostics to stderr.  Exit codes live in ``EXIT_CODES`` below.
Nothing here imports torch at module level, so ``bnfuse --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import BnfuseError, DeviceError, OutputError, UnsafeCheckpointError, UsageError

app = typer.Typer(
    name="bnfuse",
    help="Fold BatchNorm into Conv/Linear layers of PyTorch checkpoints, exactly, and prove it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
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


def _run(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` and turn a bnfuse error into a message and an exit code (no traceback)."""
    from .checkpoint import write_mark, written_since  # no torch: the files layer's record of placed outputs

    mark = write_mark()
    try:
        return fn()
    except tuple(cls for cls, _ in EXIT_CODES) as exc:
        code = next(c for cls, c in EXIT_CODES if isinstance(exc, cls))
        if isinstance(exc, KeyboardInterrupt):
            done = written_since(mark)  # exact even when the interrupt came mid-rename
            if done:
                names = ", ".join(str(p) for p in done)
                err.print(f"[red]interrupted[/red] after writing {names} (complete and checked); a model "
                          "file still being written was not placed", highlight=False, soft_wrap=True)
            else:
                err.print("[red]interrupted[/red]: nothing was written")
        else:
            err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None


def _write_json(path: "Path | None", data: Any) -> None:
    if path is None:
        return
    try:
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write --json {path}: {exc.strerror or exc}") from exc


def _fmt_count(n: int) -> str:
    return f"{n:,}"


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _version(value: bool) -> None:
    if value:
        out.print(f"bnfuse {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """Fold BatchNorm into Conv/Linear layers of PyTorch checkpoints, exactly, and prove it."""


# ----------------------------------------------------------------------------- shared options

ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="Architecture for a state_dict: torchvision name, timm:NAME or package.module:factory.")]
WeightsOpt = Annotated[str, typer.Option("--weights", help="For a model name: default, a torchvision weights name, none (random), or a state_dict file.")]
ShapeOpt = Annotated[Optional[str], typer.Option("--input-shape", help="Input shape for the checks, e.g. 1,3,224,224 (default: inferred from the model).")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow full unpickling (runs code from the file): only for files you trust.")]
KeyOpt = Annotated[Optional[str], typer.Option("--key", help="Where the weights are in a checkpoint that holds several, as a dotted path (for example model_state or ema.model).", show_default=False)]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON to this file.", dir_okay=False)]
RtolOpt = Annotated[Optional[float], typer.Option("--rtol", help="Relative tolerance, of each output's largest magnitude, on top of the original's own error at this precision (default by dtype: 1e-4 for float32).", show_default=False)]
AtolOpt = Annotated[Optional[float], typer.Option("--atol", help="Absolute tolerance (default by dtype: 1e-6 for float32).", show_default=False)]
AutocastOpt = Annotated[Optional[str], typer.Option("--autocast", help="Run both models under torch.autocast: float16 or bfloat16 (mixed precision as deployed with AMP).", show_default=False)]


def _note(text: str) -> None:
    err.print(f"[yellow]note:[/yellow] {text}", highlight=False, soft_wrap=True)


def _precision_text(flags: dict[str, Any]) -> str:
    return (f"{flags.get('device')}, {flags.get('dtype')}, autocast {flags.get('autocast') or 'off'}, "
            f"TF32 cuDNN {'on' if flags.get('cudnn_allow_tf32') else 'off'} / matmul "
            f"{'on' if flags.get('cuda_matmul_allow_tf32') else 'off'}, "
            f"float32 matmul precision {flags.get('float32_matmul_precision')}")


def _check_rows(t: Table, verdict: Any) -> None:
    """What a verdict rests on: errors, thresholds, the noise floor, fold sites, precision flags."""
    tol = verdict.tolerance
    for label, c in verdict.outputs.items():
        e, n = c.error, c.noise
        if e.mismatch:
            t.add_row(label, f"[red]{e.mismatch}[/red]")
            continue
        noise = f", original's own error {n.max_abs:.3g}" if c.reference == "float64" else ""
        t.add_row(label, f"max abs error {e.max_abs:.3g}, relative error {e.rel:.3g}{noise}; "
                         f"{c.worst:.1%} of the allowance used")
    t.add_row("allowance", f"|fused - ref| <= {tol.atol:g} + {tol.rtol:g} x max|ref| + {tol.noise_factor:g} x the "
                           "original's own error, per output")
    checked = [s for s in verdict.sites if s.skipped is None]
    worst = verdict.worst_site
    if verdict.sites:
        t.add_row("fold sites", f"{len(checked)} of {len(verdict.sites)} checked in float64"
                  + (f", worst {worst.rel_error:.2g} at {worst.layer} (limit {worst.tolerance:g})" if worst else ""))
    t.add_row("precision", _precision_text(verdict.precision))
    t.add_row("reference", verdict.basis)


def _plan_tables(plan: Any, *, verbose: bool, limit: int = 25) -> list[Table]:
    tables = []
    if verbose and plan.folds:
        t = Table(title="Folded", title_justify="left")
        t.add_column("BatchNorm", overflow="fold")
        t.add_column("into", overflow="fold")
        t.add_column("direction")
        t.add_column("left in its place")
        for f in plan.folds:
            t.add_row(f.norm, f.producer, "after the layer" if f.direction == "previous" else "before the layer",
                      f.replacement)
        tables.append(t)
    if plan.skipped:
        t = Table(title="Left in place", title_justify="left")
        t.add_column("BatchNorm", overflow="fold")
        t.add_column("reason", overflow="fold")
        shown = plan.skipped if verbose else plan.skipped[:limit]
        for s in shown:
            t.add_row(s.norm, s.reason)
        if len(shown) < len(plan.skipped):
            t.add_row(f"(+{len(plan.skipped) - len(shown)} more)", "see --verbose or --json")
        tables.append(t)
    return tables


def _convert_table(r: Any) -> Table:
    t = Table(title=f"bnfuse convert {r.source}" + (f" -> {r.output}" if r.output else ""), title_justify="left",
              show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("architecture", str(r.arch or "(pickled module)"))
    t.add_row("weights", r.weights)
    t.add_row("input", f"{r.input.kind} {'x'.join(map(str, r.input.shape))} {r.dtype}")
    t.add_row("BatchNorm layers", f"{len(r.plan.norms)} found, {len(r.plan.folded_norms)} folded, {len(r.plan.skipped)} left")
    t.add_row("parameters", f"{_fmt_count(r.params_before)} -> {_fmt_count(r.params_after)}")
    t.add_row("buffers", f"{_fmt_count(r.buffers_before)} -> {_fmt_count(r.buffers_after)}")
    t.add_row("removed", f"{_fmt_count(r.removed)} values")
    if r.output:
        t.add_row("written", f"{r.output} ({r.form.replace('_', '-')}, {_fmt_size(r.file_size)})")
    if r.verdict is not None:
        t.add_row("max abs error", f"{r.error.max_abs:.3g}")
        t.add_row("relative error", f"{r.error.rel:.3g} (tolerance {r.tolerance:g})")
        worst = r.verdict.worst_site
        if worst is not None:
            t.add_row("fold sites", f"{sum(s.skipped is None for s in r.verdict.sites)} checked in float64, worst "
                                    f"{worst.rel_error:.2g} at {worst.layer} (limit {worst.tolerance:g})")
    t.add_row("time", f"{r.seconds.get('total', 0):.2f} s (analyse {r.seconds.get('analyse', 0):.2f} s, fold {r.seconds.get('fold', 0):.2f} s)")
    return t


@app.command()
def convert(
    sources: Annotated[list[str], typer.Argument(help="Torchvision model name(s) or checkpoint file(s).", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output file (.pth or .safetensors).", dir_okay=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Output directory, for several sources.", file_okay=False)] = None,
    suffix: Annotated[str, typer.Option("--suffix", help="With --out-dir: .pth or .safetensors.")] = ".pth",
    arch: ArchOpt = None,
    weights: WeightsOpt = "default",
    input_shape: ShapeOpt = None,
    save_as: Annotated[Optional[str], typer.Option("--save-as", help="For .pth: module or state-dict (default mirrors the input).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    allow_pickle: PickleOpt = False,
    key: KeyOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    tolerance: Annotated[Optional[float], typer.Option("--tolerance", help="Alias of --rtol.", show_default=False)] = None,
    json_file: JsonOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every fold and every BatchNorm left.")] = False,
) -> None:
    """Fold every BatchNorm that can be folded and write the fused checkpoint.

    Loads SOURCE (a torchvision model name or a checkpoint), switches it to eval, finds fold sites
    by recording one forward pass, folds in place, checks the output against the original on a
    seeded random input, and writes .pth or .safetensors.  Nothing is written if the check fails.
    """

    def run() -> list[Any]:
        from .conversion import convert as convert_fn

        if len(sources) > 1 and out_dir is None:
            raise UsageError("several sources need --out-dir DIR (one output per source) instead of -o")
        if output is not None and out_dir is not None:
            raise UsageError("give either -o/--output or --out-dir, not both")
        if out_dir is not None and not out_dir.is_dir():
            raise OutputError(f"--out-dir {out_dir} does not exist or is not a directory")
        if suffix not in (".pth", ".pt", ".safetensors"):
            raise UsageError(f"--suffix {suffix!r}: use .pth or .safetensors")
        reports = []
        for src in sources:
            dest = output
            if out_dir is not None:
                dest = out_dir / (Path(src).stem.replace(".", "_") + ".fused" + suffix)
            r = convert_fn(src, dest, arch=arch, weights=weights, input_shape=input_shape, allow_pickle=allow_pickle, key=key,
                           save_as=save_as, force=force, rtol=rtol, atol=atol, tolerance=tolerance)
            out.print(_convert_table(r))
            for table in _plan_tables(r.plan, verbose=verbose):
                out.print(table)
            for note in r.notes:
                _note(note)
            if dest is None:
                _note("no -o given: checked only, nothing written")
            reports.append(r)
        data = [r.to_dict() for r in reports]
        _write_json(json_file, data[0] if len(data) == 1 else data)
        return reports

    _run(run)


@app.command()
def inspect(
    source: Annotated[str, typer.Argument(help="Torchvision model name or checkpoint file.", show_default=False)],
    arch: ArchOpt = None,
    weights: WeightsOpt = "default",
    input_shape: ShapeOpt = None,
    allow_pickle: PickleOpt = False,
    key: KeyOpt = None,
    json_file: JsonOpt = None,
) -> None:
    """Show what would fold and what would not, and why, without writing anything."""

    def run() -> None:
        from dataclasses import asdict

        from .conversion import inspect as inspect_fn

        src, spec, plan = inspect_fn(source, arch=arch, weights=weights, input_shape=input_shape,
                                     allow_pickle=allow_pickle, key=key)
        out.print(f"[bold]{source}[/bold]: {len(plan.norms)} BatchNorm layers, {len(plan.folded_norms)} would fold, "
                  f"{len(plan.skipped)} would stay (input {spec.kind} {'x'.join(map(str, spec.shape))})", highlight=False)
        for table in _plan_tables(plan, verbose=True):
            out.print(table)
        _write_json(json_file, {"source": source, "arch": src.arch, "input": spec.to_dict(), "bn_found": len(plan.norms),
                                "folds": [asdict(f) for f in plan.folds], "skipped": [asdict(s) for s in plan.skipped]})

    _run(run)


def _verify_table(r: Any, *, verbose: bool) -> Table:
    t = Table(title=f"bnfuse verify {r.orig} vs {r.fused}", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("original", f"{r.orig_kind}, {r.arch or '(pickled module)'}")
    t.add_row("fused", f"{r.fused_kind}, {r.fused_arch or '(pickled module)'}")
    st = r.structure
    removed = st.removed
    t.add_row("BatchNorm layers", f"{len(st.bn_orig)} -> {len(st.bn_fused)} ({len(removed)} removed)")
    if verbose and removed:
        t.add_row("removed", ", ".join(removed))
    if verbose and st.bn_fused:
        t.add_row("remaining", ", ".join(st.bn_fused))
    t.add_row("parameters", f"{_fmt_count(st.params_orig)} -> {_fmt_count(st.params_fused)}")
    t.add_row("buffers", f"{_fmt_count(st.buffers_orig)} -> {_fmt_count(st.buffers_fused)}")
    if r.samples:
        t.add_row("random inputs", f"{r.samples}: {r.input.kind} {'x'.join(map(str, r.input.shape))}, "
                                   f"seeds {r.seed}..{r.seed + r.samples - 1}")
        if r.top1_agreement is not None:
            t.add_row("", f"top-1 agreement {r.top1_agreement:.2%} ({r.top1_rows} rows)")
    if r.data is not None:
        d = r.data
        t.add_row("data", f"{d.path}: {d.count} inputs" + (f", top-1 agreement {d.agreement:.2%}" if d.agreement is not None else ""))
        if d.accuracy_orig is not None:
            t.add_row("accuracy", f"{d.accuracy_orig:.2%} original, {d.accuracy_fused:.2%} fused")
    _check_rows(t, r.verdict)
    t.add_row("time", f"{r.seconds.get('total', 0):.2f} s (load {r.seconds.get('load', 0):.2f} s)")
    return t


@app.command()
def verify(
    orig: Annotated[str, typer.Argument(help="The original: checkpoint file or torchvision model name.", show_default=False)],
    fused: Annotated[str, typer.Argument(help="The fused checkpoint (from bnfuse convert, or any checkpoint form).", show_default=False)],
    arch: ArchOpt = None,
    weights: WeightsOpt = "default",
    input_shape: ShapeOpt = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Number of seeded random inputs.")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first random input.")] = 0,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda (or cuda:N), or auto: run both models there.")] = "cpu",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, float16 or bfloat16 for both models (default: as stored).", show_default=False)] = None,
    autocast: AutocastOpt = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Tensor file of real inputs: a tensor, {'inputs': T, 'labels': T} or (inputs, labels).", dir_okay=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Inputs per forward pass with --data.")] = 256,
    allow_pickle: PickleOpt = False,
    key: KeyOpt = None,
    json_file: JsonOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List the BatchNorm layers removed and remaining.")] = False,
) -> None:
    """Check that FUSED computes what ORIG computes, and what changed in its structure.

    Runs both models on seeded random inputs (and on --data, with accuracy when it has labels) and
    reports max abs error, relative error, cosine similarity, top-1 agreement for classifier logits,
    the BatchNorm layers removed and both parameter counts, on --device in --dtype (and under
    --autocast), as deployed.  Exit 0: every fold site named in FUSED's metadata matches in float64
    and every output is within atol + rtol * max|ref| + 4 x the original's own error of the
    original run in float64; 1: they differ; 2: error.  --arch applies to a file holding only a
    state_dict; bnfuse outputs carry their own.
    """

    def run() -> Any:
        from .verification import verify as verify_fn

        r = verify_fn(orig, fused, arch=arch, weights=weights, input_shape=input_shape, samples=samples, seed=seed,
                      rtol=rtol, atol=atol, data=data, batch_size=batch_size, device=device, dtype=dtype,
                      autocast=autocast, allow_pickle=allow_pickle, key=key)
        out.print(_verify_table(r, verbose=verbose))
        for note in r.notes:
            _note(note)
        _write_json(json_file, r.to_dict())
        return r

    report = _run(run)
    if report.ok:
        out.print("[bold green]OK[/bold green]: the fused model matches the original within tolerance")
    else:
        out.print("[bold red]DIFFERENT[/bold red]: the fused model does not compute what the original computes "
                  "(exit 1): " + "; ".join(report.verdict.reasons), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_CHECK_FAILED)


# ----------------------------------------------------------------------------- bench


def _bench_table(report: Any, min_speedup: "float | None") -> Table:
    from .benchmark import verdict

    env, st = report.environment, report.settings
    extras = [x for x, on in (("channels_last", st.get("channels_last")), ("torch.compile", st.get("compile"))) if on]
    t = Table(
        title=(f"bnfuse bench: {env.get('device_name')} ({st.get('device')}), torch {env.get('torch')}, "
               f"{st.get('dtype')}, {env.get('threads')} threads" + "".join(f", {x}" for x in extras)),
        title_justify="left",
        caption=("times: median (IQR) per call; speedup = original/fused per alternating pair, median (IQR); "
                 "rel err: fused vs the original in float64; noise: the original's own rel err there. "
                 + _precision_text(report.results[0].check.precision if report.results else {})),
        caption_justify="left",
    )
    for col, justify in (("model", "left"), ("input", "left"), ("BN folded", "right"), ("original ms", "right"),
                         ("fused ms", "right"), ("speedup", "right"), ("max abs err", "right"),
                         ("rel err", "right"), ("noise", "right"), ("verdict", "left")):
        t.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in report.results:
        o, f, s = r.original, r.fused, r.speedup
        v = verdict(r, min_speedup)
        style = "red" if v.startswith(("WRONG", "BELOW")) else ("yellow" if v in ("within noise", "slower") else "green")
        t.add_row(
            r.model, "x".join(map(str, r.input.shape)), f"{r.bn_folded}/{r.bn_found}",
            f"{o.median:.3f} ({o.iqr:.3f})", f"{f.median:.3f} ({f.iqr:.3f})",
            f"{s.median:.3f}x ({s.q1:.3f}-{s.q3:.3f})", f"{r.error.max_abs:.2e}", f"{r.error.rel:.2e}",
            f"{r.noise.rel:.2e}", f"[{style}]{v}[/{style}]",
        )
    return t


@app.command()
def bench(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="Torchvision model names, timm:NAME, package.module:factory or checkpoint files "
             "(default: resnet18 resnet50 mobilenet_v3_large efficientnet_b0 regnet_y_400mf).",
        show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda (or cuda:N), or auto: CUDA when available.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Batch size (default 1 on CPU, 32 on CUDA).", show_default=False)] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16 (both models; the fold itself is float64).")] = "float32",
    autocast: AutocastOpt = None,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Run both models and the input in channels_last memory format.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch intra-op CPU threads (default: torch's choice).", show_default=False)] = None,
    iters: Annotated[Optional[int], typer.Option("--iters", help="Timed pairs per model (default 20 on CPU, 100 on CUDA).", show_default=False)] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", help="Untimed pairs first (default 3 on CPU, 10 on CUDA).", show_default=False)] = None,
    time_budget: Annotated[Optional[float], typer.Option("--time-budget", help="Stop timing a model after this many seconds, with at least 5 pairs (default 8 on CPU, 10 on CUDA; 0: no limit).", show_default=False)] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile both models (compilation happens during warm-up).")] = False,
    input_shape: ShapeOpt = None,
    arch: ArchOpt = None,
    weights: Annotated[str, typer.Option("--weights", help="For a model name: none (random weights, random BN statistics; runs offline), default, a torchvision weights name, or a state_dict file.")] = "none",
    allow_pickle: PickleOpt = False,
    key: KeyOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    json_file: JsonOpt = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Also write a Markdown table (for a CI job summary) to this file.", dir_okay=False)] = None,
    min_speedup: Annotated[Optional[float], typer.Option("--min-speedup", help="Exit 1 when a model's median speedup (original/fused) is below this.", show_default=False)] = None,
) -> None:
    """Time each model and its fused copy side by side, and check the fused output.

    Both run in this process on the same device, dtype and settings, alternately, after a
    warm-up; the table gives median and IQR of the times and of the speedup, and says
    "within noise" when the speedup's IQR contains 1.0.  Exit 1 when a fused output is wrong
    or a median speedup is below --min-speedup; exit 2 for errors (no CUDA for --device cuda).
    """

    def run() -> int:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from .benchmark import bench as bench_fn

        if time_budget is not None and time_budget < 0:
            raise UsageError(f"--time-budget {time_budget:g}: give seconds per model, or 0 for no limit")
        budget = -1.0 if time_budget is None else (None if time_budget == 0 else time_budget)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=err, transient=True, disable=not err.is_terminal)
        task = progress.add_task("starting", total=None)

        def tick(description: str, done: int, total: int) -> None:
            progress.update(task, description=description, completed=done, total=total)

        with progress:
            report = bench_fn(models or None, device=device, dtype=dtype, batch_size=batch_size,
                              input_shape=input_shape, channels_last=channels_last, threads=threads, iters=iters,
                              warmup=warmup, time_budget=budget, compile=compile_, arch=arch, weights=weights,
                              allow_pickle=allow_pickle, key=key, autocast=autocast, rtol=rtol, atol=atol,
                              progress=tick)
        out.print(_bench_table(report, min_speedup))
        for r in report.results:
            if r.bn_left:
                t = Table(title=f"{r.model}: BatchNorm left unfolded", title_justify="left")
                t.add_column("BatchNorm", overflow="fold")
                t.add_column("reason", overflow="fold")
                for norm, reason in r.bn_left:
                    t.add_row(norm, reason)
                out.print(t)
            for note in r.notes:
                _note(f"{r.model}: {note}")
        _write_json(json_file, report.to_dict(min_speedup))
        if markdown is not None:
            try:
                markdown.write_text(report.to_markdown(min_speedup))
            except OSError as exc:
                raise OutputError(f"cannot write --markdown {markdown}: {exc.strerror or exc}") from exc
        code = 0
        for r in report.incorrect():
            err.print(f"[bold red]check failed:[/bold red] {r.model}: {'; '.join(r.check.reasons)}", highlight=False,
                      soft_wrap=True)
            code = EXIT_CHECK_FAILED
        for r in report.slower_than(min_speedup):
            err.print(f"[bold red]too slow:[/bold red] {r.model}: median speedup {r.speedup.median:.3f}x is below "
                      f"--min-speedup {min_speedup:g}", highlight=False, soft_wrap=True)
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

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
    try:
        return fn()
    except tuple(cls for cls, _ in EXIT_CODES) as exc:
        code = next(c for cls, c in EXIT_CODES if isinstance(exc, cls))
        if isinstance(exc, KeyboardInterrupt):
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
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON to this file.", dir_okay=False)]


def _plan_tables(plan: Any, *, verbose: bool, limit: int = 25) -> list[Table]:
    tables = []
    if verbose and plan.folds:
        t = Table(title="Folded", title_justify="left")
        t.add_column("BatchNorm")
        t.add_column("into")
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
    if r.error is not None:
        t.add_row("max abs error", f"{r.error.max_abs:.3g}")
        t.add_row("relative error", f"{r.error.rel:.3g} (tolerance {r.tolerance:g})")
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
    tolerance: Annotated[Optional[float], typer.Option("--tolerance", help="Largest relative output error accepted (default by dtype; 1e-4 for float32).")] = None,
    json_file: JsonOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every fold and every BatchNorm left.")] = False,
) -> None:
    """Fold every BatchNorm that can be folded and write the fused checkpoint.

    Loads SOURCE (a torchvision model name or a checkpoint), switches it to eval, finds fold sites
    by recording one forward pass, folds in place, checks the output against the original on a
    seeded random input, and writes .pth or .safetensors.  Nothing is written if the check fails.
    """

    def run() -> list[Any]:
        from .convert import convert as convert_fn

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
            r = convert_fn(src, dest, arch=arch, weights=weights, input_shape=input_shape, allow_pickle=allow_pickle,
                           save_as=save_as, force=force, tolerance=tolerance)
            out.print(_convert_table(r))
            for table in _plan_tables(r.plan, verbose=verbose):
                out.print(table)
            for note in r.notes:
                err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
            if dest is None:
                err.print("[yellow]note:[/yellow] no -o given: checked only, nothing written", highlight=False)
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
    json_file: JsonOpt = None,
) -> None:
    """Show what would fold and what would not, and why, without writing anything."""

    def run() -> None:
        from dataclasses import asdict

        from .convert import inspect as inspect_fn

        src, spec, plan = inspect_fn(source, arch=arch, weights=weights, input_shape=input_shape,
                                     allow_pickle=allow_pickle)
        out.print(f"[bold]{source}[/bold]: {len(plan.norms)} BatchNorm layers, {len(plan.folded_norms)} would fold, "
                  f"{len(plan.skipped)} would stay (input {spec.kind} {'x'.join(map(str, spec.shape))})", highlight=False)
        for table in _plan_tables(plan, verbose=True):
            out.print(table)
        _write_json(json_file, {"source": source, "arch": src.arch, "input": spec.to_dict(), "bn_found": len(plan.norms),
                                "folds": [asdict(f) for f in plan.folds], "skipped": [asdict(s) for s in plan.skipped]})

    _run(run)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

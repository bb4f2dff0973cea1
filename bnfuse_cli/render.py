"""Rich tables for the reports of ``convert``, ``inspect``, ``verify`` and ``bench``.

Only the command line draws; the workflows return data.  Below 80 columns the bench table
turns into one small table per model, so no column is squeezed to a few characters; where the
output has no width (a file, a pipe), the command line prints every table at its natural width.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

__all__ = ["fmt_count", "fmt_size", "plan_tables", "convert_table", "inspect_line", "verify_table", "bench_tables",
           "left_tables"]

#: below this console width the bench results are stacked, one model per table
NARROW = 80


def fmt_count(n: int) -> str:
    return f"{n:,}"


def fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def precision_text(flags: dict[str, Any]) -> str:
    return (f"{flags.get('device')}, {flags.get('dtype')}, autocast {flags.get('autocast') or 'off'}, "
            f"TF32 cuDNN {'on' if flags.get('cudnn_allow_tf32') else 'off'} / matmul "
            f"{'on' if flags.get('cuda_matmul_allow_tf32') else 'off'}, "
            f"float32 matmul precision {flags.get('float32_matmul_precision')}")


def check_rows(t: Table, verdict: Any) -> None:
    """What a verdict rests on: errors, thresholds, the noise floor, fold sites, precision flags."""
    tol = verdict.tolerance
    for label, c in verdict.outputs.items():
        e, n = c.error, c.noise
        if c.waived:
            t.add_row(label, f"not counted: {escape(c.waived)}")
            continue
        if e.mismatch:
            t.add_row(label, f"[red]{escape(e.mismatch)}[/red]")
            continue
        noise = f", original's own error {n.max_abs:.3g}" if c.reference == "float64" else ""
        t.add_row(label, f"max abs error {e.max_abs:.3g}, relative error {e.rel:.3g}{noise}; "
                         f"{c.worst:.1%} of the allowance used")
    t.add_row("allowance", f"|fused - ref| <= {tol.atol:g} + {tol.rtol:g} x max|ref| + {tol.noise_factor:g} x the "
                           "original's own error, per output")
    checked = [s for s in verdict.sites if s.skipped is None]
    worst = verdict.worst_site
    if verdict.sites:
        t.add_row("sites", f"{len(checked)} of {len(verdict.sites)} folds and merges checked in float64"
                  + (f", worst {worst.rel_error:.2g} at {worst.layer} (limit {worst.tolerance:g})" if worst else ""))
    t.add_row("precision", precision_text(verdict.precision))
    t.add_row("reference", verdict.basis)


def plan_tables(plan: Any, *, verbose: bool, limit: int = 25) -> list[Table]:
    """Each pass of the table's part of the report: what it did (with ``verbose``), and what it
    left, with the reasons (the first ``limit`` unless ``verbose``)."""
    tables = []
    for p in plan.passes:
        rows = p.rows(plan)
        if verbose and rows.done:
            t = Table(title=rows.title, title_justify="left", min_width=len(rows.title) + 2)
            for column in rows.columns:
                t.add_column(column, overflow="fold")
            for row in rows.done:
                t.add_row(*row)
            tables.append(t)
        if rows.left:
            tables.append(_reasons(rows.left_title, rows.left_what, rows.left, verbose=verbose, limit=limit))
    return tables


def plan_summary(plan: Any) -> "list[tuple[str, str]]":
    """Each pass's line for a summary table, in the table's order (the fold pass's BatchNorm counts
    first), as (label, text)."""
    return [rows.summary for p in plan.passes if (rows := p.rows(plan)).summary is not None]


def _reasons(title: str, what: str, rows: list[tuple[str, str]], *, verbose: bool, limit: int) -> Table:
    """A table of things left as they are, each with its reason (the first ``limit`` unless verbose)."""
    t = Table(title=title, title_justify="left")
    t.add_column(what, overflow="fold")
    t.add_column("reason", overflow="fold")
    shown = rows if verbose else rows[:limit]
    for name, reason in shown:
        t.add_row(name, reason)
    if len(shown) < len(rows):
        t.add_row(f"(+{len(rows) - len(shown)} more)", "see --verbose or --json")
    return t


def convert_table(r: Any) -> Table:
    t = Table(title=f"bnfuse convert {r.source}" + (f" -> {r.output}" if r.output else ""), title_justify="left",
              show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("architecture", str(r.arch or "(pickled module)"))
    t.add_row("weights", r.weights)
    t.add_row("input", f"{r.input.kind} {'x'.join(map(str, r.input.shape))} {r.dtype}")
    for label, text in plan_summary(r.plan):
        t.add_row(label, text)
    t.add_row("parameters", f"{fmt_count(r.params_before)} -> {fmt_count(r.params_after)}")
    t.add_row("buffers", f"{fmt_count(r.buffers_before)} -> {fmt_count(r.buffers_after)}")
    t.add_row("removed", f"{fmt_count(r.removed)} values")
    if r.output:
        t.add_row("written", f"{r.output} ({r.form.replace('_', '-')}, {fmt_size(r.file_size)})")
    if r.verdict is not None:
        t.add_row("max abs error", f"{r.error.max_abs:.3g}")
        t.add_row("relative error", f"{r.error.rel:.3g} (tolerance {r.tolerance:g})")
        worst = r.verdict.worst_site
        if worst is not None:
            t.add_row("sites", f"{sum(s.skipped is None for s in r.verdict.sites)} checked in float64, worst "
                                    f"{worst.rel_error:.2g} at {worst.layer} (limit {worst.tolerance:g})")
    t.add_row("time", f"{r.seconds.get('total', 0):.2f} s (analyse {r.seconds.get('analyse', 0):.2f} s, fold {r.seconds.get('fold', 0):.2f} s)")
    return t


def verify_table(r: Any, *, verbose: bool) -> Table:
    t = Table(title=f"bnfuse verify {r.orig} vs {r.fused}", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("original", f"{r.orig_kind}, {r.arch or '(pickled module)'}"
                          + (f" (architecture from {r.arch_from})" if r.arch_from else ""))
    t.add_row("fused", f"{r.fused_kind}, {r.fused_arch or '(pickled module)'}")
    st = r.structure
    removed = st.removed
    t.add_row("BatchNorm layers", f"{len(st.bn_orig)} -> {len(st.bn_fused)} ({len(removed)} removed)")
    if verbose and removed:
        t.add_row("removed", ", ".join(removed))
    if verbose and st.bn_fused:
        t.add_row("remaining", ", ".join(st.bn_fused))
    t.add_row("parameters", f"{fmt_count(st.params_orig)} -> {fmt_count(st.params_fused)}")
    t.add_row("buffers", f"{fmt_count(st.buffers_orig)} -> {fmt_count(st.buffers_fused)}")
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
    check_rows(t, r.verdict)
    t.add_row("time", f"{r.seconds.get('total', 0):.2f} s (load {r.seconds.get('load', 0):.2f} s)")
    return t


def _warnings_text(report: Any) -> str:
    """The report's warnings, one line each, for the top of a caption (empty when there are none)."""
    return "".join(f"[bold yellow]warning:[/bold yellow] {escape(w)}\n" for w in report.warnings)


def bench_table(report: Any, min_speedup: "float | None") -> Table:
    from .workflows.bench import verdict
    from .workflows.timing import threads_text

    env, st = report.environment, report.settings
    extras = [x for x, on in (("channels_last", st.get("channels_last")), ("torch.compile", st.get("compile"))) if on]
    runtime = st.get("runtime", "eager")
    if runtime != "eager":
        extras.append(f"runtime {runtime}" + (f" (onnxruntime {env['onnxruntime']}, ORT_ENABLE_ALL)"
                                              if env.get("onnxruntime") else ""))
    graphs = any(r.graph_ops for r in report.results)
    t = Table(
        title=(f"bnfuse bench: {env.get('device_name')} ({st.get('device')}), torch {env.get('torch')}, "
               f"{st.get('dtype')}, {threads_text(env.get('threads'))}" + "".join(f", {x}" for x in extras)),
        title_justify="left",
        caption=(_warnings_text(report) + "times: median (IQR) per call; speedup = original/fused per alternating pair, median (IQR); "
                 "rel err: fused vs the original in float64; noise: the original's own rel err there. "
                 + ("ORT graph: BatchNormalization and conv-like nodes left after onnxruntime's own optimisation, "
                    "original -> fused. " if graphs else "")
                 + precision_text(report.results[0].check.precision if report.results else {})),
        caption_justify="left",
    )
    cols = [("model", "left"), ("runtime", "left"), ("input", "left"), ("BN folded", "right"),
            ("original ms", "right"), ("fused ms", "right"), ("speedup", "right"), ("max abs err", "right"),
            ("rel err", "right"), ("noise", "right"), ("verdict", "left")]
    if graphs:
        cols.insert(-1, ("ORT graph", "left"))
    for col, justify in cols:
        t.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in report.results:
        o, f, s = r.original, r.fused, r.speedup
        v = verdict(r, min_speedup)
        style = "red" if v.startswith(("WRONG", "BELOW")) else (
            "yellow" if v.startswith(("within noise", "slower")) or r.contended else "green")
        cells = [
            r.model, r.runtime, "x".join(map(str, r.input.shape)), f"{r.bn_folded}/{r.bn_found}",
            f"{o.median:.3f} ({o.iqr:.3f})", f"{f.median:.3f} ({f.iqr:.3f})",
            f"{s.median:.3f}x ({s.q1:.3f}-{s.q3:.3f})", f"{r.error.max_abs:.2e}", f"{r.error.rel:.2e}",
            f"{r.noise.rel:.2e}", f"[{style}]{v}[/{style}]",
        ]
        if graphs:
            cells.insert(-1, r.graph_text() or "-")
        t.add_row(*cells)
    return t


def inspect_line(r: Any) -> str:
    p = r.plan
    return (f"[bold]{r.source}[/bold]: {len(p.norms)} BatchNorm layers, {len(p.folded_norms)} would fold, "
            f"{len(p.skipped)} would stay (input {r.input.kind} {'x'.join(map(str, r.input.shape))})")


def _bench_stacked(report: Any, min_speedup: "float | None") -> list[Table]:
    """One two-column table per model: for terminals narrower than :data:`NARROW`."""
    from .workflows.bench import verdict

    tables = []
    for r in report.results:
        o, f, s = r.original, r.fused, r.speedup
        t = Table(title=r.model, title_justify="left", show_header=False)
        t.add_column(style="bold")
        t.add_column(overflow="fold")
        rows = [("runtime", r.runtime), ("input", "x".join(map(str, r.input.shape))),
                ("BN folded", f"{r.bn_folded}/{r.bn_found}"),
                ("original ms", f"{o.median:.3f} ({o.iqr:.3f})"), ("fused ms", f"{f.median:.3f} ({f.iqr:.3f})"),
                ("speedup", f"{s.median:.3f}x ({s.q1:.3f}-{s.q3:.3f})"), ("max abs err", f"{r.error.max_abs:.2e}"),
                ("rel err", f"{r.error.rel:.2e}"), ("noise", f"{r.noise.rel:.2e}"),
                ("verdict", verdict(r, min_speedup))]
        if r.graph_ops:
            rows.insert(-1, ("ORT graph", r.graph_text()))
        warning = r.contention.warning() if r.contention is not None else None
        if warning:
            rows.append(("warning", warning))
        for k, v in rows:
            t.add_row(k, v)
        tables.append(t)
    return tables


def bench_tables(report: Any, min_speedup: "float | None", width: "int | None") -> list[Table]:
    """The results table, or one table per model when the output is narrower than :data:`NARROW`
    (``width`` None: no limit, as in a file or a pipe)."""
    if width is not None and width < NARROW:
        return _bench_stacked(report, min_speedup)
    return [bench_table(report, min_speedup)]


def left_tables(report: Any) -> list[Table]:
    """Per model, the BatchNorm layers left unfolded and why."""
    tables = []
    for r in report.results:
        if r.bn_left:
            t = Table(title=f"{r.model}: BatchNorm left unfolded", title_justify="left")
            t.add_column("BatchNorm", overflow="fold")
            t.add_column("reason", overflow="fold")
            for norm, reason in r.bn_left:
                t.add_row(norm, reason)
            tables.append(t)
    return tables

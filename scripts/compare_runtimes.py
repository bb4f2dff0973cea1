"""bnfuse's fused ONNX against onnxruntime's own optimisation of the original, on CPU.

For each model (random weights, random BatchNorm statistics measured on random input, eval mode,
float32, batch 1 at the model's own input size): ``bnfuse bench --runtime onnxruntime``, i.e.

* the ORIGINAL model exported to ONNX (PyTorch's torch.export-based exporter, the same code as
  ``bnfuse convert -o .onnx``) and run by onnxruntime with its graph optimisations at their highest
  level (``ORT_ENABLE_ALL``: it folds Conv+BatchNorm, fuses activations, picks NCHWc kernels),
  against bnfuse's fused (and branch-merged) model exported the same way and run in a session with
  the same options (``intra_op_num_threads`` = ``--threads``, default 2);
* latency: alternating pairs (original, fused, fused, original, ...), median and IQR of each
  model's times and of the per-pair ratios original/fused (above 1: bnfuse's graph is faster);
* BatchNormalization and conv-like nodes (Conv, FusedConv, NCHWc Conv) in each graph AFTER
  onnxruntime's optimisation (read back from ``SessionOptions.optimized_model_filepath``);
* exactness: each onnxruntime output against the original run eagerly in float64 (relative error
  ``||b - a|| / ||a||``, bench's judge's measure); the fused graph must be within the original's own float32 error
  allowance (bench's judge), or the row is marked WRONG.

The models are the five defaults of ``bnfuse bench`` and the ten timm re-parameterisable families
of ``scripts/compare_reparam.py``.  The load average is sampled before and after each model (the
timings are only as quiet as the machine).  Writes a Markdown table to ``out/compare_runtimes.md``
(and JSON next to it) and prints it.  Exit 1 if a fused graph was judged wrong, 2 if a model failed.

    python scripts/compare_runtimes.py [--models resnet18,timm:repvgg_a0] [--iters 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_reparam import MODELS as REPARAM_MODELS  # noqa: E402

from bnfuse_cli.workflows.bench import DEFAULT_MODELS  # noqa: E402

MODELS = list(DEFAULT_MODELS) + [f"timm:{m}" for m in REPARAM_MODELS]


def _load() -> float:
    return os.getloadavg()[0]


def run_one(name: str, iters: int, warmup: int, threads: int, budget: float) -> dict[str, Any]:
    from bnfuse_cli.errors import BnfuseError
    from bnfuse_cli.workflows.bench import bench, verdict

    row: dict[str, Any] = {"model": name, "load_before": _load()}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = bench([name], device="cpu", batch_size=1, threads=threads, iters=iters, warmup=warmup,
                           time_budget=budget, runtime="onnxruntime")
        (r,) = report.results
        row.update(
            input=list(r.input.shape), bn_found=r.bn_found, bn_folded=r.bn_folded, graph_ops=r.graph_ops,
            original_ms=r.original.to_dict(), fused_ms=r.fused.to_dict(), speedup=r.speedup.to_dict(),
            within_noise=r.within_noise, rel_err_fused=r.error.rel, rel_err_original=r.noise.rel,
            max_abs_err_fused=r.error.max_abs, tolerance=r.tolerance, correct=r.correct,
            verdict=verdict(r), calls_per_sample=r.calls_per_sample, notes=r.notes,
            onnxruntime=report.environment.get("onnxruntime"), environment=report.environment,
        )
    except BnfuseError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["seconds"] = time.perf_counter() - t0
    row["load_after"] = _load()
    return row


def _ms(s: dict[str, Any]) -> str:
    return f"{s['median']:.2f} ({s['iqr']:.2f})"


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "",
             "| model | input | BN folded by bnfuse | ORT graph BN: original / fused | ORT graph conv: original / fused "
             "| original ms (IQR) | fused ms (IQR) | speedup (IQR) | rel err fused / original | verdict |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        name = r["model"]
        if "error" in r:
            lines.append(f"| {name} | | | | | | | | | ERROR: {r['error'][:160]} |")
            continue
        g = r["graph_ops"]
        o, f, s = r["original_ms"], r["fused_ms"], r["speedup"]
        lines.append(
            f"| {name} | {'x'.join(map(str, r['input']))} | {r['bn_folded']}/{r['bn_found']} "
            f"| {g['original']['bn']} / {g['fused']['bn']} | {g['original']['conv']} / {g['fused']['conv']} "
            f"| {_ms(o)} | {_ms(f)} | {s['median']:.3f}x ({s['q1']:.3f}-{s['q3']:.3f}) "
            f"| {r['rel_err_fused']:.1e} / {r['rel_err_original']:.1e} | {r['verdict']} |")
    lines += ["",
              "Both graphs run by onnxruntime at ORT_ENABLE_ALL with the same session options. Speedup = original / "
              "fused per alternating pair (above 1: bnfuse's graph is faster), median and IQR; \"within noise\": the "
              "IQR contains 1.0. ORT graph: BatchNormalization and conv-like nodes (Conv, FusedConv, NCHWc Conv) "
              "left after onnxruntime's own optimisation. rel err: ||b - a|| / ||a|| of each onnxruntime output "
              "against the original in float64 eager.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated (default: %s)" % ",".join(MODELS))
    parser.add_argument("--iters", type=int, default=30, help="timed alternating pairs per model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (torch and onnxruntime)")
    parser.add_argument("--time-budget", type=float, default=30.0, help="seconds of timing per model at most")
    parser.add_argument("--out", default="out/compare_runtimes.md")
    args = parser.parse_args()
    models = args.models.split(",") if args.models else MODELS

    from bnfuse_cli.workflows.timing import machine_info

    info = machine_info()
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    started = time.perf_counter()
    rows = []
    for name in models:
        row = run_one(name, args.iters, args.warmup, args.threads, args.time_budget)
        rows.append(row)
        status = row.get("error") or (f"{row['speedup']['median']:.3f}x, {row['verdict']}")
        print(f"{name}: {status} ({row['seconds']:.0f} s, load {row['load_before']:.2f} -> {row['load_after']:.2f})",
              file=sys.stderr, flush=True)
    loads = [x for r in rows for x in (r["load_before"], r["load_after"])]
    ort = next((r["onnxruntime"] for r in rows if r.get("onnxruntime")), "?")
    header = (f"# bnfuse's fused ONNX vs onnxruntime's ORT_ENABLE_ALL on the original ({date})\n\n"
              f"{info['cpu']}, {info['cores']} cores, {info['os']}; Python {info['python']}, torch {info['torch']}, "
              f"onnxruntime {ort}, bnfuse {info['bnfuse']}; batch 1, float32, {args.threads} threads, up to "
              f"{args.iters} alternating pairs after {args.warmup} warm-up pairs. 1-minute load average during the "
              f"run: {min(loads):.2f} to {max(loads):.2f} (the run itself keeps about {args.threads} cores busy); "
              f"{time.perf_counter() - started:.0f} s in all.")
    text = markdown(rows, header)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"date": date, "machine": info, "threads": args.threads,
                                                    "iters": args.iters, "rows": rows}, indent=1, default=str))
    print(text)
    if any("error" in r for r in rows):
        return 2
    return 1 if any(not r["correct"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

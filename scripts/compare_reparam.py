"""bnfuse's BatchNorm fold against timm's own structural re-parameterisation, on RepVGG-style models.

For each timm model (``timm.create_model(name, pretrained=False)``: random weights, no download;
eval mode; BatchNorm affine parameters randomised and running statistics measured on a random
batch at the model's default input size, so activations stay of order 1):

* (a) the original, (b) ``bnfuse_cli.fuse(model, x).model`` (``--unwrap``: ``fuse(model, x, unwrap=True)``), (c)
  ``timm.utils.model.reparameterize_model(model)`` (timm's multi-branch merge, conv+BN fusion);
* BN calls and conv calls in one forward pass at batch 1, counted with forward hooks on every
  module (BN: instances of ``torch.nn.modules.batchnorm._BatchNorm``, which timm's
  ``BatchNormAct2d`` subclasses; conv: ``nn.Conv1d/2d/3d`` and subclasses), for (a), (b), (c);
* parameters of (b) and (c);
* exactness: the original is copied to float64 and both transforms are applied to that float64
  copy (bnfuse computes its fold in float64 anyway; timm's merge runs in the model's dtype), then
  ||b - a|| / ||a|| and ||c - a|| / ||a|| on one float64 input (exact: about 1e-12 or less;
  converting the float32 results with ``.double()`` would only measure float32 weight rounding);
* CPU latency at batch 1, float32, ``torch.set_num_threads(THREADS)``, ``torch.inference_mode()``:
  after a warm-up, ITERS pairs of calls, the order alternating from pair to pair, timed as ``bnfuse
  bench`` times them (:func:`paired`); the medians, and the median
  bnfuse/timm ratio with the interquartile range of the per-pair ratios.

A model that fails to build, fuse or re-parameterise gets a row saying where and why; the others
go on.  An error cell marked * was measured another way, said in a note under the table (timm's
repvit ``fuse()`` builds its fused layers in float32 even in a float64 model, so that model is
run after ``.double()`` and carries float32 rounding).  Prints a Markdown table; ``--json FILE``
writes the same data (with each model's float32 errors, bnfuse's fold/skip/merge counts and the
run's seconds).  Exits 2 if any model had an error (including a fused model the judge rejected).

    python scripts/compare_reparam.py [--models repvgg_a0,mobileone_s0] [--iters 20] [--unwrap] [--json out/reparam.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

MODELS = [
    "repvgg_a0",
    "repvgg_a2",
    "repvgg_b0",
    "mobileone_s0",
    "mobileone_s1",
    "fastvit_t8",
    "fastvit_sa12",
    "repghostnet_050",
    "repvit_m0_9",
    "ghostnetv3_050",
]


@dataclass
class Row:
    model: str
    input_size: list[int] = field(default_factory=list)
    #: (original, bnfuse, timm); None where not measured
    bn_calls: list[Any] = field(default_factory=lambda: [None, None, None])
    conv_calls: list[Any] = field(default_factory=lambda: [None, None, None])
    params: list[Any] = field(default_factory=lambda: [None, None, None])
    bnfuse_folds: "int | None" = None
    bnfuse_skipped: "int | None" = None
    bnfuse_merges: "int | None" = None
    bnfuse_ok: "bool | None" = None
    #: relative error against the float64 original, both transforms applied in float64
    rel_err64_bnfuse: float = float("nan")
    rel_err64_timm: float = float("nan")
    #: the float32 models against the float64 original (for scale: the original's own float32 noise)
    rel_err32_original: float = float("nan")
    rel_err32_bnfuse: float = float("nan")
    rel_err32_timm: float = float("nan")
    latency_ms_bnfuse: float = float("nan")
    latency_ms_timm: float = float("nan")
    ratio_median: float = float("nan")
    ratio_q1: float = float("nan")
    ratio_q3: float = float("nan")
    seconds: float = 0.0
    #: "stage: Exception: message" for each stage that failed
    errors: list[str] = field(default_factory=list)
    #: what else the reader should know (a measurement taken a different way)
    notes: list[str] = field(default_factory=list)


def _err(stage: str, exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{stage}: {type(exc).__name__}: {text}"[:240]


def _tensors(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _rel(ref: Any, out: Any) -> float:
    import torch

    a = torch.cat([t.reshape(-1).double() for t in _tensors(ref)])
    b = torch.cat([t.reshape(-1).double() for t in _tensors(out)])
    return float(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(a))


def _calls(model: Any, x: Any) -> tuple[int, int]:
    """(BN calls, conv calls) in one forward pass, from hooks on every module."""
    import torch
    from torch import nn

    counts = {"bn": 0, "conv": 0}

    def hook(mod: Any, *_: Any) -> None:
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            counts["bn"] += 1
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            counts["conv"] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counts["bn"], counts["conv"]


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _build(name: str, row: Row) -> tuple[Any, Any]:
    """The randomised float32 original in eval mode, and the seeded batch-1 input."""
    import timm
    import torch

    from bnfuse_cli.inputs import randomize_bn

    torch.manual_seed(0)  # the same random weights on every run
    model = timm.create_model(name, pretrained=False).eval()
    shape = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    row.input_size = [1, *shape]
    # statistics measured on a batch of 4 (a batch of 1 would fail in BatchNorm1d heads, whose
    # input has one value per channel) so every BN normalises what it really sees
    calib = torch.randn((4, *shape), generator=torch.Generator().manual_seed(1))
    randomize_bn(model, seed=0, example=(calib,))
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    return model.eval(), x


def _timm_reparam(model: Any) -> Any:
    from timm.utils.model import reparameterize_model

    return reparameterize_model(model).eval()


def start(threads: int) -> dict[str, Any]:
    """Set up a timing script's process (``threads`` for OpenMP and torch, warnings off) and describe
    the machine (:func:`bnfuse_cli.workflows.timing.machine_info`)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    from bnfuse_cli.workflows.timing import machine_info

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    return machine_info()


def paired(a: Any, b: Any, x: Any, iters: int, warmup: int = 3) -> dict[str, float]:
    """``a(x)`` and ``b(x)`` timed in pairs, the order alternating from pair to pair, on the CPU (the
    pairing of ``bnfuse bench``: :func:`bnfuse_cli.workflows.timing.race`): both medians in ms and
    the median of the per-pair ratios b/a with its quartiles."""
    from types import SimpleNamespace

    import torch

    from bnfuse_cli.workflows.bench_report import Stats
    from bnfuse_cli.workflows.timing import race

    st = SimpleNamespace(device=torch.device("cpu"), autocast=None, warmup=warmup, iters=iters, min_sample_ms=0.0,
                         time_budget=0)
    ta, tb, _ = race((lambda: a(x), lambda: b(x)), st, lambda *_: None, [])
    ratio = Stats.of([y / x_ for x_, y in zip(ta, tb)])
    return {"a_ms": Stats.of(ta).median, "b_ms": Stats.of(tb).median, "ratio": ratio.median, "q1": ratio.q1,
            "q3": ratio.q3}


def _latency(row: Row, fused: Any, reparam: Any, x: Any, iters: int, warmup: int) -> None:
    t = paired(reparam, fused, x, iters, warmup)
    row.latency_ms_bnfuse, row.latency_ms_timm = t["b_ms"], t["a_ms"]
    row.ratio_median, row.ratio_q1, row.ratio_q3 = t["ratio"], t["q1"], t["q3"]


def run_one(name: str, iters: int, warmup: int, unwrap: bool = False) -> Row:
    import torch

    import bnfuse_cli

    row = Row(name)
    t0 = time.perf_counter()
    try:
        original, x = _build(name, row)
    except Exception as exc:  # report and go on: one model must not hide the others
        row.errors.append(_err("build", exc))
        row.seconds = time.perf_counter() - t0
        return row
    try:
        row.bn_calls[0], row.conv_calls[0] = _calls(original, x)
        row.params[0] = _params(original)
    except Exception as exc:
        row.errors.append(_err("forward", exc))
        row.seconds = time.perf_counter() - t0
        return row

    fused = reparam = None
    try:
        result = bnfuse_cli.fuse(original, x, unwrap=unwrap)
        fused = result.model.eval()
        row.bnfuse_folds, row.bnfuse_skipped, row.bnfuse_ok = len(result.folds), len(result.skipped), result.ok
        merges = getattr(result.plan, "merges", None)  # branch merging, where this bnfuse has it
        row.bnfuse_merges = None if merges is None else len(merges)
        if not result.ok:
            row.errors.append("bnfuse: the judge rejected the fused model")
        row.bn_calls[1], row.conv_calls[1] = _calls(fused, x)
        row.params[1] = _params(fused)
    except Exception as exc:
        row.errors.append(_err("bnfuse", exc))
        fused = None
    try:
        reparam = _timm_reparam(original)
        row.bn_calls[2], row.conv_calls[2] = _calls(reparam, x)
        row.params[2] = _params(reparam)
    except Exception as exc:
        row.errors.append(_err("timm reparameterize_model", exc))
        reparam = None

    try:
        x64 = x.double()
        original64 = copy.deepcopy(original).double()
        with torch.no_grad():
            ref64 = original64(x64)
            row.rel_err32_original = _rel(ref64, original(x))
            if fused is not None:
                row.rel_err32_bnfuse = _rel(ref64, fused(x))
            if reparam is not None:
                row.rel_err32_timm = _rel(ref64, reparam(x))
        if fused is not None:
            fused64 = bnfuse_cli.fuse(original64, x64, unwrap=unwrap).model.eval()
            with torch.no_grad():
                row.rel_err64_bnfuse = _rel(ref64, fused64(x64))
            del fused64
        if reparam is not None:
            reparam64 = _timm_reparam(original64)
            with torch.no_grad():
                try:
                    out64 = reparam64(x64)
                except RuntimeError as exc:  # timm built some fused layers in float32 (repvit's fuse())
                    row.notes.append(f"timm: its float64 re-parameterisation made float32 layers ({exc}); "
                                     "measured after .double(), so those layers carry float32 rounding")
                    out64 = reparam64.double()(x64)
                row.rel_err64_timm = _rel(ref64, out64)
            del reparam64
        del original64
    except Exception as exc:
        row.errors.append(_err("float64", exc))

    if fused is not None and reparam is not None and iters > 0:
        try:
            _latency(row, fused, reparam, x, iters, warmup)
        except Exception as exc:
            row.errors.append(_err("latency", exc))
    row.seconds = time.perf_counter() - t0
    return row


def _triple(values: list[Any]) -> str:
    return " / ".join("-" if v is None else str(v) for v in values)


def _params_cell(values: list[Any]) -> str:
    return " / ".join("-" if v is None else f"{v / 1e6:.3f}M" for v in values[1:])


def _e(v: float) -> str:
    return "-" if v != v else f"{v:.1e}"


def _markdown_row(row: Row) -> str:
    if row.errors and row.bn_calls[0] is None:
        return f"| {row.model} | {row.errors[0]} | | | | |"
    lat = "-"
    if row.latency_ms_bnfuse == row.latency_ms_bnfuse:
        lat = (f"{row.latency_ms_bnfuse:.1f} / {row.latency_ms_timm:.1f} ms; ratio {row.ratio_median:.2f}x "
               f"(IQR {row.ratio_q1:.2f}-{row.ratio_q3:.2f})")
    return (f"| {row.model} | {_triple(row.bn_calls)} | {_triple(row.conv_calls)} | {_params_cell(row.params)} "
            f"| {_e(row.rel_err64_bnfuse)} / {_e(row.rel_err64_timm)}{' *' if row.notes else ''} | {lat} |")


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated timm model names (default: %s)" % ",".join(MODELS))
    parser.add_argument("--iters", type=int, default=20, help="timed pairs of calls per model (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed pairs of calls first (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--json", metavar="FILE", help="also write the data as JSON")
    parser.add_argument("--unwrap", action="store_true",
                        help="fuse with unwrap=True (wrappers of one call replaced by their layer, renamed)")
    args = parser.parse_args(argv)

    info = start(args.threads)
    import timm
    import torch

    models = args.models.split(",") if args.models else MODELS
    date = datetime.date.today().isoformat()

    print(f"# bnfuse fold{' --unwrap' if args.unwrap else ''} vs timm reparameterize_model ({date})")
    print()
    print(f"{info['cpu']}, {info['cores']} cores, {info['os']}; Python {info['python']}, torch {torch.__version__}, "
          f"timm {timm.__version__}, bnfuse {info['bnfuse']}; {args.threads} threads")
    print()
    print("Random weights (pretrained=False), BN affine parameters randomised and statistics measured on a random "
          "batch; batch 1 at the model's default input size. Calls are module calls in one forward pass (original / "
          "bnfuse / timm). Errors: ||b - a|| / ||a|| against the float64 original, each transform applied to the "
          f"float64 model. Latency: float32, median of {args.iters} alternating pairs after {args.warmup} warm-up "
          "pairs; the ratio is bnfuse/timm, median of the per-pair ratios (IQR).")
    print()
    print("| model | BN calls: original / bnfuse / timm | conv calls: original / bnfuse / timm | params bnfuse / timm "
          "| rel err float64 bnfuse / timm | latency bnfuse / timm (IQR) |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for name in models:
        row = run_one(name, args.iters, args.warmup, args.unwrap)
        rows.append(row)
        print(_markdown_row(row), flush=True)
    errors = [f"{r.model}: {e}" for r in rows for e in r.errors]
    notes = [f"{r.model}: {n}" for r in rows for n in r.notes]
    if errors or notes:
        print()
        for line in errors + notes:
            print(f"- {line}")
    total = sum(r.seconds for r in rows)
    print()
    print(f"{len(rows)} model(s) in {total:.0f} s; {sum(1 for r in rows if r.errors)} with errors.")
    if args.json:
        data = {
            "date": date,
            "machine": info,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "threads": args.threads,
            "unwrap": args.unwrap,
            "iters": args.iters,
            "warmup": args.warmup,
            "rows": [{k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(r).items()} for r in rows],
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)
            fh.write("\n")
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

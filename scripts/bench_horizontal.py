"""Horizontal fusion (``--horizontal``) on and off: does one wider layer beat its siblings in eager PyTorch?

For each model (torchvision ``googlenet``, ``inception_v3``, ``resnet50``, and ``qkv``: a hand-made
attention block with separate ``query``/``key``/``value`` Linear layers, 197 tokens of 384 features),
random weights and BatchNorm statistics, eval mode: ``bnfuse_cli.fuse`` without and with
``horizontal=True``; the groups of siblings made one layer; exactness of the horizontal model against
the float64 original (both transforms applied to a float64 copy); and CPU latency at ``--batch``,
float32, ``torch.set_num_threads(THREADS)``, ``torch.inference_mode()``: ITERS pairs, the order
alternating from pair to pair, timed as ``bnfuse bench`` times them (``compare_reparam.paired``);
the medians, and the median on/off ratio with the IQR of the per-pair ratios.  Below 1.00x the wider layers are faster.

    python scripts/bench_horizontal.py [--models googlenet,qkv] [--batch 1] [--iters 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
from typing import Any

MODELS = ["googlenet", "inception_v3", "resnet50", "qkv"]


def _qkv() -> Any:
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, dim: int = 384, heads: int = 6) -> None:
            super().__init__()
            self.heads = heads
            self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.out = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
                       for t in (self.query(x), self.key(x), self.value(x)))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(y.transpose(1, 2).reshape(b, n, c))

    return Attention()


def _build(name: str, batch: int) -> "tuple[Any, Any]":
    import torch
    import torchvision

    from bnfuse_cli.inputs import randomize_bn

    g = torch.Generator().manual_seed(0)
    if name == "qkv":
        return _qkv().eval(), torch.randn(batch, 197, 384, generator=g)
    kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = getattr(torchvision.models, name)(**kw).eval()
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(batch, 3, size, size, generator=g)
    randomize_bn(model, seed=0, example=(x,))
    return model, x


def run_one(name: str, batch: int, iters: int) -> "dict[str, Any]":
    import torch
    from compare_reparam import paired  # the pairing of bnfuse bench, as compare_reparam times it

    from bnfuse_cli import fuse

    row: dict[str, Any] = {"model": name, "batch": batch}
    try:
        model, x = _build(name, batch)
        off = fuse(copy.deepcopy(model), x).model
        on_result = fuse(copy.deepcopy(model), x, horizontal=True)
        groups = on_result.plan.of("horizontal")
        row.update(ok=on_result.ok, groups=len(groups), layers=sum(len(g.layers) for g in groups))
        m64 = copy.deepcopy(model).double()
        with torch.no_grad():
            ref = m64(x.double())
            out = fuse(copy.deepcopy(m64), x.double(), horizontal=True).model(x.double())
        row["rel_err64"] = float((out - ref).norm() / ref.norm())
        t = paired(off, on_result.model, x, iters)
        row.update(off_ms=t["a_ms"], on_ms=t["b_ms"], ratio=t["ratio"], q1=t["q1"], q3=t["q3"])
    except Exception as exc:  # noqa: BLE001 - one model's failure is a row, the others go on
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return row


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated (default: %s)" % ",".join(MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=30, help="timed pairs per model (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    from compare_reparam import start

    info = start(args.threads)
    import torch

    print(f"# horizontal fusion on / off ({datetime.date.today().isoformat()}; {info['cpu']}, {info['cores']} cores, "
          f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.iters} alternating pairs)")
    print()
    print("| model | groups (layers) made one | rel err float64 | latency off / on | on/off (IQR) |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for name in (args.models.split(",") if args.models else MODELS):
        r = run_one(name, args.batch, args.iters)
        rows.append(r)
        if "error" in r:
            print(f"| {name} | error: {r['error']} | | | |", flush=True)
            continue
        print(f"| {name} | {r['groups']} ({r['layers']}) | {r['rel_err64']:.1e} | {r['off_ms']:.1f} / {r['on_ms']:.1f} ms "
              f"| {r['ratio']:.2f}x ({r['q1']:.2f}-{r['q3']:.2f}) |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": info, "threads": args.threads, "iters": args.iters, "rows": rows}, fh, indent=1)
    return 2 if any("error" in r or not r.get("ok") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-channel scales folded by bnfuse's scale pass, on the model families that use them.

For each model (torchvision ``tv:NAME`` or timm ``NAME``, random weights, no download; eval mode;
BatchNorm statistics randomised and measured on a random batch; every layer scale and ``Affine``
parameter drawn from U(0.5, 1.5), since their init values of 1e-5 or 1 would hide a wrong fold):

* the scales bnfuse folds and the ones it leaves (with the first reasons);
* elementwise multiplications (``mul``, ``addcmul``) in one forward pass at batch 1, counted with a
  ``TorchFunctionMode``, before and after;
* exactness: the transform applied to a float64 copy, ``||fused - original|| / ||original||`` on
  one float64 input (a Linear initialised to zero, ResMLP's head, gets random weights N(0, 0.02^2)
  first: a zero head would hide a wrong fold into it, such as the final ``Affine``'s);
* CPU latency at batch 1, float32, ``torch.set_num_threads(THREADS)``, ``torch.inference_mode()``:
  ITERS pairs, the order alternating from pair to pair, timed as ``bnfuse bench`` times them
  (``compare_reparam.paired``); the medians, and the median fused/original ratio with the
  interquartile range of the per-pair ratios.

    python scripts/bench_scales.py [--models tv:convnext_tiny,deit3_small_patch16_224] [--iters 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from typing import Any

MODELS = ["tv:convnext_tiny", "convnext_tiny", "deit3_small_patch16_224", "cait_xxs24_224", "resmlp_12_224",
          "efficientformer_l1"]
_SCALE_NAMES = ("gamma", "layer_scale", "ls1", "ls2", "gamma_1", "gamma_2", "alpha", "beta")


def _build(name: str) -> "tuple[Any, Any]":
    import torch

    from bnfuse_cli.inputs import randomize_bn

    if name.startswith("tv:"):
        import torchvision

        model, size = getattr(torchvision.models, name[3:])(), 224
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    model.eval()
    g = torch.Generator().manual_seed(0)
    for pname, p in model.named_parameters():
        if pname.split(".")[-1] in _SCALE_NAMES:
            with torch.no_grad():
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    for m in model.modules():  # a zero head (ResMLP's) would hide a wrong fold into it
        if isinstance(m, torch.nn.Linear) and not bool(m.weight.any()):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
    randomize_bn(model, seed=0, example=(torch.randn(2, 3, size, size, generator=g),))
    return model, torch.randn(1, 3, size, size, generator=g)


def _muls(model: Any, x: Any) -> int:
    import torch
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            Count.n += getattr(func, "__name__", "") in ("mul", "mul_", "__mul__", "__rmul__", "addcmul")
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(x)
    return Count.n


def _rel64(model: Any, fused: Any, x: Any) -> float:
    import torch

    with torch.no_grad():
        a, b = model(x), fused(x)
        if float(a.abs().max()) == 0 and hasattr(model, "forward_features") and hasattr(fused, "forward_features"):
            a, b = model.forward_features(x), fused.forward_features(x)
    return float((b - a).norm() / a.norm())


def run_one(name: str, iters: int) -> "dict[str, Any]":
    from compare_reparam import paired  # the pairing of bnfuse bench, as compare_reparam times it

    from bnfuse_cli import fuse

    row: dict[str, Any] = {"model": name}
    t0 = time.perf_counter()
    try:
        model, x = _build(name)
        result = fuse(copy.deepcopy(model), x)
        fused = result.model
        row.update(ok=result.ok, folded=len(result.plan.of("scale")), left=len(result.plan.left_by("scale")),
                   left_reasons=sorted({s.reason.split(": ")[0].split(" ", 1)[1] if " " in s.reason else s.reason
                                        for s in result.plan.left_by("scale")})[:3],
                   muls=[_muls(model, x), _muls(fused, x)])
        m64 = copy.deepcopy(model).double()
        row["rel_err64"] = _rel64(m64, fuse(copy.deepcopy(m64), x.double()).model, x.double())
        t = paired(model, fused, x, iters)
        row.update(original_ms=t["a_ms"], fused_ms=t["b_ms"], ratio=t["ratio"], q1=t["q1"], q3=t["q3"])
    except Exception as exc:  # noqa: BLE001 - one model's failure is a row, the others go on
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (default: %s)" % ",".join(MODELS))
    parser.add_argument("--iters", type=int, default=30, help="timed pairs per model (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    from compare_reparam import start

    info = start(args.threads)
    import torch

    print(f"# bnfuse scale pass ({datetime.date.today().isoformat()}; {info['cpu']}, {info['cores']} cores, "
          f"torch {torch.__version__}, {args.threads} threads, batch 1, {args.iters} alternating pairs)")
    print()
    print("| model | scales folded / left | elementwise mul per forward: before / after | rel err float64 "
          "| latency original / fused (ratio, IQR) |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for name in (args.models.split(",") if args.models else MODELS):
        r = run_one(name, args.iters)
        rows.append(r)
        if "error" in r:
            print(f"| {name} | error: {r['error']} | | | |", flush=True)
            continue
        print(f"| {name} | {r['folded']} / {r['left']} | {r['muls'][0]} / {r['muls'][1]} | {r['rel_err64']:.1e} "
              f"| {r['original_ms']:.1f} / {r['fused_ms']:.1f} ms ({r['ratio']:.2f}x, {r['q1']:.2f}-{r['q3']:.2f}) |",
              flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": info, "threads": args.threads, "iters": args.iters, "rows": rows}, fh, indent=1)
    return 2 if any("error" in r or not r.get("ok") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

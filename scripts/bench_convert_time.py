"""Wall time of ``bnfuse convert`` against the least any checked conversion must do.

Each measurement is one fresh process; the two run alternately (A B A B ...) so drift in the
machine's speed hits both alike, and the ratio is taken pair by pair:

* floor: ``import torch, torchvision``, build the model, run it once at the check's input
  (1x3x224x224) without autograd, and save its state_dict as .safetensors;
* ``python -m bnfuse_cli convert MODEL --weights none -o OUT.safetensors --force``: the same plus
  the recorded forward pass, the per-site float64 checks, the fold, the checking forward pass,
  and the streamed read-back of the written file.

Target: the convert takes at most 1.2x the floor.

    python scripts/bench_convert_time.py [--model resnet50] [--pairs 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = """
import sys, torch, torchvision
from safetensors.torch import save_file
model = torchvision.models.get_model(sys.argv[1]).eval()
with torch.no_grad():
    model(torch.randn(1, 3, 224, 224))
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
"""


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        floor_cmd = [sys.executable, "-c", FLOOR, args.model, str(Path(tmp) / "floor.safetensors")]
        bnfuse_cmd = [sys.executable, "-m", "bnfuse_cli", "convert", args.model, "--weights", "none",
                      "-o", str(Path(tmp) / "fused.safetensors"), "--force"]
        _time(floor_cmd), _time(bnfuse_cmd)  # warm the page cache
        floor, conv = [], []
        for _ in range(args.pairs):
            floor.append(_time(floor_cmd))
            conv.append(_time(bnfuse_cmd))
    ratios = sorted(c / f for c, f in zip(conv, floor))
    result = {
        "date": datetime.date.today().isoformat(),
        "model": args.model,
        "pairs": args.pairs,
        "floor_s": {"median": statistics.median(floor), "min": min(floor), "max": max(floor)},
        "convert_s": {"median": statistics.median(conv), "min": min(conv), "max": max(conv)},
        "ratio": {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]},
        "target": 1.2,
    }
    print(f"{args.model}: floor (import, build, one forward, save) {result['floor_s']['median']:.2f} s "
          f"({min(floor):.2f}-{max(floor):.2f}); bnfuse convert {result['convert_s']['median']:.2f} s "
          f"({min(conv):.2f}-{max(conv):.2f}); ratio {result['ratio']['median']:.3f}x "
          f"({ratios[0]:.3f}-{ratios[-1]:.3f}), target <= 1.2x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

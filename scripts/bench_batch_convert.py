"""Converting several checkpoints in one ``bnfuse convert`` call vs one call per checkpoint.

Two resnet18 state_dicts (random weights, randomised BatchNorm statistics) are saved with
``torch.save``; then, alternating, ``bnfuse convert a.pth b.pth --arch resnet18 --out-dir DIR``
and two separate ``bnfuse convert X.pth --arch resnet18 -o ...`` calls run as fresh processes
(the real ``bnfuse`` entry point).  Median wall time of several rounds; the difference is
mostly the interpreter and torch start-up that one call pays once.

    python scripts/bench_batch_convert.py [--rounds 3] [--arch resnet18] [--count 2]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BNFUSE = str(Path(PY).parent / "bnfuse")

MAKE = """
import sys, torch
from bnfuse_cli.inputs import randomize_bn
from bnfuse_cli.files.models import build
arch, *paths = sys.argv[1:]
for i, path in enumerate(paths):
    torch.manual_seed(i)
    model = build(arch).eval()
    randomize_bn(model, seed=i)
    torch.save(model.state_dict(), path)
"""


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--count", type=int, default=2, help="number of checkpoints")
    opts = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from bnfuse_cli.workflows.bench import machine_info

    info = machine_info()
    print(f"# bench_batch_convert: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['os']}; python {info['python']}, torch {info['torch']}")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sources = [tmp / f"ckpt{i}.pth" for i in range(opts.count)]
        subprocess.run([PY, "-c", MAKE, opts.arch, *map(str, sources)], check=True, cwd=ROOT)
        size = sum(p.stat().st_size for p in sources)
        print(f"{opts.count} {opts.arch} state_dicts ({size / 2**20:.0f} MiB in all), .pth outputs, "
              f"{opts.rounds} alternating rounds, median (min-max) wall time\n")
        out_batch, out_single = tmp / "batch", tmp / "single"
        out_batch.mkdir()
        out_single.mkdir()
        batch_cmd = [BNFUSE, "convert", *map(str, sources), "--arch", opts.arch, "--out-dir", str(out_batch), "--force"]
        single_cmds = [[BNFUSE, "convert", str(s), "--arch", opts.arch, "-o", str(out_single / f"{s.stem}.fused.pth"),
                        "--force"] for s in sources]
        batch, single, start = [], [], []
        for i in range(opts.rounds):
            for which in (("batch", "single") if i % 2 == 0 else ("single", "batch")):
                if which == "batch":
                    batch.append(timed(batch_cmd))
                else:
                    single.append(sum(timed(c) for c in single_cmds))
            start.append(timed([PY, "-c", "import torch, torchvision"]))
        written = sorted(p.name for p in out_batch.iterdir())

    def fmt(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})"

    print("| how | wall time |")
    print("| --- | --- |")
    print(f"| one call: `bnfuse convert {' '.join(s.name for s in sources)} --arch {opts.arch} --out-dir DIR` | {fmt(batch)} |")
    print(f"| {opts.count} separate `bnfuse convert X.pth --arch {opts.arch} -o ...` calls (sum) | {fmt(single)} |")
    print(f"| for reference: `python -c 'import torch, torchvision'` | {fmt(start)} |")
    saved = statistics.median(single) - statistics.median(batch)
    print(f"\none call saves {saved:.2f} s ({saved / statistics.median(single) * 100:.0f}%) for {opts.count} checkpoints; "
          f"--out-dir wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

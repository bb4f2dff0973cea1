"""How long does ``bnfuse --help`` take, and does it import torch?  (Target: well under 0.5 s.)

Runs the installed ``bnfuse`` entry point (next to this Python) several times as a fresh
process and prints the median wall time, next to ``python -c pass`` and ``python -c "import
torch"`` for scale.  Then proves torch stays out: one process runs the CLI's ``--help`` and
another ``import bnfuse_cli``, and each reports whether ``torch`` reached ``sys.modules``;
``python -X importtime`` gives the cumulative import time of the CLI module.

    python scripts/bench_help.py [--runs 9]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BNFUSE = Path(PY).parent / "bnfuse"

HELP_IN_PROCESS = """
import sys
sys.argv = ["bnfuse", "--help"]
from bnfuse_cli.cli import main
try:
    main()
except SystemExit:
    pass
print("TORCH_IMPORTED", "torch" in sys.modules, file=sys.stderr)
"""
IMPORT_PACKAGE = "import sys, bnfuse_cli; print('torch' in sys.modules)"


def wall(cmd: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed with exit {proc.returncode}:\n{proc.stderr}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    opts = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from bnfuse_cli.workflows.bench import machine_info  # standard library only: no torch here

    info = machine_info()
    print(f"# bench_help: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['os']}; python {info['python']}, "
          f"torch {info['torch']} (installed; version read without importing it)")
    print(f"{opts.runs} fresh processes each, median (min-max) wall time\n")

    rows = [
        ("bnfuse --help", [str(BNFUSE), "--help"]),
        ("bnfuse bench --help", [str(BNFUSE), "bench", "--help"]),
        ("python -c pass (interpreter start)", [PY, "-c", "pass"]),
        ("python -c 'import torch' (for scale)", [PY, "-c", "import torch"]),
    ]
    results = {}
    print("| command | wall time |")
    print("| --- | --- |")
    for label, cmd in rows:
        ts = wall(cmd, opts.runs)
        wall(cmd, 1)  # alternate a little: nothing benefits from running last
        results[label] = statistics.median(ts)
        print(f"| `{label}` | {statistics.median(ts) * 1e3:.0f} ms ({min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f}) |")

    proc = subprocess.run([PY, "-c", HELP_IN_PROCESS], capture_output=True, text=True, cwd=ROOT)
    help_torch = "TORCH_IMPORTED True" in proc.stderr
    if "TORCH_IMPORTED" not in proc.stderr:
        raise SystemExit(f"the in-process --help check did not run:\n{proc.stderr}")
    pkg = subprocess.run([PY, "-c", IMPORT_PACKAGE], capture_output=True, text=True, cwd=ROOT)
    pkg_torch = pkg.stdout.strip() == "True"
    imp = subprocess.run([PY, "-X", "importtime", "-c", "import bnfuse_cli.cli"], capture_output=True, text=True,
                         cwd=ROOT)
    cli_us = next((int(ln.split("|")[1]) for ln in imp.stderr.splitlines()
                   if ln.rstrip().endswith("| bnfuse_cli.cli")), -1)
    torch_lines = [ln for ln in imp.stderr.splitlines() if ln.rstrip().endswith("| torch")]

    print(f"\ntorch imported by `bnfuse --help`: {help_torch}")
    print(f"torch imported by `import bnfuse_cli`: {pkg_torch}")
    print(f"`python -X importtime`: bnfuse_cli.cli imports in {cli_us / 1e3:.0f} ms cumulative; "
          f"torch appears in its import tree: {bool(torch_lines)}")
    target = 0.5
    ok = results["bnfuse --help"] < target and not help_torch and not pkg_torch and not torch_lines
    print(f"\n{'PASS' if ok else 'FAIL'}: bnfuse --help median {results['bnfuse --help'] * 1e3:.0f} ms "
          f"(target < {target * 1e3:.0f} ms), torch not imported")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory (RSS) of ``bnfuse convert`` on a large model, against what it must hold anyway.

Every measurement is a fresh process that records its own peak RSS (``VmHWM`` from
/proc/self/status, in an atexit hook: before interpreter teardown, which alone adds ~120 MiB
with this torch build), started by a small parent that also reports
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (teardown included).  ``bnfuse convert`` runs
through ``bnfuse_cli.cli.main``, the function the ``bnfuse`` console script calls:

* baseline: ``import torch, torchvision`` and nothing else (the interpreter + torch floor);
* the model built and nothing else, and built and run once at 1x3x224x224 (the floor of any
  conversion that checks its result);
* ``bnfuse convert MODEL --weights none`` (the real entry point) writing .safetensors, .pth,
  and checking only (no -o);
* torch.fx's fuser for comparison: build, ``fuse(model)`` (it deep-copies), save the state_dict.

Target: bnfuse adds at most 0.2 x the model's size (parameters + buffers) to what building the
model and running it once at the check's input costs anyway (the literal "baseline + 1.2 x
model" is printed too: a forward pass of a large model alone can take more than 0.2 x).  Then one more
process runs ``convert()`` with each phase wrapped, resetting the peak counter
(``/proc/self/clear_refs``) at the start of each, to show where the memory goes.

Last, the Python API alone on a larger model (``--fuse-model``, regnet_y_32gf by default), the
plain way: in a fresh process, build the model (``torchvision.models.NAME(weights=None)``, seeded,
random BatchNorm statistics), reset the RSS peak, then either ``bnfuse_cli.fuse(model, x,
inplace=True)`` or one no-grad forward pass on the same 1x3x224x224 input, and take the peak over
the RSS before; ``--reps`` alternating pairs (the peak of one forward pass moves by tens of MiB from
run to run with the threads' timing); printed as MiB and as % of the model's parameters+buffers,
each pair and the medians.  Target: at most 5% of the model, with every fold site checked.  (An
earlier version compared the peaks of whole processes, build included: the build's own transient
peak hid part of the fold's cost, and it reported 3.9% where this measure gave 8.4%.)

    python scripts/bench_memory.py [--model regnet_y_16gf] [--keep DIR]
    python scripts/bench_memory.py --fuse-only [--fuse-model regnet_y_32gf] [--reps 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MiB = 2**20

PARENT = """
import json, resource, subprocess, sys, time
cmd = json.loads(sys.argv[1])
t0 = time.perf_counter()
proc = subprocess.run(cmd, capture_output=True, text=True)
wall = time.perf_counter() - t0
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": proc.returncode, "peak_kib": peak_kib, "wall": wall, "stderr": proc.stderr[-2000:]}))
"""

#: runs a bnfuse command line (via the entry point's ``main``) or Python code, and writes the
#: process's peak RSS (VmHWM) from an atexit hook, i.e. before interpreter teardown, which by
#: itself raises RSS by ~120 MiB with this torch build (so ru_maxrss is reported too)
RUNNER = """
import atexit, sys
hwm_file, kind, payload, *rest = sys.argv[1:]
def report():
    with open("/proc/self/status") as fh:
        hwm = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM"))
    with open(hwm_file, "w") as fh:
        fh.write(str(hwm * 1024))
atexit.register(report)
if kind == "bnfuse":
    sys.argv = ["bnfuse", payload, *rest]
    from bnfuse_cli.cli import main
    main()
else:
    sys.argv = ["-c", *rest]
    exec(compile(payload, "<bench_memory>", "exec"), {"__name__": "__main__"})
"""

BASELINE = "import torch, torchvision"

BUILD = """
import sys, torch
from bnfuse_cli.files.models import build
m = build(sys.argv[1]).eval()
size = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
params = sum(p.numel() for p in m.parameters())
print(size, params)
"""

BUILD_RUN = """
import sys, torch
from bnfuse_cli.files.models import build
m = build(sys.argv[1]).eval()
with torch.no_grad():
    m(torch.randn(1, 3, 224, 224))  # what any check of the model costs: one forward at convert's input
"""

FX = """
import sys, torch
from torch.fx.experimental.optimization import fuse
from bnfuse_cli.files.models import build
m = build(sys.argv[1]).eval()
fused = fuse(m)  # inplace=False: deep-copies the model first
torch.save(fused.state_dict(), sys.argv[2])
"""

PHASES = """
import json, sys
import torch

def status():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out

def reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")

rows, stack, counter = [], [], [0]

def wrap(owner, attr, label):
    real = getattr(owner, attr)
    def wrapped(*a, **k):
        counter[0] += 1
        start = counter[0]
        before = status()["VmRSS"]
        stack.append(0)
        reset_peak()
        try:
            return real(*a, **k)
        finally:
            inner = stack.pop()
            st = status()
            peak = max(st["VmHWM"], inner)
            rows.append((start, len(stack), label, before, peak, st["VmRSS"]))
            if stack:
                stack[-1] = max(stack[-1], peak)
            reset_peak()
    setattr(owner, attr, wrapped)

import importlib
import safetensors.torch
ck = importlib.import_module("bnfuse_cli.files.write")
cv = importlib.import_module("bnfuse_cli.workflows.convert")
fz = importlib.import_module("bnfuse_cli.workflows.fuse")
so = importlib.import_module("bnfuse_cli.workflows.source")
sites = importlib.import_module("bnfuse_cli.checks.sites")
wrap(so, "load_source", "load_source (build model, random init)")
wrap(cv, "fuse_prepared", "fuse (total: record, site references, fold, check)")
wrap(fz, "analyse", "analyse (recorded forward pass, 224x224, input crops kept)")
wrap(sites.SiteProbe, "reference", "site references (float64, one layer at a time)")
wrap(fz, "apply_plan", "apply_plan (fold in place)")
wrap(sites.SiteProbe, "check", "site checks (float64, one layer at a time)")
wrap(cv, "write_checkpoint", "write_checkpoint (total)")
wrap(safetensors.torch, "save_file", "safetensors save_file")
wrap(ck, "verify_written", "read-back verification")
reset_peak()
report = cv.convert(sys.argv[1], sys.argv[2], weights="none", force=True)
print(json.dumps({"rows": rows, "end": status()}))
"""


#: the fold's cost the plain way: a fresh process builds the model with random BatchNorm statistics, resets
#: its RSS peak (``/proc/self/clear_refs``), then either fuses it in place or runs it once, and reports its
#: peak over the RSS it had before; measured after the build, so the build's own transient peak (weight
#: initialisation) cannot hide any of it, as the peaks of whole processes could
FUSE_PLAIN = """
import json, sys, torch, torchvision
from bnfuse_cli.inputs import randomize_bn
def status():
    with open("/proc/self/status") as fh:
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in fh if l.startswith(("VmRSS", "VmHWM"))}
torch.manual_seed(0)
m = getattr(torchvision.models, sys.argv[1])(weights=None).eval()
randomize_bn(m, seed=0)
x = torch.randn(1, 3, 224, 224)
size = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))  # before folding
import gc
gc.collect()
before = status()["VmRSS"]
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
info = {"size": size}
if sys.argv[2] == "fuse":
    import bnfuse_cli
    result = bnfuse_cli.fuse(m, x, inplace=True)
    info.update(sites=len(result.verdict.sites), ok=result.ok, checked=sum(s.skipped is None for s in result.verdict.sites))
else:
    with torch.no_grad():
        m(x)
info["extra"] = status()["VmHWM"] - before
with open(sys.argv[3], "w") as fh:
    json.dump(info, fh)
"""


def fuse_vs_forward(name: str, reps: int, out: Path) -> None:
    """``fuse(model, x, inplace=True)`` against one forward pass, each measured after building the model
    (:data:`FUSE_PLAIN`), ``reps`` alternating pairs of fresh processes."""
    import statistics

    print(f"\n`bnfuse_cli.fuse(model, x, inplace=True)` on {name} (random BatchNorm statistics) at 1x3x224x224 "
          f"float32 against one forward pass (`torch.no_grad()`), each measured from the RSS after building the "
          f"model, fresh processes alternating, {reps} pairs:\n")
    print("| pair | one forward | fuse in place | fuse - forward | % of the model | sites checked |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    floors, fused, info = [], [], {}
    for i in range(reps):
        measure("python", [FUSE_PLAIN, name, "forward", str(out / "fwd.json")], out / "hwm.txt")
        floors.append(float(json.loads((out / "fwd.json").read_text())["extra"]))
        measure("python", [FUSE_PLAIN, name, "fuse", str(out / "fuse.json")], out / "hwm.txt")
        info = json.loads((out / "fuse.json").read_text())
        fused.append(float(info["extra"]))
        added = fused[-1] - floors[-1]
        print(f"| {i + 1} | {floors[-1] / MiB:,.0f} MiB | {fused[-1] / MiB:,.0f} MiB | {added / MiB:+.0f} MiB | "
              f"{100 * added / info['size']:+.1f}% | {info['checked']}/{info['sites']} |")
    floor, peak = statistics.median(floors), statistics.median(fused)
    pct = 100 * (peak - floor) / info["size"]
    print(f"\nmodel {info['size'] / MiB:.0f} MiB (parameters+buffers); medians: one forward {floor / MiB:,.0f} MiB, "
          f"fuse {peak / MiB:,.0f} MiB above the built model: fuse adds {(peak - floor) / MiB:+.0f} MiB = {pct:+.1f}% "
          f"of the model ({'within' if pct <= 5 else 'OVER'} the 5% target); {info['checked']} of {info['sites']} "
          f"fold sites checked, verdict {'ok' if info['ok'] else 'NOT ok'}")


def measure(kind: str, args: list[str], hwm_file: Path) -> dict:
    """Run one fresh process; its peak RSS before teardown (``hwm``) and as ru_maxrss."""
    cmd = [PY, "-c", RUNNER, str(hwm_file), kind, *args]
    proc = subprocess.run([PY, "-c", PARENT, json.dumps(cmd)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"measuring {cmd} failed:\n{proc.stderr}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"{' '.join(args)} exited {res['rc']}:\n{res['stderr']}")
    res["hwm"] = int(hwm_file.read_text())
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="regnet_y_16gf")
    parser.add_argument("--keep", type=Path, help="write the outputs here instead of a temporary folder")
    parser.add_argument("--fuse-model", default="regnet_y_32gf", help="torchvision model for the fuse-vs-forward figure")
    parser.add_argument("--reps", type=int, default=5, help="alternating pairs for the fuse-vs-forward figure")
    parser.add_argument("--fuse-only", action="store_true", help="only the fuse-vs-forward figure")
    opts = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from bnfuse_cli.workflows.bench import machine_info

    info = machine_info()
    print(f"# bench_memory: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['os']}; python {info['python']}, torch {info['torch']}")

    with tempfile.TemporaryDirectory() as tmp_name:
        out = opts.keep or Path(tmp_name)
        out.mkdir(parents=True, exist_ok=True)
        if opts.fuse_only:
            fuse_vs_forward(opts.fuse_model, opts.reps, out)
            return 0
        size_proc = subprocess.run([PY, "-c", BUILD, opts.model], capture_output=True, text=True, cwd=ROOT, check=True)
        size, params = map(int, size_proc.stdout.split())
        print(f"model: {opts.model}, {params / 1e6:.1f}M parameters, {size / MiB:.0f} MiB of parameters+buffers "
              "(float32, random weights); convert's check input is its default 1x3x224x224\n")

        convert = ["convert", opts.model, "--weights", "none"]
        runs = [
            ("baseline: import torch, torchvision", "python", [BASELINE]),
            ("build the model only", "python", [BUILD, opts.model]),
            ("build + one plain forward at 1x3x224x224 (no bnfuse)", "python", [BUILD_RUN, opts.model]),
            ("bnfuse convert -o fused.safetensors", "bnfuse", [*convert, "-o", str(out / "fused.safetensors"), "--force"]),
            ("bnfuse convert -o fused.pth", "bnfuse", [*convert, "-o", str(out / "fused.pth"), "--force"]),
            ("bnfuse convert (check only, no -o)", "bnfuse", convert),
            ("torch.fx fuse (deep copy) + torch.save", "python", [FX, opts.model, str(out / "fx.pth")]),
        ]
        peaks: dict[str, float] = {}
        print("peak RSS = VmHWM read at exit, before interpreter teardown; ru_maxrss (includes teardown) for reference\n")
        print("| process | peak RSS | above baseline | / model size | ru_maxrss | wall |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        base = 0.0
        for label, kind, args in runs:
            r = measure(kind, args, out / "hwm.txt")
            peak = float(r["hwm"])
            if not base:
                base = peak
            peaks[label] = peak
            print(f"| {label} | {peak / MiB:.0f} MiB | {(peak - base) / MiB:.0f} MiB | "
                  f"{(peak - base) / size:.2f}x | {r['peak_kib'] / 1024:.0f} MiB | {r['wall']:.1f} s |")
        # Any conversion that checks its result runs the model: the floor is the model plus one forward pass.
        # bnfuse's own cost is what it adds on top of that floor; the target is at most 0.2 x the model
        # (no copy of the weights), i.e. the model in memory at most 1.2 times over.
        floor = peaks["build + one plain forward at 1x3x224x224 (no bnfuse)"]
        print(f"\nfloor (model + one forward): {floor / MiB:.0f} MiB; target: floor + 0.2 x model = "
              f"{(floor + 0.2 * size) / MiB:.0f} MiB (and, literally, baseline + 1.2 x model = "
              f"{(base + 1.2 * size) / MiB:.0f} MiB)")
        for label in [lbl for lbl, _, _ in runs if lbl.startswith(("bnfuse", "torch.fx"))]:
            added = peaks[label] - floor
            verdict = "within" if added <= 0.2 * size else "OVER"
            print(f"  {label}: {verdict} target: {added / MiB:+.0f} MiB over the floor ({added / size:+.2f}x model); "
                  f"{(peaks[label] - base) / size:.2f}x model above baseline")

        proc = subprocess.run([PY, "-c", PHASES, opts.model, str(out / "phases.safetensors")], capture_output=True,
                              text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(f"\nphase breakdown failed:\n{proc.stderr[-2000:]}")
            return 1
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        print("\nwhere convert -o .safetensors holds memory (each phase's own peak; nested phases indented):\n")
        print("| phase | RSS before | peak during | RSS after |")
        print("| --- | ---: | ---: | ---: |")
        for _, depth, label, before, peak, after in sorted(data["rows"]):
            pad = "&nbsp;&nbsp;" * depth
            print(f"| {pad}{label} | {before / MiB:.0f} MiB | {peak / MiB:.0f} MiB | {after / MiB:.0f} MiB |")
        fuse_vs_forward(opts.fuse_model, opts.reps, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

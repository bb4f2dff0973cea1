"""Deployable exports over the model zoo: which models become a ``.pt2`` and an ``.onnx`` that pass
the read-back proof, the reason for each that does not, and that no export is ever written wrong.

Models: every torchvision classification model (``torchvision.models.list_models(module=
torchvision.models)``) that holds a BatchNorm layer, plus ``timm:NAME`` for the ten
re-parameterisable timm families of ``scripts/compare_reparam.py``; smallest first by parameter
count (counted on the meta device, no weights are made), so that a time budget reaches as many as
it can.  For each model and each suffix (``.pt2``, ``.onnx``), through the real entry point as
fresh processes:

1. ``python -m bnfuse_cli convert NAME --weights none -o DIR/NAME.SUFFIX`` (per-command timeout):
   exit code, wall time, the file's size, and on failure the ``error:`` paragraph from stderr;
2. "never written wrong": a nonzero exit (or a timeout) must leave no file, and no temporary file
   of bnfuse's either; an exit 0 must leave the file;
3. every file written is proven again by ``python -m bnfuse_cli verify NAME DIR/NAME.SUFFIX
   --weights none --samples 1`` (exit 0), which also rebuilds the original from the seed the file
   records; then the file is deleted (disk).

A model counts as exported to a suffix when convert exits 0 and verify exits 0.  A written file
that verify refuses, or a file left by a failed convert, is **wrong** (the script exits 1); a written
file on which verify itself crashes (a traceback, not a verdict) is reported as unproven.  The
JSON is rewritten after each model (an interrupted run keeps what finished); models the budget
did not reach are listed as such.

    python scripts/export_zoo.py [--budget-min 45] [--timeout 600] [--models resnet18,timm:repvgg_a0]
                                 [--json out/export_zoo.json] [--markdown out/export_zoo.md] [--resume]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SUFFIXES = (".pt2", ".onnx")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_reparam import MODELS as TIMM_REPARAM  # noqa: E402  (the ten families, one list)


def _meta_build(name: str) -> Any:
    """``name`` built without weights: on the meta device, else (a builder that reads its own tensors,
    like RegNet's width rule) with every parameter and buffer moved to meta as it is registered."""
    import torch
    from torch import nn

    def make() -> Any:
        if name.startswith("timm:"):
            import timm

            return timm.create_model(name[5:], pretrained=False)
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    try:
        with torch.device("meta"):
            return make()
    except Exception:
        pass
    reg_p, reg_b = nn.Module.register_parameter, nn.Module.register_buffer

    def param(self: Any, n: str, p: Any) -> None:
        reg_p(self, n, None if p is None else nn.Parameter(p.to("meta"), requires_grad=p.requires_grad))

    def buffer(self: Any, n: str, b: Any, persistent: bool = True) -> None:
        reg_b(self, n, None if b is None else b.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = param, buffer  # type: ignore[method-assign]
    try:
        return make()
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = reg_p, reg_b  # type: ignore[method-assign]


def zoo(only: "list[str] | None") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(models to run, smallest first: name, params, BatchNorm layers; models left out and why)."""
    import torchvision
    from torch import nn

    names = only or ([*torchvision.models.list_models(module=torchvision.models)]
                     + [f"timm:{n}" for n in TIMM_REPARAM])
    run, skipped = [], []
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = _meta_build(name)
        except Exception as exc:  # noqa: BLE001 (reported, the others go on)
            run.append({"model": name, "params": None, "bn": None, "count_error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        params = sum(p.numel() for p in model.parameters())
        (run if bn else skipped).append({"model": name, "params": params, "bn": bn})
        del model
    run.sort(key=lambda r: (r["params"] is None, r["params"] or 0, r["model"]))
    return run, skipped


def _error_paragraph(stderr: str) -> str:
    """The ``error:`` paragraph bnfuse prints (one line, soft-wrapped), else the last stderr line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", stderr)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            para = [line[len("error:"):].strip()]
            for more in lines[i + 1:]:
                if not more.strip() or more.startswith(("note:", "warning:", "error:")):
                    break
                para.append(more.strip())
            return " ".join(para)
    tail = [ln for ln in lines if ln.strip()]
    return tail[-1].strip()[:600] if tail else ""


def _run(cmd: list[str], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, COLUMNS="200", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = None
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"rc": rc, "seconds": round(seconds, 1)}
    if "Traceback (most recent call last)" in stderr:
        out["crashed"] = True
        out["stderr_tail"] = stderr[-3000:]
    if rc is None:
        out["reason"] = f"timed out after {timeout:g} s"
    elif rc != 0:
        out["reason"] = _error_paragraph(stderr)
    return out


def one(name: str, suffix: str, workdir: Path, timeout: float) -> dict[str, Any]:
    """Convert ``name`` to ``suffix``, check what is on disk, verify what was written, delete it."""
    stem = name.replace(":", "_")
    path = workdir / f"{stem}{suffix}"
    for leftover in workdir.iterdir():
        leftover.unlink()
    rec: dict[str, Any] = {"suffix": suffix}
    conv = _run([PY, "-m", "bnfuse_cli", "convert", name, "--weights", "none", "-o", str(path)], timeout)
    rec["convert"] = conv
    others = sorted(p.name for p in workdir.iterdir() if p != path)
    exists = path.exists()
    rec["bytes"] = path.stat().st_size if exists else None
    rec["stray_files"] = others
    problems = []
    if others:
        problems.append(f"files left besides the output: {', '.join(others)}")
    if conv["rc"] != 0 and exists:
        problems.append(f"convert exited {conv['rc']} but left {path.name}")
    if conv["rc"] == 0 and not exists:
        problems.append("convert exited 0 but wrote no file")
    if conv["rc"] == 0 and exists:
        ver = _run([PY, "-m", "bnfuse_cli", "verify", name, str(path), "--weights", "none", "--samples", "1"],
                   timeout)
        rec["verify"] = ver
        if ver["rc"] != 0 and ver.get("crashed"):
            # verify itself raised: the file is not refused, but not proven by verify either
            rec["unproven"] = f"verify crashed (exit {ver['rc']}): {ver.get('reason', '')}"
        elif ver["rc"] != 0:
            problems.append(f"the written file fails verify (exit {ver['rc']}): {ver.get('reason', '')}")
    for leftover in workdir.iterdir():
        leftover.unlink()
    rec["wrong"] = problems
    rec["ok"] = conv["rc"] == 0 and exists and not problems and "unproven" not in rec
    return rec


def reason_key(reason: str) -> str:
    """A failure's reason with the model-specific parts (numbers, names in quotes, sizes) blurred, to group."""
    m = re.match(r"the fused model cannot be exported (?:with torch\.export|to ONNX) \((\w+): (.*)", reason)
    core = f"{m.group(1)}: {m.group(2)}" if m else reason
    core = core.split("; nothing was written")[0]
    core = re.sub(r"\d+(\.\d+)?", "N", core)
    core = re.sub(r"'[^']*'|`[^`]*`|\"[^\"]*\"", "'…'", core)
    return core[:160]


def markdown(report: dict[str, Any]) -> str:
    rows = report["models"]
    lines = [f"# export_zoo: {report['date']}", "", f"machine: {report['machine']}", ""]
    for suffix in SUFFIXES:
        done = [r for r in rows if suffix in r["results"]]
        ok = [r for r in done if r["results"][suffix]["ok"]]
        lines.append(f"- **{suffix}**: {len(ok)} of {len(done)} reached exported and passed verify")
    wrong = [(r["model"], s, w) for r in rows for s, x in r["results"].items() for w in x["wrong"]]
    lines.append(f"- written wrong (a file left by a failure, a stray file, or a written file verify refuses): "
                 f"**{len(wrong)}**")
    unproven = [f"{r['model']} {s}" for r in rows for s, x in r["results"].items() if "unproven" in x]
    if unproven:
        lines.append(f"- written, but verify crashed on them (not refused, not proven by verify): {', '.join(unproven)}")
    if report["not_reached"]:
        lines.append(f"- not reached within the budget ({report['budget_min']:g} min): "
                     + ", ".join(report["not_reached"]))
    lines += ["", "| model | params | BN | .pt2 | .pt2 s (convert/verify) | .pt2 MiB | .onnx | .onnx s (convert/verify)"
              " | .onnx MiB |", "|---|---:|---:|---|---:|---:|---|---:|---:|"]
    for r in rows:
        cells = [r["model"], f"{r['params'] / 1e6:.1f}M" if r["params"] else "?", str(r["bn"])]
        for suffix in SUFFIXES:
            x = r["results"].get(suffix)
            if x is None:
                cells += ["not reached", "", ""]
                continue
            rc = x["convert"]["rc"]
            state = "ok" if x["ok"] else ("WRONG" if x["wrong"] else "verify crashed" if "unproven" in x
                                          else f"exit {rc}" if rc is not None else "timeout")
            secs = f"{x['convert']['seconds']:.0f}" + (f"/{x['verify']['seconds']:.0f}" if "verify" in x else "")
            cells += [state, secs, f"{x['bytes'] / 2**20:.1f}" if x["bytes"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Failures by reason", ""]
    for suffix in SUFFIXES:
        groups: dict[str, list[str]] = defaultdict(list)
        example: dict[str, str] = {}
        for r in rows:
            x = r["results"].get(suffix)
            if x is None or x["ok"]:
                continue
            reason = x["convert"].get("reason") or x.get("unproven") or "; ".join(x["wrong"])
            key = reason_key(reason)
            groups[key].append(r["model"])
            example.setdefault(key, reason)
        lines.append(f"### {suffix}")
        lines.append("")
        if not groups:
            lines += ["none", ""]
        for key, models in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- {len(models)}: {', '.join(models)}")
            lines.append(f"  - {example[key]}")
        lines.append("")
    for w in wrong:
        lines.append(f"- WRONG {w[0]} {w[1]}: {w[2]}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-min", type=float, default=45.0, help="no new model starts after this many minutes")
    parser.add_argument("--timeout", type=float, default=600.0, help="per command, seconds")
    parser.add_argument("--models", help="comma-separated names (default: the whole zoo)")
    parser.add_argument("--json", default="out/export_zoo.json")
    parser.add_argument("--markdown", default="out/export_zoo.md")
    parser.add_argument("--resume", action="store_true",
                        help="keep the models already in --json and go on with the rest (the budget counts anew)")
    opts = parser.parse_args()

    t_start = time.monotonic()
    models, no_bn = zoo(opts.models.split(",") if opts.models else None)
    print(f"{len(models)} models with BatchNorm ({len(no_bn)} without, left out); "
          f"counted in {time.monotonic() - t_start:.0f} s", flush=True)
    report: dict[str, Any] = {
        "date": f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
        "budget_min": opts.budget_min, "timeout_s": opts.timeout,
        "without_batchnorm": [r["model"] for r in no_bn],
        "models": [], "not_reached": [],
    }
    json_path, md_path = ROOT / opts.json, ROOT / opts.markdown
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)

    if opts.resume and json_path.exists():
        earlier = json.loads(json_path.read_text())
        report["models"] = earlier["models"]
        report["date"] = f"{earlier['date']} to {report['date']}"
        report["budget_min"] = earlier["budget_min"] + opts.budget_min
        report["seconds_before"] = earlier.get("seconds_before", 0) + earlier.get("seconds", 0)
        done = {r["model"] for r in report["models"]}
        models = [m for m in models if m["model"] not in done]
        print(f"resuming: {len(done)} models kept from {json_path}, {len(models)} to go", flush=True)

    def save() -> None:
        json_path.write_text(json.dumps(report, indent=1))
        md_path.write_text(markdown(report))

    workdir = Path(tempfile.mkdtemp(prefix="export_zoo."))
    try:
        for i, entry in enumerate(models):
            if time.monotonic() - t_start > opts.budget_min * 60:
                report["not_reached"] = [m["model"] for m in models[i:]]
                break
            row = dict(entry, results={})
            for suffix in SUFFIXES:
                rec = one(entry["model"], suffix, workdir, opts.timeout)
                row["results"][suffix] = rec
                state = "ok" if rec["ok"] else ("WRONG" if rec["wrong"] else "unproven" if "unproven" in rec
                                                else "refused")
                print(f"[{(time.monotonic() - t_start) / 60:5.1f} min] {entry['model']:28s} {suffix:6s} {state:8s}"
                      f" convert exit {rec['convert']['rc']} {rec['convert']['seconds']:.0f} s"
                      + (f", verify exit {rec['verify']['rc']} {rec['verify']['seconds']:.0f} s" if "verify" in rec else "")
                      + (f": {rec['convert'].get('reason', '')[:200]}" if rec["convert"]["rc"] != 0 else "")
                      + (f": {rec['unproven']}" if "unproven" in rec else "")
                      + "".join(f"\n    WRONG: {w}" for w in rec["wrong"]), flush=True)
            report["models"].append(row)
            save()
        report["seconds"] = round(time.monotonic() - t_start) + report.get("seconds_before", 0)
        save()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows = report["models"]
    print()
    for suffix in SUFFIXES:
        ok = sum(r["results"][suffix]["ok"] for r in rows)
        print(f"{suffix}: {ok} of {len(rows)} exported and passed verify")
    wrong = sum(bool(x["wrong"]) for r in rows for x in r["results"].values())
    print(f"written wrong: {wrong}")
    unproven = [f"{r['model']} {s}" for r in rows for s, x in r["results"].items() if "unproven" in x]
    print(f"written, verify crashed: {len(unproven)}" + (f" ({', '.join(unproven)})" if unproven else ""))
    if report["not_reached"]:
        print(f"not reached ({opts.budget_min:g} min budget): {', '.join(report['not_reached'])}")
    print(f"wrote {json_path} and {md_path}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

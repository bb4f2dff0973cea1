"""Hand-made bugs (mutants) that the default suite once let through, and the tests that now kill them.

Each mutant is a one-line textual replacement in the package, found by an exact pattern that must occur
exactly once (anything else stops the script: the code moved and the mutant must be updated).  The
repository is copied to a temporary directory (without .venv, .git and caches); each mutant is applied to
that copy, its named tests run there with this Python and ``PYTHONPATH`` pointing at the copy (checked:
``bnfuse_cli`` must import from the copy, mutated line included), and the file is restored.  The named
tests are first run on the unmutated copy, where they must pass.

    .venv/bin/python scripts/mutants.py            # all
    .venv/bin/python scripts/mutants.py --only site-prefix zero-pads-all

Exit status: 0 when every mutant that could run was killed, 1 when one survived, 2 when the script could
not do its job (pattern not found once, tests not passing unmutated, the copy not imported).  A mutant that
only a CUDA GPU can show is listed and skipped where CUDA is unavailable.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str
    pattern: str
    replacement: str
    tests: tuple[str, ...]
    needs_cuda: bool = False


MUTANTS = [
    Mutant(
        "zero-pads-all", "a conv padded on one axis only counts as not padding",
        "bnfuse_cli/engine/guards.py",
        "    return any(p != 0 for p in pad)\n",
        "    return all(p != 0 for p in pad)\n",
        ("tests/test_graph_cases.py::test_input_bn_not_folded_into_a_conv_padded_on_one_axis_or_one_side",),
    ),
    Mutant(
        "site-rtol-100x", "the float32 site tolerance 100 times looser",
        "bnfuse_cli/checks/outputs.py",
        '    "float32": (1e-4, 1e-6, 1e-5),\n',
        '    "float32": (1e-4, 1e-6, 1e-3),\n',
        ("tests/test_judge.py::test_site_check_tolerance_is_pinned_from_both_sides",),
    ),
    Mutant(
        "site-prefix", "site checks dropped for a layer whose name merely starts with a merged branch's",
        "bnfuse_cli/checks/sites.py",
        'f.producer.startswith(b + ".") for b in merged',
        "f.producer.startswith(b) for b in merged",
        ("tests/test_merge.py::test_a_fold_named_like_a_merged_branch_is_still_checked",),
    ),
    Mutant(
        "weight-overflow-silent", "the fp16 weight-overflow check never fires (finiteness tested in float64)",
        "bnfuse_cli/engine/fold.py",
        "    if not bool(torch.isfinite(torch.tensor(worst, dtype=torch.float64).to(w.dtype))):\n",
        "    if not bool(torch.isfinite(torch.tensor(worst, dtype=torch.float64).to(torch.float64))):\n",
        ("tests/test_fold_math.py::test_fp16_overflow_of_the_folded_weight_is_detected",),
    ),
    Mutant(
        "zip-unchecked", "read_checkpoint skips the CRC-32 check of a .pth zip (only a .zip suffix is checked)",
        "bnfuse_cli/files/integrity.py",
        "    elif zipfile.is_zipfile(path):\n",
        '    elif path.suffix.lower() == ".zip":\n',
        ("tests/test_checkpoint.py::test_damaged_files_always_give_a_checkpoint_error",
         "tests/test_faults.py::test_flipped_byte_in_a_tensor_record_is_refused_naming_it"),
    ),
    Mutant(
        "merge-rank", "merge_kernels accepts a branch kernel of another rank (broadcast into the sum)",
        "bnfuse_cli/engine/merge_math.py",
        "        if w.shape[:2] != weight.shape[:2] or w.dim() != weight.dim():\n",
        "        if w.shape[:2] != weight.shape[:2]:\n",
        ("tests/test_merge_math.py::test_merge_kernels_refuses_a_branch_of_another_rank",),
    ),
    Mutant(
        "merge-bias-length", "merge_kernels accepts a bias of the wrong length (broadcast into the sum)",
        "bnfuse_cli/engine/merge_math.py",
        "        if b is not None and tuple(b.shape) != (out_ch,):\n",
        "        if b is not None and b.dim() != 1:\n",
        ("tests/test_merge_math.py::test_merge_kernels_refuses_a_bias_of_the_wrong_length",),
    ),
    Mutant(
        "verify-ignores-device", "verify runs on the CPU whatever --device says",
        "bnfuse_cli/workflows/verify.py",
        "_validate(samples, data, batch_size, device, dtype,",
        '_validate(samples, data, batch_size, "cpu", dtype,',
        ("tests/test_gpu.py::test_verify_cuda_really_runs_on_the_gpu",),
        needs_cuda=True,
    ),
    Mutant(
        "pt2-sample-inputs-unpickled", "a .pt2's sample inputs that torch.load(weights_only=True) refuses pass the "
        "archive check (torch.export.load then unpickles them in full)",
        "bnfuse_cli/files/pt2archive.py",
        "    buf = io.BytesIO(data)\n",
        "    return None\n",
        ("tests/test_pt2_guard.py::test_sample_inputs_that_run_code_are_refused_by_verify_and_load",),
    ),
    Mutant(
        "pt2-second-open", "torch.export.load opens the .pt2 again by path instead of reading the file checked",
        "bnfuse_cli/files/export.py",
        "ep = torch.export.load(fh, extra_files=extra)",
        "ep = torch.export.load(str(path), extra_files=extra)",
        ("tests/test_pt2_guard.py::test_the_archive_torch_loads_is_the_one_that_was_checked",),
    ),
    Mutant(
        "pt2-zip-bomb", "a .pt2 member may claim any size from a few bytes on disk",
        "bnfuse_cli/files/pt2archive.py",
        "        if info.file_size > MAX_EXPANSION * info.compress_size + _SLACK:\n",
        "        if False:\n",
        ("tests/test_pt2_guard.py::test_a_zip_bomb_is_refused_in_seconds_before_anything_is_inflated",),
    ),
    Mutant(
        "pt2-guard-code", "a .pt2's input guards pass unchecked (ep.module() compiles them with exec)",
        "bnfuse_cli/files/pt2graph.py",
        "        why = _guard_problem(guard)\n",
        "        why = None\n",
        ("tests/test_pt2_guard.py::test_graph_parts_torch_would_run_as_python_are_refused",),
    ),
    Mutant(
        "proof-tolerance", "the read-back proof of a .pt2/.onnx compares weights within a tolerance, not bit for bit",
        "bnfuse_cli/files/export.py",
        "    return torch.equal(raw(a), raw(b))\n",
        "    return torch.allclose(a.detach().cpu().double(), b.detach().cpu().double())\n",
        ("tests/test_export.py::test_the_read_back_proof_is_bit_for_bit",),
    ),
    Mutant(
        "onnx-pair-half-placed", "an interrupt between placing an ONNX model's data file and the model leaves the "
        "data file",
        "bnfuse_cli/files/place.py",
        "        for path in added:\n            _remove(path)\n",
        "        pass\n",
        ("tests/test_onnx_external.py::test_an_interrupt_between_the_two_placements_leaves_neither",),
    ),
]


class Stop(Exception):
    """The script cannot do its job (exit 2)."""


def _copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "out",
                                    "*.egg-info", "*.pyc")
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    return dest


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("PYTHONSAFEPATH", None)
    return env


def _check_imports_copy(copy: Path, mutant: "Mutant | None") -> None:
    """``bnfuse_cli`` (and the mutated module) must import from ``copy``, with the mutated text in it."""
    module = "bnfuse_cli" if mutant is None else mutant.path[:-3].replace("/", ".")
    code = f"import importlib, sys; m = importlib.import_module({module!r}); sys.stdout.write(m.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True)
    if proc.returncode != 0:
        raise Stop(f"cannot import {module} from the copy:\n{proc.stderr}")
    where = Path(proc.stdout).resolve()
    if copy.resolve() not in where.parents:
        raise Stop(f"{module} was imported from {where}, not from the copy in {copy}")
    if mutant is not None and mutant.replacement not in where.read_text():
        raise Stop(f"{where} does not hold the mutated line of {mutant.name}")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - the venv has torch
        return False
    return bool(torch.cuda.is_available())


def _pytest(copy: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _summary(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    return lines[-1].strip("= ") if lines else output.strip().splitlines()[-1] if output.strip() else "(no output)"


def _failed(output: str) -> list[str]:
    """The failed tests, a parametrised test once with its failed cases: ``file::test[a, b]``."""
    cases: dict[str, list[str]] = {}
    for m in re.finditer(r"^FAILED ([^\s\[]+)(?:\[(\S+)\])?", output, re.M):
        cases.setdefault(m.group(1), [])
        if m.group(2):
            cases[m.group(1)].append(m.group(2))
    return [f"{t}[{', '.join(c)}]" if c else t for t, c in sorted(cases.items())]


def _apply(copy: Path, m: Mutant) -> str:
    """Apply ``m`` to the copy; returns the original text (to restore)."""
    path = copy / m.path
    text = path.read_text()
    n = text.count(m.pattern)
    if n != 1:
        raise Stop(f"mutant {m.name}: pattern {m.pattern!r} found {n} times in {m.path} (expected exactly once); "
                   "the code changed: update the mutant in scripts/mutants.py")
    path.write_text(text.replace(m.pattern, m.replacement))
    return text


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    args = parser.parse_args(argv)
    chosen = MUTANTS if not args.only else [m for m in MUTANTS if m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutant(s): {', '.join(sorted(unknown))}; known: {', '.join(m.name for m in MUTANTS)}")
        return 2
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}: {m.what}\n    {m.path}: {m.pattern.strip()!r} -> {m.replacement.strip()!r}")
            for t in m.tests:
                print(f"    {t}{'  (needs CUDA)' if m.needs_cuda else ''}")
        return 0

    cuda = _cuda()
    try:
        with tempfile.TemporaryDirectory(prefix="bnfuse-mutants-") as tmp:
            copy = _copy_repo(Path(tmp) / "repo")
            _check_imports_copy(copy, None)
            # every pattern is checked before anything runs
            for m in chosen:
                (copy / m.path).write_text(_apply(copy, m))
            runnable = [m for m in chosen if cuda or not m.needs_cuda]
            baseline = tuple(dict.fromkeys(t for m in runnable for t in m.tests))
            t0 = time.perf_counter()
            rc, out = _pytest(copy, baseline)
            print(f"unmutated copy: {_summary(out)} ({time.perf_counter() - t0:.0f} s)")
            if rc != 0:
                raise Stop(f"the named tests must pass on the unmutated code:\n{out[-4000:]}")
            survived = []
            for m in chosen:
                if m.needs_cuda and not cuda:
                    print(f"SKIPPED   {m.name}: {m.what}\n"
                          f"          needs CUDA: killed by {', '.join(m.tests)} on a GPU")
                    continue
                original = _apply(copy, m)
                try:
                    _check_imports_copy(copy, m)
                    t0 = time.perf_counter()
                    rc, out = _pytest(copy, m.tests)
                finally:
                    (copy / m.path).write_text(original)
                took = time.perf_counter() - t0
                if rc == 0:
                    survived.append(m.name)
                    print(f"SURVIVED  {m.name}: {m.what}\n          {_summary(out)} ({took:.0f} s)")
                elif rc == 1 and _failed(out):
                    print(f"killed    {m.name}: {m.what}\n          by {'; '.join(_failed(out))} ({took:.0f} s)")
                else:
                    raise Stop(f"mutant {m.name}: pytest exited {rc} without a failing test:\n{out[-4000:]}")
    except Stop as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ran = sum(1 for m in chosen if cuda or not m.needs_cuda)
    print(f"{ran - len(survived)} of {ran} mutants killed" + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

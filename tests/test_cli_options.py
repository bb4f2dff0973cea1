"""Options are checked before any work, results alone go to stdout, and the output suits the terminal.

Every case runs the real entry point (``python -m bnfuse_cli``) and looks at its stdout and stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, randomize_bn, run_bnfuse

TESTS = ROOT / "tests"
TINY = ["--arch", "bench_tiny:tiny_cnn", "--input-shape", "1,3,16,16"]
BENCH_FAST = ["--device", "cpu", "--iters", "2", "--warmup", "0", "--input-shape", "1,3,16,16"]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    from bench_tiny import TinyCNN

    torch.save(randomize_bn(TinyCNN(), seed=2).state_dict(), tmp_path / "tiny.pth")
    return tmp_path / "tiny.pth"


def _exit2(proc, *patterns: str) -> None:  # noqa: ANN001
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr
    for p in patterns:
        assert p in proc.stderr, (p, proc.stderr)


def test_json_dash_writes_json_to_stdout_and_tables_to_stderr(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "fused.safetensors"
    proc = run_bnfuse("convert", str(tiny), *TINY, "-o", str(out), "--json", "-", cwd=TESTS)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # stdout is the JSON and nothing else
    assert data["bn_folded"] == 3 and data["check"]["ok"] and data["output"] == str(out)
    assert "bnfuse convert" in proc.stderr and not (tmp_path / "-").exists()
    ver = run_bnfuse("verify", str(tiny), str(out), *TINY, "--json", "-", cwd=TESTS)
    assert ver.returncode == 0 and json.loads(ver.stdout)["ok"] and "OK" in ver.stderr


def test_report_paths_are_checked_before_any_work(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "fused.pth"
    proc = run_bnfuse("convert", str(tiny), *TINY, "-o", str(out), "--json", str(tmp_path / "no" / "r.json"), cwd=TESTS)
    _exit2(proc, "--json", "does not exist")
    assert not out.exists()  # refused before the checkpoint was written: a rerun needs no --force
    bench = run_bnfuse("bench", "bench_tiny:tiny_cnn", *BENCH_FAST, "--markdown", str(tmp_path / "no" / "b.md"),
                       cwd=TESTS)
    _exit2(bench, "--markdown", "does not exist")
    assert "check failed" not in bench.stderr and "random weights" not in bench.stderr  # no model was run
    folder = run_bnfuse("bench", "bench_tiny:tiny_cnn", *BENCH_FAST, "--markdown", str(tmp_path), cwd=TESTS,
                        columns=400)  # wide enough that the message is on one line of click's box
    assert folder.returncode == 2, folder.stderr
    assert f"Invalid value for '--markdown': file '{tmp_path}' is a directory." in folder.stderr, folder.stderr


@pytest.mark.parametrize("args, message", [
    (["--tolerance", "-1"], "--tolerance -1"),
    (["--tolerance", "nan"], "--tolerance nan"),
    (["--rtol", "inf"], "--rtol inf"),
    (["--atol", "-0.5"], "--atol -0.5"),
])
def test_bad_tolerances_are_refused_first(tiny: Path, tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_bnfuse("convert", str(tiny), *TINY, "-o", str(tmp_path / "o.pth"), *args, cwd=TESTS)
    _exit2(proc, message, "finite number >= 0")
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.parametrize("command", ["convert", "inspect", "verify", "bench"])
def test_absurd_input_shape_is_refused_before_allocating(tiny: Path, command: str) -> None:
    shape = ["--input-shape", "1,3,100000,100000"]
    args = {
        "convert": ["convert", str(tiny), "--arch", "bench_tiny:tiny_cnn", *shape],
        "inspect": ["inspect", str(tiny), "--arch", "bench_tiny:tiny_cnn", *shape],
        "verify": ["verify", str(tiny), str(tiny), "--arch", "bench_tiny:tiny_cnn", *shape],
        "bench": ["bench", "bench_tiny:tiny_cnn", "--device", "cpu", *shape],
    }[command]
    proc = run_bnfuse(*args, cwd=TESTS)
    _exit2(proc, "1x3x100000x100000", "GiB", "BNFUSE_MAX_INPUT_MIB")


def test_input_budget_from_python_is_a_bnfuse_error_and_can_be_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnfuse_cli import SourceOptions, UsageError, convert
    from bnfuse_cli.inputs import InputSpec, make_input

    with pytest.raises(UsageError, match="budget"):
        convert("resnet18", None, source_options=SourceOptions(weights="none", input_shape=(1, 3, 100000, 100000)))
    monkeypatch.setenv("BNFUSE_MAX_INPUT_MIB", "0.001")
    with pytest.raises(UsageError, match="1 MiB budget|0 MiB budget"):
        make_input(InputSpec((1, 3, 32, 32)), dtype=torch.float32)
    monkeypatch.setenv("BNFUSE_MAX_INPUT_MIB", "1")
    assert make_input(InputSpec((1, 3, 32, 32)), dtype=torch.float32).shape == (1, 3, 32, 32)
    monkeypatch.setenv("BNFUSE_MAX_INPUT_MIB", "lots")
    with pytest.raises(UsageError, match="BNFUSE_MAX_INPUT_MIB"):
        make_input(InputSpec((1, 3, 32, 32)), dtype=torch.float32)


def test_bench_stacks_its_table_on_a_narrow_terminal() -> None:
    proc = run_bnfuse("bench", "bench_tiny:tiny_cnn", *BENCH_FAST, cwd=TESTS, columns=50)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 50, proc.stdout
    assert any("speedup" in line and "x (" in line for line in lines), proc.stdout  # label and value on one line
    wide = run_bnfuse("bench", "bench_tiny:tiny_cnn", *BENCH_FAST, cwd=TESTS, columns=200)
    assert any("speedup" in line and "original ms" in line for line in wide.stdout.splitlines()), wide.stdout


def test_bench_into_a_file_splits_no_cell(tmp_path: Path) -> None:
    """``bnfuse bench ... > file`` (a pipe, COLUMNS=80): the table at its natural width, every cell of a
    model's row whole on one line, as the JSON gives them."""
    proc = run_bnfuse("bench", "bench_tiny:tiny_cnn", *BENCH_FAST, "--json", str(tmp_path / "b.json"), cwd=TESTS,
                      columns=80)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "b.json").read_text())["models"][0]
    o, f, s = m["original_ms"], m["fused_ms"], m["speedup"]
    cells = ["bench_tiny:tiny_cnn", "1x3x16x16", f"{o['median']:.3f} ({o['iqr']:.3f})",
             f"{f['median']:.3f} ({f['iqr']:.3f})", f"{s['median']:.3f}x ({s['q1']:.3f}-{s['q3']:.3f})"]
    assert any(all(c in line for c in cells) for line in proc.stdout.splitlines()), proc.stdout
    assert any("speedup" in line and "original ms" in line for line in proc.stdout.splitlines()), proc.stdout


def test_what_libraries_print_goes_to_stderr(tmp_path: Path) -> None:
    """torch hub prints ``Downloading: ...`` while it fetches weights; stdout must stay clean."""
    script = """
import sys, torchvision.models._api as api
def fake_get_state_dict(self, *args, **kwargs):
    print('Downloading: "https://example.invalid/w.pth" to /tmp/w.pth')
    raise OSError("no network")
api.WeightsEnum.get_state_dict = fake_get_state_dict
from bnfuse_cli.cli import app
app(sys.argv[1:], prog_name="bnfuse")
"""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", script, "convert", "resnet18", "-o", str(tmp_path / "o.pth")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Downloading" in proc.stderr

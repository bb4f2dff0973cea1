"""ONNX above protobuf's 2 GiB limit: written with external data (``NAME.onnx`` and ``NAME.onnx.<digest>.data``),
decided before the export, placed as a pair (a failure, an interrupt or a kill leaves neither, ``--force``
replaces both), run by onnxruntime in a process without bnfuse, verified, and refused on the read side when the
data lies outside the model's folder.  The default tests lower the threshold (:data:`EXTERNAL_AT`) on a tiny
model; ``-m slow`` converts a real 2.03 GiB model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_bnfuse

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

import bnfuse_cli  # noqa: E402
from bnfuse_cli import ConvertOptions, SourceOptions  # noqa: E402
from bnfuse_cli.errors import CheckpointError, OutputError  # noqa: E402
from bnfuse_cli.files import onnxfile  # noqa: E402

TESTS = ROOT / "tests"
MODEL = "bench_tiny:tiny_cnn"
SHAPE = "1,3,16,16"
DATA = re.compile(r"m\.onnx\.[0-9a-f]{16}\.data")

#: the CLI in a process where every model is large enough for external data (argv: the bnfuse arguments)
_EXTERNAL_CLI = r"""
import sys
import bnfuse_cli.files.onnxfile as onnxfile
onnxfile.EXTERNAL_AT = 0
sys.argv = ["bnfuse", *sys.argv[1:]]
from bnfuse_cli.cli import main
main()
"""

#: runs an .onnx file in onnxruntime where bnfuse and torch cannot be imported
_ISOLATED_ORT = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("bnfuse_cli", "torch", "bench_tiny"):
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Block())
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
np.save(sys.argv[3], session.run(None, {session.get_inputs()[0].name: x})[0])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("bnfuse_cli", "torch"))))
"""


def _external_cli(*args: str, cwd: Path = TESTS) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _EXTERNAL_CLI, *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, COLUMNS="300"), timeout=600)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def external(monkeypatch: pytest.MonkeyPatch, tests_on_path: None) -> None:
    monkeypatch.setattr(onnxfile, "EXTERNAL_AT", 0)


def test_the_decision_is_made_from_the_parameter_bytes_before_the_export(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    assert onnxfile.parameter_bytes(model) == (12 + 3) * 4
    monkeypatch.setattr(onnxfile, "EXTERNAL_AT", 60)
    data, _ = onnxfile.export_onnx(model, (torch.randn(1, 4),), {})
    assert isinstance(data, onnxfile.OnnxExternal)
    monkeypatch.setattr(onnxfile, "EXTERNAL_AT", 61)
    data, _ = onnxfile.export_onnx(model, (torch.randn(1, 4),), {})
    assert isinstance(data, bytes)


def test_a_pair_is_written_runs_without_bnfuse_and_verifies(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    r = _external_cli("convert", MODEL, "--weights", "none", "--input-shape", SHAPE, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "written as ONNX external data beside the model" in r.stderr
    model_file, data_file = _files(tmp_path)
    assert model_file == "m.onnx" and DATA.fullmatch(data_file), _files(tmp_path)
    locations = {e.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {data_file}  # relative to the model's folder, named after the output
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3, 3, 16, 16), dtype=np.float32))
    ran = subprocess.run([sys.executable, "-I", "-c", _ISOLATED_ORT, str(out), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], capture_output=True, text=True, cwd="/", timeout=300)
    assert ran.returncode == 0 and json.loads(ran.stdout) == [], ran.stderr
    assert np.load(tmp_path / "y.npy").shape == (3, 10)
    ok = run_bnfuse("verify", MODEL, str(out), "--weights", "none", cwd=TESTS, columns=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_force_replaces_both_files_and_an_inline_file_replaces_the_pair(tmp_path: Path, external: None,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.onnx"
    bnfuse_cli.convert(MODEL, out, source_options=SourceOptions(weights="none", input_shape=SHAPE))
    (first,) = [n for n in _files(tmp_path) if DATA.fullmatch(n)]
    with pytest.raises(OutputError, match="already exists"):
        bnfuse_cli.convert(MODEL, out, source_options=SourceOptions(weights="none", input_shape=SHAPE, seed=1))
    bnfuse_cli.convert(MODEL, out, ConvertOptions(force=True),
                       SourceOptions(weights="none", input_shape=SHAPE, seed=1))
    (second,) = [n for n in _files(tmp_path) if DATA.fullmatch(n)]
    assert second != first and _files(tmp_path) == ["m.onnx", second]
    assert bnfuse_cli.verify(MODEL, out, source_options=SourceOptions(weights="none", seed=1)).ok
    monkeypatch.setattr(onnxfile, "EXTERNAL_AT", 1 << 40)
    bnfuse_cli.convert(MODEL, out, ConvertOptions(force=True), SourceOptions(weights="none", input_shape=SHAPE))
    assert _files(tmp_path) == ["m.onnx"]


def test_an_interrupt_between_the_two_placements_leaves_neither(tmp_path: Path, external: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The data file is in place, the model is not yet: the interrupt removes the data file it placed."""
    import bnfuse_cli.files.place as place

    real_link = os.link

    def link(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if Path(dst).name == "m.onnx":
            raise KeyboardInterrupt
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(place.os, "link", link)
    placed: list[Path] = []
    with pytest.raises(KeyboardInterrupt):
        bnfuse_cli.convert(MODEL, tmp_path / "m.onnx",
                           source_options=SourceOptions(weights="none", input_shape=SHAPE), placed=placed)
    assert _files(tmp_path) == [] and placed == []


def test_a_failed_write_of_the_data_is_exit_2_and_leaves_nothing(tmp_path: Path, external: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(self, folder, name):  # noqa: ANN001, ANN202
        (folder / f"{name}.data").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnxfile.OnnxExternal, "save", full)
    with pytest.raises(OutputError, match=r"cannot write .*m\.onnx: No space left on device \(ENOSPC\) after 7 bytes; "
                                          r"the file system is full"):
        bnfuse_cli.convert(MODEL, tmp_path / "m.onnx", source_options=SourceOptions(weights="none", input_shape=SHAPE))
    assert _files(tmp_path) == []


_KILL_CHILD = r"""
import sys, time
import bnfuse_cli.files.onnxfile as onnxfile
import bnfuse_cli.files.write as write
onnxfile.EXTERNAL_AT = 0
real = write.verify_written
def stall(tmp, *args):
    real(tmp, *args)
    print("written", file=sys.__stdout__, flush=True)  # the CLI sends library output to stderr
    time.sleep(60)
write.verify_written = stall
sys.argv = ["bnfuse", *sys.argv[1:]]
from bnfuse_cli.cli import main
main()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kill -9 of a child")
def test_kill_9_during_the_write_leaves_neither_file(tmp_path: Path, external: None) -> None:
    out = tmp_path / "m.onnx"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, "convert", MODEL, "--weights", "none",
                             "--input-shape", SHAPE, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=TESTS)
    try:
        deadline = time.monotonic() + 300
        while proc.stdout.readline().strip() != "written":  # both files complete and checked, not yet placed
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    (staging,) = _files(tmp_path)  # the killed writer's folder, named after it: no model, no data file
    assert staging.startswith(".m.onnx.bnfuse-tmp.") and staging.split(".")[-2] == str(proc.pid)
    # the next write of the same output (here in this process) sweeps the stale folder
    bnfuse_cli.convert(MODEL, out, source_options=SourceOptions(weights="none", input_shape=SHAPE))
    assert [n for n in _files(tmp_path) if not DATA.fullmatch(n)] == ["m.onnx"]


@pytest.mark.parametrize("where", ["outside", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path, external: None, where: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    out = folder / "m.onnx"
    bnfuse_cli.convert(MODEL, out, source_options=SourceOptions(weights="none", input_shape=SHAPE))
    (data,) = [p for p in folder.iterdir() if DATA.fullmatch(p.name)]
    moved = {"outside": tmp_path / "w.data", "absolute": tmp_path / "w.data", "symlink": folder / "link.data"}[where]
    if where == "symlink":
        moved.symlink_to(data.name)
    else:
        data.rename(moved)
    location = {"outside": "../w.data", "absolute": str(moved), "symlink": "link.data"}[where]
    onnxfile.point_external_data(out, location)
    with pytest.raises(CheckpointError, match=r"m\.onnx is refused by onnx's checker \(.*\)\. bnfuse reads an ONNX "
                                              r"model's external data only from files in the model's own folder"):
        bnfuse_cli.load(out)
    if where == "symlink":  # and through the real entry point (onnxruntime alone would follow the link)
        r = run_bnfuse("verify", MODEL, str(out), "--weights", "none", cwd=TESTS, columns=400)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "symbolic link" in r.stderr, r.stderr


@pytest.mark.slow
def test_a_model_above_2_gib_converts_runs_and_verifies(tmp_path: Path) -> None:
    """The real thing (minutes, about 7 GB of memory): Linear(33000, 16500) + BatchNorm1d, 2.03 GiB of float32."""
    out = tmp_path / "big.onnx"
    r = run_bnfuse("convert", "models_export:BigLinear", "--weights", "none", "-o", str(out), cwd=TESTS, columns=200)
    assert r.returncode == 0, r.stderr
    (data,) = [p for p in tmp_path.iterdir() if p.name != "big.onnx"]
    assert out.stat().st_size < 1 << 20 and data.stat().st_size > 2 ** 31
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((2, 33000), dtype=np.float32))
    ran = subprocess.run([sys.executable, "-I", "-c", _ISOLATED_ORT, str(out), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], capture_output=True, text=True, cwd="/", timeout=600)
    assert ran.returncode == 0 and json.loads(ran.stdout) == [], ran.stderr
    ok = run_bnfuse("verify", "models_export:BigLinear", str(out), "--weights", "none", cwd=TESTS, columns=200)
    assert ok.returncode == 0, ok.stdout + ok.stderr

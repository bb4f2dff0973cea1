"""A ``.pt2`` is untrusted input: nothing in it runs without ``--allow-pickle`` (pickled sample inputs,
weights and constants, custom and opaque objects, AOTInductor libraries, and the graph's shape expressions,
node targets and guards, which torch turns into Python), no member is inflated beyond what it should hold,
and the archive torch loads is the one bnfuse checked.  Each payload touches a marker file; the marker must
not exist after the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import pt2_tamper as tamper
from conftest import ROOT, run_bnfuse, run_in_process

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bnfuse_cli  # noqa: E402
from bnfuse_cli.errors import CheckpointError, UnsafeCheckpointError  # noqa: E402

TESTS = ROOT / "tests"
MODEL = "models_export:Strided"
SHAPE = "1,3,16,16"


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``.pt2`` of a tiny model (random weights, seed 0), written by the real entry point."""
    out = tmp_path_factory.mktemp("pt2") / "fused.pt2"
    r = run_bnfuse("convert", MODEL, "--weights", "none", "--input-shape", SHAPE, "-o", str(out), cwd=TESTS)
    assert r.returncode == 0, r.stderr
    return out


def _verify(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_bnfuse("verify", MODEL, str(path), "--weights", "none", *extra, cwd=TESTS, columns=300)


def _refused(r: subprocess.CompletedProcess, *words: str) -> str:
    """The one-paragraph refusal of an exit 2 without a traceback, which says each of ``words``."""
    msg = r.stderr.strip()
    assert r.returncode == 2, r.stdout + r.stderr
    assert msg.startswith("error: ") and "Traceback" not in msg and len(msg.splitlines()) == 1, msg
    for word in words:
        assert word in msg, msg
    return msg


def test_the_untampered_archive_loads_and_runs(fused: Path) -> None:
    """Control: bnfuse's own .pt2 (dynamic shapes: sympy expressions and guards included) passes every check."""
    graph = json.loads(tamper.member(fused, "models/model.json"))
    assert graph["guards_code"] and '"expr_str"' in json.dumps(graph)  # the checks below have something to see
    module = bnfuse_cli.load(fused)
    assert module(torch.randn(3, 3, 20, 12)).shape == (3, 10)


def test_sample_inputs_that_run_code_are_refused_by_verify_and_load(fused: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = tamper.sample_inputs_payload(fused, tmp_path / "evil.pt2", marker)
    _refused(_verify(evil), "its member data/sample_inputs/model.pt is a pickle that torch.load(weights_only=True) "
             "cannot read (it needs the Python object eval)", "nothing in it was executed", "--allow-pickle")
    with pytest.raises(UnsafeCheckpointError, match="data/sample_inputs/model.pt"):
        bnfuse_cli.load(evil)
    assert not marker.exists()
    # the user's choice: read as torch reads it (the same app, in this process)
    ok = run_in_process("verify", MODEL, str(evil), "--weights", "none", "--allow-pickle", cwd=TESTS, columns=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert marker.exists()


@pytest.mark.parametrize("where, member, words", [
    ("weight", "data/weights/weight_pickled", "is 'conv1.weight' stored as a pickle (use_pickle in "
                                              "data/weights/model_weights_config.json)"),
    ("tensor_", "data/constants/tensor_0", "is 'evil' stored as a pickle (use_pickle"),
    ("opaque_obj_", "data/constants/opaque_obj_0", "is the opaque object 'evil', which torch.export.load unpickles "
                                                   "with pickle.loads"),
    ("custom_obj_", "data/constants/custom_obj_0", "is the custom object 'evil'"),
])
def test_pickled_weights_constants_and_objects_are_refused(fused: Path, tmp_path: Path, where: str, member: str,
                                                           words: str) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt2"
    if where == "weight":
        tamper.pickled_weight(fused, evil, marker, "conv1.weight")
    else:
        tamper.pickled_constant(fused, evil, marker, where)
    with pytest.raises(UnsafeCheckpointError, match=f"its member {member} ") as caught:
        bnfuse_cli.load(evil)
    assert words in str(caught.value)
    assert not marker.exists()
    if where == "weight":  # and through the real entry point
        _refused(_verify(evil), member, words)
        assert not marker.exists()


def _add_guard(code: str):  # noqa: ANN202
    return lambda graph: graph["guards_code"].append(code)


def _replace_expr(code: str):  # noqa: ANN202
    def edit(graph: dict) -> None:
        text = json.dumps(graph)
        first = next(h for h in _dicts_with_key(graph, "expr_str"))
        first["expr_str"] = code
        assert json.dumps(graph) != text

    return edit


def _dicts_with_key(obj: object, key: str):  # noqa: ANN202
    if isinstance(obj, dict):
        if key in obj:
            yield obj
        for v in obj.values():
            yield from _dicts_with_key(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _dicts_with_key(v, key)


def _add_node(target: str):  # noqa: ANN202
    def edit(graph: dict) -> None:
        graph["graph_module"]["graph"]["nodes"].insert(0, {
            "target": target, "inputs": [{"name": "command", "arg": {"as_string": "true"}, "kind": 1}],
            "outputs": [], "metadata": {}, "name": "evil"})

    return edit


@pytest.mark.parametrize("part, edit, words", [
    ("guard", "_add_guard", "has the input guard \"__import__('pathlib').Path"),
    ("expression", "_replace_expr", "has the shape expression \"__import__('pathlib').Path"),
    ("target", "_add_node", "has a graph node that calls 'torch.os.system', which is not a torch operator"),
])
def test_graph_parts_torch_would_run_as_python_are_refused(fused: Path, tmp_path: Path, part: str, edit: str,
                                                           words: str) -> None:
    """No pickle at all: torch.export.load evaluates shape expressions with sympify (eval), and ep.module() compiles
    the guards with exec (both ran their payload before this check); node targets are resolved by name from torch
    (torch's verifier stops this one after the lookup; bnfuse refuses it before torch reads the file)."""
    marker = tmp_path / "PWNED"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch() is None"
    make = {"_add_guard": _add_guard(code), "_replace_expr": _replace_expr(code),
            "_add_node": _add_node("torch.os.system")}[edit]
    evil = tamper.graph_edit(fused, tmp_path / "evil.pt2", make)
    with pytest.raises(UnsafeCheckpointError, match="its member models/model.json ") as caught:
        model = bnfuse_cli.load(evil)
        model(torch.randn(2, 3, 16, 16))  # what would run the guard and the node
    assert words in str(caught.value)
    assert not marker.exists()


def test_compiled_code_is_refused(fused: Path, tmp_path: Path) -> None:
    evil = tamper.rewrite(fused, tmp_path / "aoti.pt2", add={"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(UnsafeCheckpointError, match="its member data/aotinductor/model/model.so is AOTInductor "
                                                    "compiled code"):
        bnfuse_cli.load(evil)


def test_the_archive_torch_loads_is_the_one_that_was_checked(fused: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is swapped for a hostile one between the check and torch's read: torch reads the file that was
    checked (the same open file), never the new one at that path."""
    from bnfuse_cli.files import pt2archive

    marker = tmp_path / "PWNED"
    target = tmp_path / "swapped.pt2"
    target.write_bytes(fused.read_bytes())
    evil = tamper.sample_inputs_payload(fused, tmp_path / "evil.pt2", marker)
    real = pt2archive._check

    def check_then_swap(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        real(*args, **kwargs)
        os.replace(evil, target)

    monkeypatch.setattr(pt2archive, "_check", check_then_swap)
    assert bnfuse_cli.load(target)(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert not marker.exists() and not evil.exists()


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", ["extra/padding", "data/padding"])
def test_a_zip_bomb_is_refused_in_seconds_before_anything_is_inflated(fused: Path, tmp_path: Path, name: str) -> None:
    """Under ``extra/`` torch reads the member whole; elsewhere only the CRC check would inflate it (in chunks):
    both are refused from the zip directory alone."""
    bomb = tamper.zip_bomb(fused, tmp_path / "bomb.pt2", name, 256 << 20)
    assert bomb.stat().st_size < fused.stat().st_size + (2 << 20)
    # the child's own peak (VmHWM of its address space, written at exit): getrusage's ru_maxrss of a child
    # also counts the parent it was forked from, a test worker of any size
    peak = tmp_path / "peak"
    script = ("import atexit, sys\n"
              "def peak():\n"
              "    with open('/proc/self/status') as fh:\n"
              "        hwm = next(int(line.split()[1]) for line in fh if line.startswith('VmHWM'))\n"
              f"    open({str(peak)!r}, 'w').write(str(hwm))\n"
              "atexit.register(peak)\n"
              "sys.argv = ['bnfuse', *sys.argv[1:]]\n"
              "from bnfuse_cli.cli import main\n"
              "main()\n")
    r = subprocess.run([sys.executable, "-c", script, "verify", MODEL, str(bomb), "--weights", "none"], cwd=TESTS,
                       capture_output=True, text=True, env=dict(os.environ, COLUMNS="300"), timeout=300)
    _refused(r, f"its member {name} would take 268,435,456 bytes when read", "zip bomb")
    assert int(peak.read_text()) < 1_500_000, peak.read_text()  # KiB: under 1.5 GB


@pytest.mark.parametrize("case, words", [
    ("stored extra", "its member extra/notes would take 2,097,152 bytes when read, as an extra file that "
                     "torch.export.load reads whole"),
    ("bigger record", "its member data/weights/weight_0 would take 65,536 bytes when read, but its config declares "
                      "864 bytes of weights in it"),
    ("empty record", "its member data/weights/weight_0 would take 864 bytes when read, from an empty record"),
    ("missing record", "keeps 'conv1.weight' in data/weights/weight_0, which the archive does not have"),
    ("twice", "has two members named"),
])
def test_members_out_of_proportion_are_refused_naming_them(fused: Path, tmp_path: Path, case: str,
                                                           words: str) -> None:
    path = tmp_path / "bad.pt2"
    if case == "stored extra":
        tamper.rewrite(fused, path, add={"extra/notes": bytes(2 << 20)})
    elif case == "bigger record":
        tamper.rewrite(fused, path, {"data/weights/weight_0": bytes(65536)})
    elif case == "empty record":
        tamper.rewrite(fused, path, {"data/weights/weight_0": b""})
    elif case == "missing record":
        tamper.rewrite(fused, path, drop=("data/weights/weight_0",))
    else:
        tamper.rewrite(fused, path)
        with zipfile.ZipFile(path, "a") as zf, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # the point of the case
            zf.writestr(zf.namelist()[0], b"again")
    with pytest.raises(CheckpointError) as caught:
        bnfuse_cli.load(path)
    assert words in str(caught.value) and not isinstance(caught.value, UnsafeCheckpointError), str(caught.value)


def test_a_truncated_pt2_says_so(fused: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(fused.read_bytes()[: fused.stat().st_size // 2])
    _refused(_verify(cut), f"{cut} cannot be read as a torch.export program: it is truncated: it starts as a zip "
                           "archive, as every .pt2 does, but its zip directory (the end of the file) is missing")
    other = tmp_path / "other.pt2"
    other.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(CheckpointError, match=r"it is not a zip archive, as every \.pt2 is \(it starts with "):
        bnfuse_cli.load(other)


def test_a_constant_of_any_name_read_as_raw_bytes_is_held_to_its_record(fused: Path, tmp_path: Path) -> None:
    """torch reads every entry not marked ``use_pickle`` as raw bytes, whatever its name, and an empty record
    as zeros of the declared size: a 2 GiB constant declared over an empty member is refused before torch
    allocates it."""
    config = json.loads(tamper.member(fused, "data/constants/model_constants_config.json"))
    one = {"as_int": 1}
    config["config"]["x"] = {"path_name": "x", "is_param": False, "use_pickle": False, "tensor_meta": {
        "dtype": 7, "sizes": [{"as_int": 1 << 29}], "strides": [one], "storage_offset": {"as_int": 0},
        "requires_grad": False, "device": {"type": "cpu", "index": None}, "layout": 7}}
    bad = tamper.rewrite(fused, tmp_path / "zeros.pt2",
                         {"data/constants/model_constants_config.json": json.dumps(config).encode()},
                         {"data/constants/x": b""})
    with pytest.raises(CheckpointError, match=r"its member data/constants/x would take 2,147,483,648 bytes when "
                                              r"read, from an empty record"):
        bnfuse_cli.load(bad)


@pytest.mark.parametrize("folder, words", [
    ("extra", r"its members under extra/ \(12\) would take 12,582,912 bytes when read, all together, as extra files"),
    ("data", r"its members \(\d+\) would take [\d,]+ bytes when read, all together, from [\d,]+ bytes on disk"),
])
def test_many_members_each_under_its_limit_are_refused_together(fused: Path, tmp_path: Path, folder: str,
                                                                words: str) -> None:
    """Each member of 1 MiB of zeros (a few KB on disk) passes its own limit; twelve of them are a zip bomb: under
    ``extra/`` torch reads each whole, elsewhere their sum is out of proportion to the file."""
    bomb = tmp_path / "many.pt2"
    tamper.rewrite(fused, bomb)
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        for i in range(12):
            zf.writestr(f"{root}/{folder}/padding{i}", bytes(1 << 20))
    assert bomb.stat().st_size < fused.stat().st_size + (1 << 20)
    with pytest.raises(CheckpointError, match=words):
        bnfuse_cli.load(bomb)

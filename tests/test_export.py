"""``.pt2`` outputs (``torch.export``): written only once judged in their own runtime, loadable where
neither bnfuse nor the model's code is, verified like any fused file, and refused cleanly when the
model cannot be exported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import models_merge as mm
from conftest import ROOT, randomize_bn, run_bnfuse, run_in_process

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnfuse_cli.checks import OutputCheck, Tolerance  # noqa: E402

TESTS = ROOT / "tests"
ARCH = "models_merge:RepVGG"

#: the head of a child process where bnfuse, the model's module and the model zoos cannot be imported
_BLOCKED = r"""
import importlib.abc, json, sys
BLOCKED = ("bnfuse_cli", "models_merge", "models_export", "torchvision", "timm")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Block())
"""
#: loads a .pt2 there and runs it
_ISOLATED = _BLOCKED + r"""
import torch
program = torch.export.load(sys.argv[1]).module()
inputs = torch.load(sys.argv[2])
outputs = [program(x) for x in inputs]
torch.save(outputs, sys.argv[3])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> "tuple[Path, torch.nn.Module]":
    d = tmp_path_factory.mktemp("pt2")
    torch.manual_seed(0)
    model = randomize_bn(mm.RepVGG(), seed=4).eval()
    torch.save(model.state_dict(), d / "orig.pth")
    _convert(d, ".pt2", "torch.export", "input 0 ?x3x?x?: dynamic batch, 2, 3")
    return d, model


def _convert(d: Path, suffix: str, runtime: str, dims: str) -> None:
    """``d/orig.pth`` converted to ``d/fused<suffix>`` by the real entry point, judged in ``runtime``."""
    r = run_bnfuse("convert", str(d / "orig.pth"), "--arch", ARCH, "--input-shape", "1,3,16,16", "-o",
                   str(d / f"fused{suffix}"), cwd=TESTS, columns=200)
    assert r.returncode == 0, r.stderr
    assert f"note: exported for {runtime}: {dims}" in r.stderr, r.stderr
    assert f"the {suffix} file, opened in {runtime}, was judged against the original" in r.stderr


def test_pt2_runs_without_bnfuse_or_the_model_code(exported: "tuple[Path, torch.nn.Module]") -> None:
    d, model = exported
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(1, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g),
              torch.randn(2, 3, 20, 12, generator=g)]
    torch.save(inputs, d / "inputs.pt")
    r = subprocess.run([sys.executable, "-I", "-c", _ISOLATED, str(d / "fused.pt2"), str(d / "inputs.pt"),
                        str(d / "outputs.pt")], capture_output=True, text=True, cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []  # none of the blocked modules was needed
    outputs = torch.load(d / "outputs.pt")
    for x, y in zip(inputs, outputs):
        check = OutputCheck(Tolerance.for_dtype(torch.float32), reference="float64")
        with torch.no_grad():
            check.add(model.double()(x.double()), y, model.float()(x))
        assert check.ok and y.shape[0] == x.shape[0], check.reason(str(tuple(x.shape)))


def _tampered(src: Path, dest: Path, key: str, factor: float) -> None:
    """A copy of a .pt2 with one weight scaled: what a wrong fold of one layer looks like there."""
    extra = {"bnfuse.json": ""}
    ep = torch.export.load(str(src), extra_files=extra)
    with torch.no_grad():
        ep.state_dict[key].mul_(factor)
    torch.export.save(ep, str(dest), extra_files=extra)


def test_verify_judges_a_pt2_in_its_runtime(exported: "tuple[Path, torch.nn.Module]") -> None:
    d, _ = exported
    ok = run_bnfuse("verify", str(d / "orig.pth"), str(d / "fused.pt2"), "--arch", ARCH, cwd=TESTS, columns=200)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "note: 1 of 1 fold site(s) checked on the weights" in ok.stderr, ok.stderr
    _tampered(d / "fused.pt2", d / "wrong.pt2", "block.kxk.weight", 1.5)
    bad = run_in_process("verify", str(d / "orig.pth"), str(d / "wrong.pt2"), "--arch", ARCH, cwd=TESTS, columns=200)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    text = " ".join(bad.stdout.split())
    assert "DIFFERENT" in text and "merge site block.kxk (" in text, text


def test_a_model_that_cannot_be_exported_is_exit_2_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "dd.pt2"
    r = run_bnfuse("convert", "models_export:DataDependent", "--weights", "none", "--input-shape", "1,3,8,8",
                   "-o", str(out), cwd=TESTS, columns=200)
    assert r.returncode == 2, r.stdout + r.stderr
    msg = r.stderr.strip()
    line = _line_of("models_export.py", "if y.sum() > 0")
    assert msg.startswith(f"error: the fused model cannot be exported with torch.export: models_export.py:{line}: "
                          "if y.sum() > 0: depends on the values of a tensor"), msg  # the user's own line
    assert "Traceback" not in msg and "GuardOnDataDependentSymNode" in msg
    assert msg.endswith("nothing was written. A model with data-dependent control flow cannot become a .pt2 "
                        "program: write .pth or .safetensors instead (-v shows the exporter's graph)"), msg
    assert len(msg.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def _line_of(name: str, code: str) -> int:
    return next(i for i, text in enumerate((TESTS / name).read_text().splitlines(), 1) if code in text)


def test_an_onnx_export_failure_names_the_line_and_shows_the_graph_once_with_v(tmp_path: Path) -> None:
    """The ONNX exporter tries torch.export twice (non-strict, strict) and torch prints each failed graph
    twice: with -v each appears once, and the error names the model's line."""
    pytest.importorskip("onnxscript")
    out = tmp_path / "dd.onnx"
    args = ["convert", "models_export:DataDependent", "--weights", "none", "--input-shape", "1,3,8,8", "-o", str(out)]
    loud = run_bnfuse(*args, "-v", cwd=TESTS, columns=200)  # without -v no graph: the .pt2 test above
    assert loud.returncode == 2, loud.stderr
    line = _line_of("models_export.py", "if y.sum() > 0")
    assert f"exported with the ONNX exporter: models_export.py:{line}: if y.sum() > 0: depends on" in loud.stderr
    graphs = ["\n".join(g.splitlines()[:5]) for g in loud.stderr.split("def forward(")[1:]]
    assert len(graphs) == len(set(graphs)) >= 1, loud.stderr  # each graph torch printed, once
    assert list(tmp_path.iterdir()) == []


class _FixedBatch(torch.nn.Module):
    """A parameter of batch 2 broadcast onto the output: torch.export makes the batch static (2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.p = torch.nn.Parameter(torch.zeros(2, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.p


class _FixedSpatial(_FixedBatch):
    """A parameter of 8x8 added to the output: the spatial dimensions become static."""

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("model, note", [
    (_FixedBatch, "input 0 2x3x?x?: dynamic 2, 3; the model fixes dimension(s) 0 (batch)"),
    (_FixedSpatial, "input 0 ?x3x8x8: dynamic batch; the model fixes dimension(s) 2, 3"),
])
def test_the_dynamic_dims_note_names_the_dimensions_the_model_fixed(model: type, note: str) -> None:
    # the channel dimension 1 is static by design (never exported as Dim.AUTO), so it is never "fixed
    # by the model"; a static batch was once reported as "fixes dimension(s) 1"
    from bnfuse_cli.files.export import export_program

    _, notes = export_program(model().eval(), (torch.randn(1, 3, 8, 8),))
    assert notes == [note]


# ----------------------------------------------------------------------------- ONNX (the onnx extra)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

#: runs an .onnx file in onnxruntime there
_ISOLATED_ORT = _BLOCKED + r"""
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
inputs = np.load(sys.argv[2])
np.savez(sys.argv[3], **{k: session.run(None, {name: inputs[k]})[0] for k in inputs.files})
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)))
"""


@pytest.fixture(scope="module")
def exported_onnx(exported: "tuple[Path, torch.nn.Module]") -> "tuple[Path, torch.nn.Module]":
    d, model = exported
    _convert(d, ".onnx", "onnxruntime", "input 0 batchx3xheightxwidth: dynamic batch, height, width; opset 20")
    return d, model


def test_onnx_runs_in_onnxruntime_without_bnfuse_or_the_model_code(exported_onnx: "tuple[Path, torch.nn.Module]"
                                                                  ) -> None:
    import numpy as np

    d, model = exported_onnx
    g = torch.Generator().manual_seed(5)
    inputs = {"b1": torch.randn(1, 3, 16, 16, generator=g), "b3": torch.randn(3, 3, 16, 16, generator=g)}
    np.savez(d / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})
    r = subprocess.run([sys.executable, "-I", "-c", _ISOLATED_ORT, str(d / "fused.onnx"), str(d / "inputs.npz"),
                        str(d / "outputs.npz")], capture_output=True, text=True, cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    outputs = np.load(d / "outputs.npz")
    for k, x in inputs.items():
        check = OutputCheck(Tolerance.for_dtype(torch.float32), reference="float64")
        with torch.no_grad():
            check.add(model.double()(x.double()), torch.from_numpy(outputs[k]), model.float()(x))
        assert check.ok and outputs[k].shape[0] == x.shape[0], check.reason(k)
    meta = {p.key: p.value for p in onnx.load(str(d / "fused.onnx")).metadata_props}
    assert json.loads(meta["bnfuse"])["arch"] == ARCH


def test_verify_judges_an_onnx_file_in_onnxruntime(exported_onnx: "tuple[Path, torch.nn.Module]") -> None:
    from onnx import numpy_helper

    d, _ = exported_onnx
    ok = run_bnfuse("verify", str(d / "orig.pth"), str(d / "fused.onnx"), "--arch", ARCH, cwd=TESTS, columns=200)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "note: 1 of 1 fold site(s) checked on the weights" in ok.stderr, ok.stderr
    proto = onnx.load(str(d / "fused.onnx"))
    init = next(i for i in proto.graph.initializer if i.name == "block.kxk.weight")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(proto, str(d / "wrong.onnx"))
    bad = run_bnfuse("verify", str(d / "orig.pth"), str(d / "wrong.onnx"), "--arch", ARCH, cwd=TESTS, columns=200)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "merge site block.kxk (" in " ".join(bad.stdout.split()), bad.stdout


_WITHOUT_ORT = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError("onnxruntime is not installed here")
sys.meta_path.insert(0, Block())
sys.argv = ["bnfuse", *sys.argv[1:]]
from bnfuse_cli.cli import main
main()
"""


def test_a_missing_onnx_extra_is_exit_2_naming_the_install(exported: "tuple[Path, torch.nn.Module]",
                                                           tmp_path: Path) -> None:
    d, _ = exported
    out = tmp_path / "m.onnx"
    r = subprocess.run([sys.executable, "-c", _WITHOUT_ORT, "convert", str(d / "orig.pth"), "--arch", ARCH, "-o",
                        str(out)], capture_output=True, text=True, cwd=TESTS, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert " ".join(r.stderr.split()) == (
        "error: .onnx needs the onnx extra (onnx, onnxscript, onnxruntime), and onnxruntime is not installed: "
        "pip install 'bnfuse[onnx]', or write .pt2, .pth or .safetensors")
    assert list(tmp_path.iterdir()) == []


def test_verify_without_the_onnx_extra_names_the_install_and_no_writing_advice(
        exported_onnx: "tuple[Path, torch.nn.Module]") -> None:
    d, _ = exported_onnx
    r = subprocess.run([sys.executable, "-c", _WITHOUT_ORT, "verify", str(d / "orig.pth"), str(d / "fused.onnx"),
                        "--arch", ARCH], capture_output=True, text=True, cwd=TESTS, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert " ".join(r.stderr.split()) == (
        f"error: reading {d / 'fused.onnx'} needs the onnx extra (onnx, onnxscript, onnxruntime), and onnxruntime "
        "is not installed: pip install 'bnfuse[onnx]'")


class _Versioned(nn.Module):
    """Like torchvision's MNASNet: refuses a state_dict that does not say which version saved it."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_program_weights_map_onto_modules_that_check_their_version() -> None:
    from bnfuse_cli.files.load import Source
    from bnfuse_cli.files.meta import FusedMeta
    from bnfuse_cli.workflows.verify import _program_layers

    orig, program = _Versioned(), _Versioned()
    with torch.no_grad():
        program.conv.weight.mul_(2)
    mapped, unmapped = _program_layers(Source(orig, "x:y", "name"),
                                       Source(program, "x:y", "program", FusedMeta("x:y")))
    assert unmapped == set() and torch.equal(mapped.conv.weight, program.conv.weight)


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_an_unwritable_program_path_is_exit_2_before_any_work(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / "missing" / f"m{suffix}"
    r = run_bnfuse("convert", "models_export:DataDependent", "--weights", "none", "-o", str(out), cwd=TESTS,
                   columns=200)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == f"error: cannot write {out}: the directory {out.parent} does not exist", r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_the_read_back_proof_compares_the_program_weights_by_name(tmp_path: Path, suffix: str) -> None:
    from bnfuse_cli.errors import OutputError
    from bnfuse_cli.files.table import output_format
    from bnfuse_cli.files.write import write_checkpoint

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    data, _ = output_format(f"m{suffix}").export(model, (torch.randn(1, 3, 8, 8),), {"arch": "x"})
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    write_checkpoint(tmp_path / f"ok{suffix}", state_dict=sd, metadata={"arch": "x"}, program=data)
    sd["0.weight"][0, 0, 0, 0] += 1e-3  # what the file holds is no longer what was meant to be written
    with pytest.raises(OutputError, match=r"failed the read-back check \(missing \[\], unexpected \[\], different "
                                          r"values or shapes \['0\.weight'\]\)"):
        write_checkpoint(tmp_path / f"bad{suffix}", state_dict=sd, metadata={"arch": "x"}, program=data)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ok{suffix}"]


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
@pytest.mark.parametrize("change", ["one ulp", "negative zero"])
def test_the_read_back_proof_is_bit_for_bit(tmp_path: Path, suffix: str, change: str) -> None:
    """One weight value one ulp away, or 0.0 against -0.0: equal within any tolerance, still not what was
    meant. The proof compares bits, so it refuses both."""
    from bnfuse_cli.errors import OutputError
    from bnfuse_cli.files.table import output_format
    from bnfuse_cli.files.write import write_checkpoint

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = 0.0 if change == "negative zero" else 0.5
    data, _ = output_format(f"m{suffix}").export(model, (torch.randn(1, 3, 8, 8),), {"arch": "x"})
    meant = {k: v.clone() for k, v in model.state_dict().items()}
    w = meant["0.weight"]
    w[0, 0, 0, 0] = -0.0 if change == "negative zero" else torch.nextafter(w[0, 0, 0, 0], torch.tensor(1.0))
    assert torch.allclose(w, model[0].weight, rtol=0, atol=1e-7) and not torch.equal(
        w.view(torch.int32), model[0].weight.view(torch.int32))
    with pytest.raises(OutputError, match=r"different values or shapes \['0\.weight'\]"):
        write_checkpoint(tmp_path / f"m{suffix}", state_dict=meant, metadata={"arch": "x"}, program=data)
    assert list(tmp_path.iterdir()) == []


def test_verify_says_when_the_file_records_another_architecture(exported: "tuple[Path, torch.nn.Module]") -> None:
    d, _ = exported
    r = run_bnfuse("verify", "bench_tiny:tiny_cnn", str(d / "fused.pt2"), "--weights", "none", cwd=TESTS, columns=400)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == (
        f"error: {d / 'fused.pt2'} records that it was converted from {ARCH}, but the original is bench_tiny:tiny_cnn: "
        f"3 of the sites it records name layers bench_tiny:tiny_cnn does not have. Compare the fused file with the "
        f"original it was converted from ({ARCH})")


def test_a_program_given_as_the_original_is_refused_truly(exported: "tuple[Path, torch.nn.Module]") -> None:
    d, _ = exported
    r = run_bnfuse("verify", str(d / "fused.pt2"), str(d / "fused.pt2"), cwd=TESTS, columns=400)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == (
        f"error: {d / 'fused.pt2'} is a torch.export program: bnfuse reads one only as the fused model (the FUSED "
        "argument of verify, or bnfuse_cli.load), never as a checkpoint to convert, inspect, bench or verify "
        "against; give the original's checkpoint or model name")


def test_a_dangling_symlink_as_output_is_refused_before_any_work(tmp_path: Path) -> None:
    link = tmp_path / "m.pt2"
    link.symlink_to(tmp_path / "gone.pt2")
    # a model torch.export cannot capture: refused after the export, the message would say so
    r = run_bnfuse("convert", "models_export:DataDependent", "--weights", "none", "-o", str(link), cwd=TESTS,
                   columns=400)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == (f"error: {link} already exists as a symbolic link to {tmp_path / 'gone.pt2'}, which "
                                "does not exist: pass --force to replace the link, or choose another -o")
    assert os.readlink(link) == str(tmp_path / "gone.pt2")


def test_one_parameter_count_and_named_dimensions_in_every_format(tmp_path: Path, tests_on_path: None) -> None:
    """convert, and verify of the .onnx and of the .pt2, count the same parameters (the graph's integer shape
    constants are not weights); the ONNX input's dynamic dimensions are called batch, height and width."""
    pytest.importorskip("onnxscript")
    from bnfuse_cli import SourceOptions, convert, verify

    src = SourceOptions(arch="models_export:Headed", input_shape="1,3,8,8")
    torch.save(randomize_bn(__import__("models_export").Headed(), seed=2).state_dict(), tmp_path / "orig.pth")
    counts = {}
    for suffix in (".onnx", ".pt2"):
        out = tmp_path / f"f{suffix}"
        counts[f"convert {suffix}"] = convert(tmp_path / "orig.pth", out, source_options=src).params_after
        checked = verify(tmp_path / "orig.pth", out, source_options=src)
        assert checked.ok, checked.verdict.reasons
        counts[f"verify {suffix}"] = checked.to_dict()["structure"]["params_fused"]
    assert len(set(counts.values())) == 1, counts
    proto = onnx.load(str(tmp_path / "f.onnx"))
    assert any(i.data_type == onnx.TensorProto.INT64 for i in proto.graph.initializer)  # the case in point
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"], dims
    assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == ["batch", 5]

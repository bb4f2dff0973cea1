"""``bnfuse verify`` and the shipped digits example: a correct fold passes, a wrong one is caught."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import ROOT, randomize_bn, run_bnfuse

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnfuse_cli.files.table import read_checkpoint  # noqa: E402
from bnfuse_cli.files.write import write_checkpoint  # noqa: E402
from bnfuse_cli.cli import app  # noqa: E402
from bnfuse_cli import BenchSettings, ConvertOptions, JudgeOptions, SourceOptions  # noqa: E402
from bnfuse_cli.workflows.convert import convert  # noqa: E402
from bnfuse_cli.errors import CheckpointError, UsageError  # noqa: E402
from bnfuse_cli.files.data import read_data  # noqa: E402
from bnfuse_cli.workflows.verify import verify  # noqa: E402
from examples.digits import DigitsCNN  # noqa: E402

ARCH = "examples.digits:DigitsCNN"
EXAMPLE = ROOT / "examples" / "digits_cnn.pth"
VAL = ROOT / "examples" / "digits_val.pt"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A DigitsCNN with random BN statistics and its fused .safetensors."""
    model = randomize_bn(DigitsCNN(), seed=5).eval()
    torch.save(model.state_dict(), tmp_path / "orig.pth")
    convert(tmp_path / "orig.pth", tmp_path / "fused.safetensors", source_options=SourceOptions(arch=ARCH))
    return tmp_path / "orig.pth", tmp_path / "fused.safetensors"


def _tamper(src: Path, dest: Path, key: str, factor: float) -> None:
    """Copy a fused file with one tensor scaled: what a wrong fold of one layer looks like."""
    ck = read_checkpoint(src)
    sd = dict(ck.state_dict)
    sd[key] = sd[key] * factor
    write_checkpoint(dest, state_dict=sd, metadata=ck.metadata)


# ----------------------------------------------------------------------------- the shipped example


def test_shipped_example_is_small_trained_and_labelled() -> None:
    assert EXAMPLE.stat().st_size < 1_000_000 and VAL.stat().st_size < 1_000_000
    sd = read_checkpoint(EXAMPLE).state_dict
    bns = [k[: -len(".running_var")] for k in sd if k.endswith(".running_var")]
    assert len(bns) >= 4 and any(sd[f"{b}.running_var"].dim() == 1 for b in bns)
    for b in bns:  # real statistics, not the identity of a fresh layer
        assert not torch.allclose(sd[f"{b}.running_var"], torch.ones_like(sd[f"{b}.running_var"]))
        assert sd[f"{b}.num_batches_tracked"] > 0
    model = DigitsCNN().eval()
    model.load_state_dict(sd)
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    x, y = read_data(VAL)
    assert x.shape[1:] == (1, 8, 8) and y.shape == (x.shape[0],) and len(set(y.tolist())) == 10
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc > 0.95


def test_demo_convert_then_verify_with_data(tmp_path: Path) -> None:
    fused = tmp_path / "digits_fused.safetensors"
    convert(EXAMPLE, fused, source_options=SourceOptions(arch=ARCH))
    r = verify(EXAMPLE, fused, JudgeOptions(data=VAL), SourceOptions(arch=ARCH))
    assert r.ok and r.worst < 0.1
    assert r.fused_arch == ARCH and r.fused_kind == "state_dict"
    assert r.structure.removed == ["features.1", "features.4", "features.8", "classifier.2"]
    assert r.structure.bn_fused == []
    assert r.structure.params_fused < r.structure.params_orig and r.structure.buffers_fused == 0
    d = r.data
    assert d is not None and d.count == read_data(VAL)[0].shape[0]
    assert d.accuracy_orig == d.accuracy_fused and d.accuracy_orig > 0.95
    assert d.agreement == 1.0 and 0 < d.error.max_abs < 1e-4 and d.error.cosine > 0.999999
    assert r.input.shape[1:] == (1, 8, 8)  # random inputs shaped like the data
    data = r.to_dict()
    json.dumps(data)
    assert data["ok"] is True and data["data"]["accuracy_fused"] == d.accuracy_fused


def test_cli_demo_commands_exit_0_and_json(tmp_path: Path) -> None:
    fused = tmp_path / "digits_fused.safetensors"
    res = runner.invoke(app, ["convert", str(EXAMPLE), "--arch", ARCH, "-o", str(fused), "--force"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["verify", str(EXAMPLE), str(fused), "--arch", ARCH, "--data", str(VAL),
                              "--json", str(tmp_path / "v.json"), "-v"])
    assert res.exit_code == 0, res.output
    assert "OK" in res.stdout and "4 removed" in res.stdout and "accuracy" in res.stdout
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["ok"] and data["structure"]["bn_orig"] == 4 and data["structure"]["bn_fused"] == 0
    assert data["data"]["top1_agreement"] == 1.0


# ----------------------------------------------------------------------------- verdicts


def test_wrong_fold_is_caught(pair: tuple[Path, Path], tmp_path: Path) -> None:
    orig, fused = pair
    bad = tmp_path / "bad.safetensors"
    _tamper(fused, bad, "features.3.weight", 1.01)  # one conv 1% off, as a fold with a wrong scale
    r = verify(orig, bad, source_options=SourceOptions(arch=ARCH))
    assert not r.ok and r.worst > 1 and r.error.max_abs > 1e-4
    res = runner.invoke(app, ["verify", str(orig), str(bad), "--arch", ARCH, "--json", str(tmp_path / "v.json")])
    assert res.exit_code == 1, res.output
    assert "DIFFERENT" in res.stdout
    assert json.loads((tmp_path / "v.json").read_text())["ok"] is False


def test_correct_fold_passes_and_tolerance_options_are_used(pair: tuple[Path, Path], tmp_path: Path) -> None:
    orig, fused = pair
    r = verify(orig, fused, JudgeOptions(samples=5), SourceOptions(arch=ARCH, seed=11))
    assert r.ok and r.samples == 5 and r.rtol == 1e-4 and r.top1_rows == 5 and r.top1_agreement is not None
    assert 0 < r.error.max_abs and r.error.rel < 1e-5 and r.error.cosine > 0.999999
    # with no floor, only the original's own float32 error (times 4) is allowed: the fold uses
    # more of it, and the options reach the verdict and the JSON
    strict = verify(orig, fused, JudgeOptions(samples=5, rtol=0.0, atol=0.0), SourceOptions(arch=ARCH, seed=11))
    assert (strict.rtol, strict.atol) == (0.0, 0.0) and strict.worst > 10 * r.worst
    assert strict.ok == (strict.error.max_abs <= 4 * strict.verdict.outputs["random inputs"].noise.max_abs)
    loose = verify(orig, fused, JudgeOptions(rtol=0.0, atol=1e-3), SourceOptions(arch=ARCH))
    assert loose.ok and loose.worst < r.worst
    out = tmp_path / "v.json"
    res = runner.invoke(app, ["verify", str(orig), str(fused), "--arch", ARCH, "--rtol", "2e-4", "--atol", "3e-6",
                              "--json", str(out)])
    assert res.exit_code == 0, res.output
    tol = json.loads(out.read_text())["check"]["tolerance"]
    assert (tol["rtol"], tol["atol"], tol["noise_factor"]) == (2e-4, 3e-6, 4.0)


def test_same_file_twice_passes_but_says_nothing_was_folded(pair: tuple[Path, Path]) -> None:
    orig, _ = pair
    r = verify(orig, orig, source_options=SourceOptions(arch=ARCH))
    assert r.ok and r.error == r.verdict.outputs["random inputs"].noise and r.structure.removed == []
    assert any("nothing was" in n for n in r.notes)


def test_different_output_shapes_fail_with_the_reason(pair: tuple[Path, Path], tmp_path: Path) -> None:
    orig, _ = pair
    other = randomize_bn(DigitsCNN(num_classes=7), seed=1).eval()
    torch.save(other, tmp_path / "seven.pth")
    r = verify(orig, tmp_path / "seven.pth", source_options=SourceOptions(arch=ARCH, allow_pickle=True))
    assert not r.ok and "differ in structure" in (r.error.mismatch or "")
    res = runner.invoke(app, ["verify", str(orig), str(tmp_path / "seven.pth"), "--arch", ARCH, "--allow-pickle"])
    assert res.exit_code == 1 and "differ in structure" in res.stdout


def test_any_input_form_against_any_output_form(pair: tuple[Path, Path], tmp_path: Path) -> None:
    import warnings

    orig, fused = pair
    model = DigitsCNN()
    model.load_state_dict(torch.load(orig, weights_only=True))
    model.eval()
    torch.save(model, tmp_path / "whole.pth")  # pickled module in, pickled module out
    convert(tmp_path / "whole.pth", tmp_path / "whole_fused.pth", source_options=SourceOptions(allow_pickle=True))
    r = verify(tmp_path / "whole.pth", tmp_path / "whole_fused.pth", source_options=SourceOptions(allow_pickle=True))
    assert r.ok and r.orig_kind == "module" and r.fused_kind == "module" and len(r.structure.removed) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(tmp_path / "ts.pt"))
    torch.save({"epoch": 1, "optimizer": {}, "model_state_dict": {"module." + k: v for k, v in
                                                                   model.state_dict().items()}}, tmp_path / "ddp.ckpt")
    for src in ("ts.pt", "ddp.ckpt"):
        r = verify(tmp_path / src, fused, source_options=SourceOptions(arch=ARCH))
        assert r.ok and len(r.structure.removed) == 4, src


# ----------------------------------------------------------------------------- data files


@pytest.mark.parametrize("form", ["dict", "tuple", "xy", "tensor", "onehot", "safetensors"])
def test_data_file_forms(pair: tuple[Path, Path], tmp_path: Path, form: str) -> None:
    orig, fused = pair
    x = torch.rand(37, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (37,), generator=torch.Generator().manual_seed(3))
    path = tmp_path / ("d.safetensors" if form == "safetensors" else "d.pt")
    if form == "safetensors":
        from safetensors.torch import save_file

        save_file({"inputs": x, "labels": y}, str(path))
    else:
        obj = {"dict": {"inputs": x, "labels": y}, "tuple": (x, y), "xy": {"x": x, "y": y}, "tensor": x,
               "onehot": {"images": x, "targets": nn.functional.one_hot(y, 10).float()}}[form]
        torch.save(obj, path)
    r = verify(orig, fused, JudgeOptions(data=path, batch_size=10),  # several batches, the last one short
               SourceOptions(arch=ARCH))
    assert r.ok and r.data is not None and r.data.count == 37 and r.data.agreement == 1.0
    model = DigitsCNN()
    model.load_state_dict(torch.load(orig, weights_only=True))
    with torch.no_grad():
        expected = float((model.eval()(x).argmax(1) == y).float().mean())
    if form == "tensor":
        assert r.data.accuracy_orig is None
    else:
        assert r.data.accuracy_orig == pytest.approx(expected) and r.data.accuracy_fused == pytest.approx(expected)


def test_bad_data_files(pair: tuple[Path, Path], tmp_path: Path) -> None:
    orig, fused = pair
    torch.save({"inputs": torch.rand(4, 1, 8, 8), "labels": torch.tensor([1, 2])}, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="do not fit 4 inputs"):
        verify(orig, fused, JudgeOptions(data=tmp_path / "short.pt"), SourceOptions(arch=ARCH))
    torch.save({"pixels": torch.rand(4, 1, 8, 8)}, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError, match="'pixels'.*inputs"):
        verify(orig, fused, JudgeOptions(data=tmp_path / "keys.pt"), SourceOptions(arch=ARCH))
    torch.save(torch.rand(4, 3, 5, 5), tmp_path / "shape.pt")
    with pytest.raises(Exception, match="--input-shape") as info:
        verify(orig, fused, JudgeOptions(data=tmp_path / "shape.pt"), SourceOptions(arch=ARCH))
    assert type(info.value).__name__ == "BnfuseError"
    with pytest.raises(UsageError, match="--samples"):
        verify(orig, fused, JudgeOptions(samples=0), SourceOptions(arch=ARCH))


def test_subprocess_verify_exit_codes(pair: tuple[Path, Path], tmp_path: Path) -> None:
    orig, fused = pair
    ok = run_bnfuse("verify", str(orig), str(fused), "--arch", ARCH, "--samples", "2", cwd=ROOT)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout and "Traceback" not in ok.stderr
    bad = tmp_path / "bad.safetensors"
    _tamper(fused, bad, "classifier.1.bias", 1.5)
    diff = run_bnfuse("verify", str(orig), str(bad), "--arch", ARCH, cwd=ROOT)
    assert diff.returncode == 1 and "DIFFERENT" in diff.stdout and "Traceback" not in diff.stderr


def test_verify_takes_the_architecture_from_the_fused_files_record(pair: tuple[Path, Path]) -> None:
    """``bnfuse verify orig.pth fused.safetensors`` with no --arch: the bare state_dict is rebuilt in the
    architecture the fused file records, and the command says so; an --arch or an original that
    disagrees with the record is exit 2, named as such (not as a missing layer)."""
    from bnfuse_cli.workflows.bench import bench

    orig, fused = pair
    ok = run_bnfuse("verify", str(orig), str(fused), "--samples", "1", cwd=ROOT, columns=200)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"note: architecture: {ARCH}, from {fused}'s record" in ok.stderr and "OK" in ok.stdout
    wrong = run_bnfuse("verify", str(orig), str(fused), "--arch", "resnet18", cwd=ROOT, columns=200)
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert f"--arch resnet18 disagrees with {fused}'s record: it was converted from {ARCH}" in wrong.stderr
    assert "fold plan" not in wrong.stderr and "Traceback" not in wrong.stderr
    r = verify(orig, fused, JudgeOptions(samples=1))
    assert r.ok and (r.arch, r.arch_from) == (ARCH, f"{fused}'s record") and r.to_dict()["arch_from"] == r.arch_from
    with pytest.raises(UsageError, match=f"records that it was converted from {ARCH}, but the original is resnet18"):
        verify("resnet18", fused, JudgeOptions(samples=1), SourceOptions(weights="none"))
    with pytest.raises(UsageError, match="--arch resnet18 disagrees"):
        bench([str(fused)], BenchSettings(device="cpu", iters=1, warmup=0),
              SourceOptions(arch="resnet18", weights="none"))


def test_an_exported_program_brings_the_architecture_too(pair: tuple[Path, Path]) -> None:
    """A .pt2 is opened in its runtime, not rebuilt, so only verify itself can refuse an --arch that
    disagrees with its record; without --arch the original takes the record's."""
    orig, _ = pair
    program = orig.with_name("fused.pt2")
    convert(orig, program, source_options=SourceOptions(arch=ARCH, input_shape="1,1,8,8"))
    r = verify(orig, program, JudgeOptions(samples=1))
    assert r.ok and r.fused_kind == "program" and (r.arch, r.arch_from) == (ARCH, f"{program}'s record")
    with pytest.raises(UsageError, match=f"--arch resnet18 disagrees with {program}'s record"):
        verify(orig, program, JudgeOptions(samples=1), SourceOptions(arch="resnet18"))


def test_resnet18_fold_passes_default_tolerance(tmp_path: Path) -> None:
    import torchvision

    model = randomize_bn(torchvision.models.resnet18(), seed=2).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    convert(tmp_path / "r18.pth", tmp_path / "r18.safetensors",
            source_options=SourceOptions(arch="resnet18", input_shape="1,3,64,64"))
    r = verify(tmp_path / "r18.pth", tmp_path / "r18.safetensors",
               source_options=SourceOptions(arch="resnet18", input_shape="2,3,64,64"))
    assert r.ok and r.worst < 0.1 and len(r.structure.removed) == 20 and r.top1_rows == 6


@pytest.mark.zoo
def test_resnet50_fold_passes_default_tolerance(tmp_path: Path) -> None:
    import torchvision

    for seed in (0, 1):
        model = randomize_bn(torchvision.models.resnet50(), seed=seed).eval()
        torch.save(model.state_dict(), tmp_path / "r50.pth")
        convert(tmp_path / "r50.pth", tmp_path / "r50.safetensors", ConvertOptions(force=True),
                SourceOptions(arch="resnet50"))
        r = verify(tmp_path / "r50.pth", tmp_path / "r50.safetensors", JudgeOptions(samples=4),
                   SourceOptions(arch="resnet50"))
        assert r.ok and r.worst < 0.1 and len(r.structure.removed) == 53, r.to_dict()
        _tamper(tmp_path / "r50.safetensors", tmp_path / "bad.safetensors", "layer4.2.conv3.weight", 1.01)
        assert not verify(tmp_path / "r50.pth", tmp_path / "bad.safetensors",
                          source_options=SourceOptions(arch="resnet50")).ok
        (tmp_path / "bad.safetensors").unlink()

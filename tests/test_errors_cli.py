"""Bad inputs give one clear paragraph naming the file, layer or option, exit code 2, no traceback."""

from __future__ import annotations

import os

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, randomize_bn, run_bnfuse

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnfuse_cli.files import write as ckmod  # noqa: E402
from bnfuse_cli.cli import app  # noqa: E402
from examples.digits import DigitsCNN  # noqa: E402

ARCH = "examples.digits:DigitsCNN"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


@pytest.fixture
def sd_file(tmp_path: Path) -> Path:
    torch.save(randomize_bn(DigitsCNN(), seed=4).state_dict(), tmp_path / "m.pth")
    return tmp_path / "m.pth"


def _fails(args: list[str], *patterns: str) -> str:
    """Run the CLI in this process, from the repository's folder (the same app and exit-code table as
    ``python -m bnfuse_cli``, whose real process :func:`test_real_entry_point_bad_inputs` and the other
    files' ``run_bnfuse`` tests run); expect exit 2, one error paragraph on stderr matching every
    pattern, no traceback (no exception but the exit), and nothing on stdout."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    try:
        res = runner.invoke(app, args, env={"COLUMNS": "80"})
    finally:
        sys.path.remove(str(ROOT))
        os.chdir(cwd)
    text = res.stderr
    assert isinstance(res.exception, SystemExit) and res.exit_code == 2, (res.exit_code, res.exception, res.stdout, text)
    assert "Traceback" not in text, text
    assert text.count("error:") == 1, text
    assert res.stdout == "", res.stdout
    for p in patterns:
        assert p in text.replace("\n", " "), (p, text)
    return text


def _fails_in_process(args: list[str], *patterns: str) -> str:
    """As :func:`_fails`, in this process (for a monkeypatched fault): the app must end with a
    SystemExit of 2, never with another exception."""
    res = runner.invoke(app, args)
    assert isinstance(res.exception, SystemExit) and res.exit_code == 2, (res.exit_code, res.exception, res.output)
    assert res.stderr.count("error:") == 1, res.stderr
    for p in patterns:
        assert p in res.stderr, (p, res.stderr)
    return res.stderr


def _bad_stats(sd_file: Path, layer: str, value: float) -> Path:
    sd = torch.load(sd_file, weights_only=True)
    sd[f"{layer}.running_var"][3] = value
    out = sd_file.with_name(f"bad_{layer}.pth")
    torch.save(sd, out)
    return out


@pytest.mark.parametrize("name,content,message", [
    ("empty.pth", b"", "is empty (0 bytes)"),
    ("noise.pth", bytes((i * 131 + 7) % 256 for i in range(4096)), "not a PyTorch checkpoint"),
    ("config.pth", b'{"model": "resnet50", "lr": 0.1}', "is a text file"),
    ("weights.h5", b"\x89HDF\r\n\x1a\n" + bytes(64), "unknown checkpoint suffix '.h5'"),
    # an exported program is read only as a fused model (verify's FUSED), never as a checkpoint to convert
    ("weights.onnx", b"\x08\x07\x12\x07pytorch" + bytes(64), "is an ONNX model: bnfuse reads one only as the fused model"),
])
def test_unreadable_inputs(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    _fails(["convert", str(tmp_path / name), "--arch", ARCH, "-o", str(tmp_path / "out.pth")], name, message)
    assert not (tmp_path / "out.pth").exists()


def test_missing_truncated_and_tensorless(tmp_path: Path, sd_file: Path) -> None:
    out = str(tmp_path / "out.pth")
    _fails(["convert", str(tmp_path / "nope.pth"), "-o", out], "nope.pth: no such file")
    data = sd_file.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) * 2 // 3])
    _fails(["convert", str(tmp_path / "cut.pth"), "--arch", ARCH, "-o", out], "cut.pth", "truncated or corrupt")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "meta.pth")
    _fails(["convert", str(tmp_path / "meta.pth"), "--arch", ARCH, "-o", out], "contains no model weights", "'epoch'")


def test_unknown_model_names_suggest_the_closest(tmp_path: Path) -> None:
    out = str(tmp_path / "out.pth")
    _fails(["convert", "resnet5", "-o", out], "unknown model 'resnet5'", "Did you mean resnet50")
    _fails(["inspect", "mobilenetv2"], "unknown model 'mobilenetv2'", "mobilenet_v2")


def test_bad_arch(sd_file: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out.pth")
    _fails(["convert", str(sd_file), "--arch", "nosuchpkg.models:Net", "-o", out], "cannot import 'nosuchpkg.models'")
    _fails(["convert", str(sd_file), "--arch", "examples.digits:NoSuchNet", "-o", out], "no attribute 'NoSuchNet'")
    _fails(["convert", str(sd_file), "--arch", "resnet18", "-o", out], "does not match architecture resnet18",
           "missing keys: conv1.weight", "unexpected keys: features.0.weight")
    _fails(["convert", str(sd_file), "-o", out], "needs the model code: pass --arch")


@pytest.mark.parametrize("layer,value", [("features.4", float("nan")), ("classifier.2", -0.5)])
def test_corrupt_bn_statistics_name_the_layer(sd_file: Path, tmp_path: Path, layer: str, value: float) -> None:
    bad = _bad_stats(sd_file, layer, value)
    out = tmp_path / "out.safetensors"
    _fails(["convert", str(bad), "--arch", ARCH, "-o", str(out)], f"{layer} has NaN, infinite or negative running_var")
    assert not out.exists()


def test_output_paths(sd_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fails(["convert", str(sd_file), "--arch", ARCH, "-o", str(sd_file), "--force"], "never overwrites its input")
    existing = tmp_path / "old.pth"
    existing.write_bytes(b"keep me")
    _fails(["convert", str(sd_file), "--arch", ARCH, "-o", str(existing)], "already exists", "--force")
    assert existing.read_bytes() == b"keep me"
    _fails(["convert", str(sd_file), "--arch", ARCH, "-o", str(tmp_path / "no" / "dir" / "f.pth")], "does not exist")
    _fails(["convert", str(sd_file), "--arch", ARCH, "-o", str(tmp_path / "f.tflite")], "unknown output suffix '.tflite'")

    real = ckmod._open_temporary

    def read_only(directory: Path, name: str):  # noqa: ANN202
        if Path(directory).resolve() == (tmp_path / "ro").resolve():
            raise PermissionError(13, "Permission denied")
        return real(directory, name)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(ckmod, "_open_temporary", read_only)
    _fails_in_process(["convert", str(sd_file), "--arch", ARCH, "-o", str(tmp_path / "ro" / "f.pth")],
           "directory", "is not writable", "Permission denied")
    assert list((tmp_path / "ro").iterdir()) == []


def test_unsafe_pickle_refused_and_not_run(sd_file: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (open, (str(marker), "w"))

    torch.save({"state_dict": torch.load(sd_file, weights_only=True), "hook": Payload()}, tmp_path / "evil.pth")
    for cmd in (["convert", str(tmp_path / "evil.pth"), "--arch", ARCH, "-o", str(tmp_path / "o.pth")],
                ["inspect", str(tmp_path / "evil.pth"), "--arch", ARCH],
                ["verify", str(sd_file), str(tmp_path / "evil.pth"), "--arch", ARCH]):
        _fails(cmd, "evil.pth is a full pickle", "nothing in it was executed", "--allow-pickle")
    assert not marker.exists()


def test_verify_bad_inputs(sd_file: Path, tmp_path: Path) -> None:
    _fails(["verify", str(sd_file), str(tmp_path / "nope.safetensors"), "--arch", ARCH], "nope.safetensors: no such file")
    torch.save({"labels": torch.zeros(3)}, tmp_path / "d.pt")
    _fails(["verify", str(sd_file), str(sd_file), "--arch", ARCH, "--data", str(tmp_path / "d.pt")],
           "--data", "no inputs")
    _fails(["verify", str(sd_file), str(sd_file), "--arch", ARCH, "--data", str(tmp_path / "none.pt")],
           "none.pt: no such file")
    _fails(["verify", str(sd_file), str(sd_file), "--arch", ARCH, "--input-shape", "1,3,x"], "--input-shape")
    _fails(["verify", str(sd_file), str(sd_file), "--arch", ARCH, "--input-shape", "1,3,32,32"],
           "--input-shape", "running the original model")
    _fails(["verify", str(sd_file), str(sd_file), "--arch", ARCH, "--samples", "0"], "--samples 0")


def test_real_entry_point_bad_inputs(sd_file: Path, tmp_path: Path) -> None:
    bad = _bad_stats(sd_file, "features.8", float("nan"))
    res = run_bnfuse("convert", str(bad), "--arch", ARCH, "-o", str(tmp_path / "o.pth"), cwd=ROOT)
    assert res.returncode == 2
    assert "features.8 has NaN, infinite or negative running_var" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o.pth").exists()
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02junk" * 10)
    res = run_bnfuse("verify", str(tmp_path / "junk.pth"), str(sd_file), "--arch", ARCH, cwd=ROOT)
    assert res.returncode == 2 and "junk.pth" in res.stderr and "Traceback" not in res.stderr

"""Reading checkpoints in every form found in practice, never running a pickle unasked, and
writing outputs atomically (read back and checked before they replace anything)."""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT, flip_bit, randomize_bn

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnfuse_cli.files import readback, write  # noqa: E402
from bnfuse_cli.files.read import NESTED_KEYS
from bnfuse_cli.files.table import read_checkpoint  # noqa: E402
from bnfuse_cli.files.write import check_output_path, write_checkpoint  # noqa: E402
from bnfuse_cli import ConvertOptions, SourceOptions  # noqa: E402
from bnfuse_cli.workflows.convert import convert  # noqa: E402
from bnfuse_cli.errors import CheckpointError, OutputError, UnsafeCheckpointError, UsageError  # noqa: E402
from bnfuse_cli.files.load import load, load_source  # noqa: E402
from examples.digits import DigitsCNN  # noqa: E402

ARCH = "examples.digits:DigitsCNN"


@pytest.fixture(autouse=True)
def _cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # `examples.digits:DigitsCNN` is importable from the repository root


@pytest.fixture
def model() -> nn.Module:
    return randomize_bn(DigitsCNN(), seed=3).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor, *, exact: bool = True) -> None:
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    if exact:
        assert torch.equal(ya, yb)
    else:
        torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)


class _Payload:
    """Unpickling this creates a file: proof that the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


# ----------------------------------------------------------------------------- reading forms


def test_plain_state_dict(tmp_path: Path, model: nn.Module, x: torch.Tensor) -> None:
    torch.save(model.state_dict(), tmp_path / "m.pth")
    src = load_source(tmp_path / "m.pth", arch=ARCH)
    assert src.kind == "state_dict" and src.arch == ARCH and not src.model.training
    _same_outputs(model, src.model, x)


@pytest.mark.parametrize("key", NESTED_KEYS)
def test_nested_training_checkpoint(tmp_path: Path, model: nn.Module, x: torch.Tensor, key: str) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()  # a real optimizer state with tensors: it must not be taken for the weights
    model.eval()
    torch.save({"epoch": 7, "optimizer": opt.state_dict(), key: model.state_dict(), "best_acc": 0.9},
               tmp_path / "train.ckpt")
    ck = read_checkpoint(tmp_path / "train.ckpt")
    assert ck.kind == "state_dict" and set(ck.state_dict) == set(model.state_dict())
    assert any(key in n for n in ck.notes)
    _same_outputs(model, load_source(tmp_path / "train.ckpt", arch=ARCH).model, x)


def test_state_dict_preferred_over_ema_and_noted(tmp_path: Path, model: nn.Module) -> None:
    ema = randomize_bn(DigitsCNN(), seed=9).state_dict()
    torch.save({"state_dict_ema": ema, "state_dict": model.state_dict()}, tmp_path / "m.pth")
    ck = read_checkpoint(tmp_path / "m.pth")
    assert torch.equal(ck.state_dict["features.1.running_var"], model.state_dict()["features.1.running_var"])
    assert any("state_dict_ema" in n for n in ck.notes)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, model: nn.Module, x: torch.Tensor, prefix: str) -> None:
    torch.save({"model_state_dict": {prefix + k: v for k, v in model.state_dict().items()}}, tmp_path / "m.pth")
    src = load_source(tmp_path / "m.pth", arch=ARCH)
    assert any("prefix" in n for n in src.notes)
    _same_outputs(model, src.model, x)


def test_lightning_prefix_stripped_only_when_keys_then_match(tmp_path: Path, model: nn.Module,
                                                            x: torch.Tensor) -> None:
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}}, tmp_path / "m.ckpt")
    src = load_source(tmp_path / "m.ckpt", arch=ARCH)
    assert any("'model.'" in n for n in src.notes)
    _same_outputs(model, src.model, x)
    # the same prefix on weights of another shape must still fail, naming the keys
    other = {"model." + k: v for k, v in model.state_dict().items() if not k.startswith("classifier.5")}
    torch.save(other, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="classifier.5.weight"):
        load_source(tmp_path / "bad.pth", arch=ARCH)


def test_mismatching_state_dict_lists_missing_and_unexpected(tmp_path: Path, model: nn.Module) -> None:
    sd = model.state_dict()
    sd["extra.weight"] = torch.zeros(3)
    del sd["features.1.running_mean"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError) as info:
        load_source(tmp_path / "m.pth", arch=ARCH)
    msg = str(info.value)
    assert msg == (
        f"{tmp_path / 'm.pth'} does not match architecture {ARCH}: missing keys: features.1.running_mean; "
        "unexpected keys: extra.weight; wrong shapes: none. Check --arch (and its options), or that the file holds "
        "this model's weights")


def test_state_dict_without_arch_asks_for_it(tmp_path: Path, model: nn.Module) -> None:
    torch.save(model.state_dict(), tmp_path / "m.pth")
    with pytest.raises(UsageError, match="--arch"):
        load_source(tmp_path / "m.pth")


def test_safetensors(tmp_path: Path, model: nn.Module, x: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    _same_outputs(model, load_source(tmp_path / "m.safetensors", arch=ARCH).model, x)


def test_torchscript_weights_used_code_not(tmp_path: Path, model: nn.Module, x: torch.Tensor) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(tmp_path / "m.pt"))
    ck = read_checkpoint(tmp_path / "m.pt")
    assert ck.kind == "torchscript"
    src = load_source(tmp_path / "m.pt", arch=ARCH)
    assert isinstance(src.model, DigitsCNN)
    _same_outputs(model, src.model, x)


def test_pickled_module_refused_then_allowed(tmp_path: Path, model: nn.Module, x: torch.Tensor) -> None:
    torch.save(model, tmp_path / "whole.pth")
    torch.save({"model": model, "epoch": 2}, tmp_path / "nested_whole.pth")
    for name in ("whole.pth", "nested_whole.pth"):
        with pytest.raises(UnsafeCheckpointError) as info:
            read_checkpoint(tmp_path / name)
        msg = str(info.value)
        assert msg == (
            f"{tmp_path / name} is a full pickle: it needs the Python object examples.digits.DigitsCNN, and loading "
            "it runs code stored in the file, which can do anything a program you run can do (delete files, steal "
            "keys). bnfuse refused and nothing in it was executed. If you trust where it came from, pass "
            "--allow-pickle (allow_pickle=True in Python); better, ask for a state_dict or .safetensors file")
        src = load_source(tmp_path / name, allow_pickle=True)
        assert src.kind == "module"
        _same_outputs(model, src.model, x)


def test_malicious_pickle_never_runs_unless_allowed(tmp_path: Path, model: nn.Module) -> None:
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": model.state_dict(), "x": _Payload(marker)}, tmp_path / "evil.pth")
    with open(tmp_path / "evil_raw.pth", "wb") as fh:  # a bare pickle, not torch's zip format
        pickle.dump(_Payload(marker), fh)
    for name, what in (("evil.pth", "io.open"), ("evil_raw.pth", "plain Python pickle")):
        with pytest.raises(UnsafeCheckpointError, match=f"{what}.*nothing in it was executed.*--allow-pickle"):
            read_checkpoint(tmp_path / name)
        with pytest.raises(UnsafeCheckpointError):
            load_source(tmp_path / name, arch=ARCH)
        assert not marker.exists()
    # the payload is real: full unpickling (what --allow-pickle permits) does create the file
    read_checkpoint(tmp_path / "evil.pth", allow_pickle=True)
    assert marker.exists()


def test_plain_pickle_of_a_state_dict_needs_allow_pickle(tmp_path: Path, model: nn.Module, x: torch.Tensor) -> None:
    with open(tmp_path / "sd.pth", "wb") as fh:
        pickle.dump(model.state_dict(), fh)
    with pytest.raises(UnsafeCheckpointError, match="plain Python pickle"):
        load_source(tmp_path / "sd.pth", arch=ARCH)
    _same_outputs(model, load_source(tmp_path / "sd.pth", arch=ARCH, allow_pickle=True).model, x)


@pytest.mark.parametrize("form", ["pth", "safetensors", "module"])
def test_bnfuse_outputs_load_back_from_their_metadata(tmp_path: Path, model: nn.Module, x: torch.Tensor,
                                                     form: str) -> None:
    torch.save(model.state_dict(), tmp_path / "m.pth")
    suffix = ".safetensors" if form == "safetensors" else ".pth"
    out = tmp_path / f"fused{suffix}"
    convert(tmp_path / "m.pth", out, ConvertOptions(save_as="module" if form == "module" else None),
            SourceOptions(arch=ARCH))
    fused = load(out, allow_pickle=form == "module")  # no arch: it comes from the file
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in fused.modules())
    _same_outputs(model, fused, x, exact=False)
    if form != "module":
        meta = read_checkpoint(out).metadata
        assert meta["arch"] == ARCH and len(meta["folds"]) == 4


def test_output_mirrors_input_form(tmp_path: Path, model: nn.Module) -> None:
    torch.save(model, tmp_path / "whole.pth")
    r = convert(tmp_path / "whole.pth", tmp_path / "a.pth", source_options=SourceOptions(allow_pickle=True))
    assert r.form == "module" and read_checkpoint(tmp_path / "a.pth", allow_pickle=True).kind == "module"
    r = convert(tmp_path / "whole.pth", tmp_path / "b.pth", ConvertOptions(save_as="state-dict"),
                SourceOptions(allow_pickle=True, arch=ARCH))
    assert r.form == "state_dict" and read_checkpoint(tmp_path / "b.pth").kind == "state_dict"
    r = convert(tmp_path / "whole.pth", tmp_path / "c.safetensors",
                source_options=SourceOptions(allow_pickle=True, arch=ARCH))
    assert r.form == "state_dict"
    with pytest.raises(UsageError, match="--arch"):  # a state_dict of an unknown class could not be rebuilt
        convert(tmp_path / "whole.pth", tmp_path / "d.safetensors", source_options=SourceOptions(allow_pickle=True))
    with pytest.raises(UsageError, match=r"\.pth"):
        convert(tmp_path / "whole.pth", tmp_path / "e.safetensors", ConvertOptions(save_as="module"),
                SourceOptions(allow_pickle=True))
    assert not (tmp_path / "d.safetensors").exists() and not (tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize("name,content,match", [
    ("empty.pth", b"", "empty"),
    ("text.pth", b'{"weights": [1, 2, 3]}\n', "text file"),
    ("lfs.pth", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "git-lfs"),
    ("junk.pth", bytes(range(256)) * 8, "not a PyTorch checkpoint|corrupt"),
    ("model.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 100, "unknown checkpoint suffix '.h5'"),
    ("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "not a valid .safetensors"),
])
def test_unreadable_files(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(tmp_path / name)


def test_truncated_and_tensorless(tmp_path: Path, model: nn.Module) -> None:
    torch.save(model.state_dict(), tmp_path / "m.pth")
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.pth")
    torch.save({"epoch": 3, "lr": 0.1, "config": {"depth": 18}}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="no model weights.*'epoch'"):
        read_checkpoint(tmp_path / "none.pth")


# ----------------------------------------------------------------------------- writing


def _write(out: Path, sd: dict, **kw) -> int:  # noqa: ANN003
    return write_checkpoint(out, state_dict=sd, metadata={"arch": ARCH, "note": "test"}, **kw)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_interrupted_write_leaves_old_output_and_no_temp_file(tmp_path: Path, model: nn.Module,
                                                              suffix: str) -> None:
    out = tmp_path / f"out{suffix}"
    old = {k: v.clone() for k, v in model.state_dict().items()}
    _write(out, old)
    before = out.read_bytes()
    new = {k: v + 1 if v.is_floating_point() else v for k, v in old.items()}

    def interrupt(tmp: Path) -> None:
        # the data went to another file in the output's file system, anonymous where O_TMPFILE works
        assert tmp.exists() and tmp != out and tmp.stat().st_dev == tmp_path.stat().st_dev
        assert sorted(p.name for p in tmp_path.iterdir()) == ([out.name] if str(tmp).startswith("/proc/")
                                                              else sorted([out.name, tmp.name]))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write(out, new, force=True, _after_write=interrupt)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    # and an uninterrupted write does replace it
    _write(out, new, force=True)
    assert torch.equal(read_checkpoint(out).state_dict["features.0.weight"], new["features.0.weight"])


def test_interrupted_first_write_leaves_nothing(tmp_path: Path, model: nn.Module) -> None:
    def interrupt(tmp: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "new.pth", model.state_dict(), _after_write=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_temp_file_fails_read_back(tmp_path: Path, model: nn.Module) -> None:
    out = tmp_path / "out.safetensors"
    _write(out, model.state_dict())
    before = out.read_bytes()

    def flip_a_value(tmp: Path) -> None:  # what a bad disk or a buggy writer would do
        from safetensors.torch import load, save

        sd = load(tmp.read_bytes())
        sd["features.0.weight"][0, 0, 0, 0] += 1.0
        tmp.write_bytes(save(sd, metadata={"bnfuse": json.dumps({"arch": ARCH, "note": "test"})}))

    with pytest.raises(OutputError, match="read-back check.*features.0.weight"):
        _write(out, {k: v.clone() for k, v in model.state_dict().items()}, force=True, _after_write=flip_a_value)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_write_failure_is_an_output_error(tmp_path: Path, model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write, "_open_temporary", no_space)
    with pytest.raises(OutputError, match="No space left"):
        _write(tmp_path / "out.pth", model.state_dict())


def test_check_output_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.pth"
    src.write_bytes(b"x")
    with pytest.raises(OutputError, match="never overwrites its input"):
        check_output_path(src, inputs=[src], force=True)
    with pytest.raises(OutputError, match="--force"):
        check_output_path(src, inputs=[])
    check_output_path(src, inputs=[], force=True)
    with pytest.raises(OutputError, match="unknown output suffix"):
        check_output_path(tmp_path / "out.tflite")
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "nodir" / "out.pth")
    (tmp_path / "d.pth").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        check_output_path(tmp_path / "d.pth")

    def denied(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(write, "_open_temporary", denied)
    with pytest.raises(OutputError, match="not writable"):
        check_output_path(tmp_path / "out.pth")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only directory")
def test_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output_path(ro / "out.pth")
    finally:
        ro.chmod(0o755)


def test_module_output_is_read_back(tmp_path: Path, model: nn.Module, x: torch.Tensor) -> None:
    size = write_checkpoint(tmp_path / "m.pth", state_dict=model.state_dict(), metadata={}, module=model)
    assert size == (tmp_path / "m.pth").stat().st_size
    _same_outputs(model, read_checkpoint(tmp_path / "m.pth", allow_pickle=True).module, x)


#: what a damaged file is refused with, after its path, by (file, damage).  The flipped bytes all lie in
#: the first 4000 bytes: the pickle of a .pth (its data.pkl record in a zip), the JSON header of a
#: .safetensors.  A zip record is checked by its CRC-32 ("is damaged" when zipfile stops on it before
#: the CRC); a legacy .pth has no checksum, so its damaged pickle is refused by the unpickler: a
#: broken opcode, a broken string, or a class name no longer on the allow-list (refused, not run)
DAMAGED = {
    ("zip.pth", "flipped"): r"is corrupt: its record archive/data\.pkl (fails its CRC-32 check: its bytes are not the "
                            r"ones that were written|is damaged \(.+\)), so the file was damaged after it was saved "
                            r"\(storage or transfer\)\. Nothing was loaded from it; copy or download it again$",
    ("zip.pth", "cut"): r"cannot be read as a PyTorch checkpoint: it is truncated or corrupt \(",
    ("legacy.pth", "cut"): r"cannot be read as a PyTorch checkpoint: it is truncated or corrupt \(RuntimeError: "
                           r"unexpected EOF",
    ("legacy.pth", "flipped"): r"(cannot be read as a PyTorch checkpoint: it is truncated or corrupt \(|is not a "
                               r"PyTorch checkpoint \(or it is corrupt\): Unsupported operand \d+$|is a full pickle: "
                               r"it needs the Python object )",
    ("st.safetensors", "cut"): r"is not a valid \.safetensors file \(truncated or corrupt\): the file has \d+ bytes, "
                               r"its header describes 194264 \(the data of tensor '[\w.]+' is cut short\)",
    ("st.safetensors", "flipped"): r"is not a valid \.safetensors file \(truncated or corrupt\): the header (is not "
                                   r"valid JSON|length \d+ is impossible)",
}


def test_damaged_files_always_give_a_checkpoint_error(tmp_path: Path, model: nn.Module) -> None:
    """Cut or corrupted .pth (zip and legacy) and .safetensors: every one refused, with a CheckpointError
    that says the file is damaged (never a raw KeyError/UnicodeDecodeError, never a silent load)."""
    import io
    import random

    from safetensors.torch import save_file

    blobs = {}
    for name, kw in (("zip.pth", {}), ("legacy.pth", {"_use_new_zipfile_serialization": False})):
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf, **kw)
        blobs[name] = buf.getvalue()
    save_file(model.state_dict(), str(tmp_path / "good.safetensors"))
    blobs["st.safetensors"] = (tmp_path / "good.safetensors").read_bytes()
    rng = random.Random(0)
    for i in range(90):
        name, good = list(blobs.items())[i % 3]
        data = bytearray(good)
        if i % 2:
            data = data[: rng.randrange(1, len(data))]
        else:
            for _ in range(20):
                data[rng.randrange(min(len(data), 4000))] = rng.randrange(256)
        path = tmp_path / f"damaged_{name}"
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError) as info:  # every one: no damaged file here loads
            read_checkpoint(path)
        msg = str(info.value)
        assert msg.startswith(f"{path} "), msg
        assert re.match(DAMAGED[(name, "cut" if i % 2 else "flipped")], msg[len(str(path)) + 1:]), (i, msg)
    raw = tmp_path / "garbage.pth"
    for i in range(30):
        raw.write_bytes(b"\x80\x02" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        with pytest.raises(CheckpointError):
            read_checkpoint(raw)


# ----------------------------------------------------------------------------- the read-back check, streamed

_META = {"arch": ARCH, "note": "test"}


def _sd() -> dict[str, torch.Tensor]:
    """Tensors of distinct byte sizes (a flipped byte is attributable), two of the same shape (a swap is not
    visible in sizes), several dtypes (bfloat16 has no numpy twin), a view sharing storage and an empty one."""
    g = torch.Generator().manual_seed(5)
    big = torch.randn(64, 50, generator=g)
    return {
        "big.weight": big, "small.bias": torch.randn(7, generator=g), "idx": torch.arange(5),
        "half": torch.randn(9, generator=g).half(), "bf": torch.randn(3, 2, generator=g).bfloat16(),
        "flag": torch.tensor([True, False, True]), "empty": torch.zeros(0),
        "conv1.weight": torch.randn(4, 3, generator=g), "conv2.weight": torch.randn(4, 3, generator=g),
    }


def _data_span(path: Path, key: str, sd: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(file offset, length) of ``key``'s bytes in a written file, found independently of bnfuse's code."""
    import struct
    import zipfile

    with open(path, "rb") as fh:
        is_zip = fh.read(2) == b"PK"  # the file being written has no suffix (/proc/self/fd/N)
    if not is_zip:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            begin, end = json.loads(fh.read(n))[key]["data_offsets"]
        return 8 + n + begin, end - begin
    size = sd[key].untyped_storage().nbytes()  # torch.save writes the whole storage (sizes are distinct here)
    with zipfile.ZipFile(path) as zf:
        (info,) = [i for i in zf.infolist() if "/data/" in i.filename and i.file_size == size]
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
    return info.header_offset + 30 + name_len + extra_len, size


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", "module"])
@pytest.mark.parametrize("damage", ["first byte", "last byte", "truncated", "pickle/header"])
def test_damaged_written_file_is_refused(tmp_path: Path, suffix: str, damage: str) -> None:
    """A byte flipped inside one tensor's data, a cut file, a damaged header: refused, naming the tensor
    when it is one, no file left behind and the previous output intact."""
    module = None
    if suffix == "module":
        module = nn.Linear(50, 64)
        sd, suffix = module.state_dict(), ".pth"
        key = "weight"
    else:
        sd, key = _sd(), "big.weight"
    out = tmp_path / f"out{suffix}"
    out.write_bytes(b"previous output")

    def damage_it(tmp: Path) -> None:
        start, length = _data_span(tmp, key, sd)
        if damage == "first byte":
            flip_bit(tmp, start, 0x10)
        elif damage == "last byte":
            flip_bit(tmp, start + length - 1, 0x10)
        elif damage == "truncated":
            os.truncate(tmp, tmp.stat().st_size - 3)
        else:  # the safetensors JSON header / torch's data.pkl, both near the start
            flip_bit(tmp, 8 + 20 if suffix == ".safetensors" else 100, 0x10)

    match = {"truncated": "cannot be read back", "pickle/header": "read-back check"}.get(damage, rf"\['{key}'\]")
    with pytest.raises(OutputError, match=match) as info:
        write_checkpoint(out, state_dict=sd, metadata=_META, module=module, force=True, _after_write=damage_it)
    assert str(out) in str(info.value) and "previous file, if any, is untouched" in str(info.value)
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    # and undamaged, the same write goes through and reads back equal
    write_checkpoint(out, state_dict=sd, metadata=_META, module=module, force=True)
    got = read_checkpoint(out, allow_pickle=module is not None)
    got_sd = got.module.state_dict() if module is not None else got.state_dict
    assert all(torch.equal(got_sd[k], v) for k, v in sd.items())


def _mutated(sd: dict[str, torch.Tensor], how: str) -> tuple[dict[str, torch.Tensor], dict, str]:
    """What a buggy writer might have stored instead, with what the error must say."""
    sd, meta = dict(sd), dict(_META)
    if how == "missing key":
        del sd["small.bias"]
        return sd, meta, r"missing \['small.bias'\]"
    if how == "extra key":
        sd["other"] = torch.zeros(2)
        return sd, meta, r"unexpected \['other'\]"
    if how == "dtype":
        sd["big.weight"] = sd["big.weight"].double()
    elif how == "shape":
        sd["big.weight"] = sd["big.weight"].reshape(50, 64)
    elif how == "bfloat16 value":
        sd["bf"] = sd["bf"].clone()
        sd["bf"][1, 1] += 1
        return sd, meta, r"\['bf'\]"
    elif how == "swapped":  # same shapes, same bytes in the file overall: only a per-key check sees it
        sd["conv1.weight"], sd["conv2.weight"] = sd["conv2.weight"], sd["conv1.weight"]
        return sd, meta, r"\['conv1.weight', 'conv2.weight'\]"
    elif how == "metadata":
        meta["note"] = "other"
        return sd, meta, "different metadata"
    return sd, meta, r"\['big.weight'\]"


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("how", ["missing key", "extra key", "dtype", "shape", "bfloat16 value", "swapped",
                                 "metadata"])
def test_written_file_differing_from_the_state_dict_is_refused(tmp_path: Path, suffix: str, how: str) -> None:
    sd = _sd()
    stored, meta, match = _mutated(sd, how)

    def rewrite(tmp: Path) -> None:
        if suffix == ".safetensors":
            from safetensors.torch import save

            tmp.write_bytes(save({k: v.clone() for k, v in stored.items()}, metadata={"bnfuse": json.dumps(meta)}))
        else:
            torch.save({"bnfuse": meta, "state_dict": stored}, tmp)

    out = tmp_path / f"out{suffix}"
    with pytest.raises(OutputError, match=f"read-back check.*{match}"):
        write_checkpoint(out, state_dict=sd, metadata=_META, _after_write=rewrite)
    assert list(tmp_path.iterdir()) == []


def test_written_file_with_shared_and_strided_storages(tmp_path: Path) -> None:
    """Views, tensors sharing a storage larger than themselves, a non-contiguous tensor, a 0-d tensor: what
    each format really stores (safetensors: unshared contiguous copies; torch.save: whole storages) passes."""
    base = torch.randn(10, 6, generator=torch.Generator().manual_seed(2))
    sd = {"whole": base, "row": base[3], "cols": base[:, 1:4], "t": base.t(), "scalar": torch.tensor(2.5),
          "tail": base.view(-1)[50:]}
    for suffix in (".safetensors", ".pth"):
        write_checkpoint(tmp_path / f"o{suffix}", state_dict=sd, metadata=_META)
        got = read_checkpoint(tmp_path / f"o{suffix}").state_dict
        assert all(torch.equal(got[k], v) for k, v in sd.items())


class _WithExtraTensor(nn.Module):
    """A module pickle holds storages its state_dict does not (a plain tensor attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.cache = torch.arange(7.0)


def test_module_form_allows_extra_storages_but_checks_its_state_dict(tmp_path: Path) -> None:
    m = _WithExtraTensor()
    write_checkpoint(tmp_path / "m.pth", state_dict=m.state_dict(), metadata={}, module=m)
    assert torch.equal(read_checkpoint(tmp_path / "m.pth", allow_pickle=True).module.cache, m.cache)

    def other_bias(tmp: Path) -> None:
        changed = _WithExtraTensor()
        changed.lin.weight.data.copy_(m.lin.weight)
        torch.save(changed, tmp)

    with pytest.raises(OutputError, match=r"read-back check.*\['lin.bias'\]"):
        write_checkpoint(tmp_path / "n.pth", state_dict=m.state_dict(), metadata={}, module=m,
                         _after_write=other_bias)


_MEMORY_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from bnfuse_cli.files import write as ck

def hwm():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))

try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    print(json.dumps({"skip": "cannot reset the peak RSS (/proc/self/clear_refs)"}))
    sys.exit()
g = torch.Generator().manual_seed(0)
MiB = 2 ** 20
sd = {"a": torch.randn(25 * MiB, generator=g), "b": torch.randn(15 * MiB // 8, 8, generator=g),
      "c": torch.randint(0, 100, (10 * MiB,), dtype=torch.int32, generator=g), "d": torch.randn(3)}
size = sum(t.numel() * t.element_size() for t in sd.values())
out = {"size": size}
for suffix in (".safetensors", ".pth"):
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = hwm()
    ck.write_checkpoint(Path(sys.argv[2]) / ("out" + suffix), state_dict=sd, metadata={"arch": "x"})
    out[suffix] = hwm() - before
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /proc/self/status")
def test_write_checkpoint_adds_no_copy_of_the_model_to_peak_memory(tmp_path: Path) -> None:
    """The read-back check streams the file: the peak RSS (VmHWM, which counts touched mmap pages as well)
    grows by far less than the state_dict's size (a full read-back adds 1x-2x of it)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(ROOT), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    assert res["size"] == 200 * 2**20 + 12
    for suffix in (".safetensors", ".pth"):
        assert res[suffix] < 0.3 * res["size"], f"{suffix}: peak RSS grew by {res[suffix] / 2**20:.0f} MiB"


def test_pth_check_without_placing_storages_still_checks_contents(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a torch's mmap loader not let the check see where each storage lies, the .pth check falls
    back to comparing the (size, CRC-32) multisets of the storages: writes still go through, and a
    damaged tensor is still refused."""
    monkeypatch.setattr(readback, "_place", lambda storages, data: {})
    sd, key = _sd(), "big.weight"
    out = tmp_path / "out.pth"
    write_checkpoint(out, state_dict=sd, metadata=_META)
    assert all(torch.equal(read_checkpoint(out).state_dict[k], v) for k, v in sd.items())

    def damage_it(tmp: Path) -> None:
        start, _ = _data_span(tmp, key, sd)
        flip_bit(tmp, start, 0x10)

    with pytest.raises(OutputError, match=rf"\['{key}'\]"):
        write_checkpoint(out, state_dict=sd, metadata=_META, force=True, _after_write=damage_it)

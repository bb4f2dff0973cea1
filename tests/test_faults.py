"""Files and faults: damaged inputs are refused naming the record, a full disk or a size limit is a clear
exit 2, kill -9 leaves nothing, concurrent writers never overwrite each other, outputs follow the umask,
and the Ctrl-C message says exactly what was written. Also torch.compile pickles and weights under
unusual keys."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import ROOT, flip_bit, randomize_bn

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnfuse_cli.files import temporaries as tmpmod  # noqa: E402
from bnfuse_cli.files import write as ckmod  # noqa: E402
from bnfuse_cli.files.table import read_checkpoint, read_object  # noqa: E402
from bnfuse_cli.files.write import (  # noqa: E402
    check_output_path,
    write_checkpoint,
)
from bnfuse_cli.cli import app  # noqa: E402
from bnfuse_cli.errors import CheckpointError, OutputError, UsageError  # noqa: E402
from bnfuse_cli.files.load import load_source  # noqa: E402
from examples.digits import DigitsCNN  # noqa: E402

ARCH = "examples.digits:DigitsCNN"
META = {"arch": ARCH}
runner = CliRunner()


@pytest.fixture(autouse=True)
def _cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


@pytest.fixture
def model() -> nn.Module:
    return randomize_bn(DigitsCNN(), seed=3).eval()


def _record_span(path: Path, member: str) -> tuple[int, int]:
    """(file offset, size) of a zip member's bytes, found with zipfile and the local header."""
    import struct

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _corrupt_pth(model: nn.Module, path: Path) -> str:
    """Save ``model``'s state_dict and flip one byte inside its largest tensor record; return the record."""
    torch.save(model.state_dict(), path)
    with zipfile.ZipFile(path) as zf:
        record = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename
    start, size = _record_span(path, record)
    flip_bit(path, start + size // 2)
    return record


# ----------------------------------------------------------------------------- damaged inputs


def test_flipped_byte_in_a_tensor_record_is_refused_naming_it(tmp_path: Path, model: nn.Module) -> None:
    path = tmp_path / "m.pth"
    record = _corrupt_pth(model, path)
    torch.load(path, weights_only=True)  # the control: torch itself loads the damaged file silently
    for read in (lambda: read_checkpoint(path), lambda: read_object(path),
                 lambda: load_source(path, arch=ARCH)):
        with pytest.raises(CheckpointError) as info:
            read()
        msg = str(info.value)
        assert str(path) in msg and record in msg and "CRC-32" in msg, msg


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # a TorchScript archive is made on purpose
def test_flipped_byte_in_the_pickle_record_and_in_a_torchscript_archive(tmp_path: Path, model: nn.Module) -> None:
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    start, _ = _record_span(path, "m/data.pkl" if "m/data.pkl" in zipfile.ZipFile(path).namelist()
                            else next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data.pkl")))
    flip_bit(path, start + 5)
    with pytest.raises(CheckpointError, match=r"data\.pkl fails its CRC-32"):
        read_checkpoint(path)
    ts = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 1, 8, 8)), str(ts))
    with zipfile.ZipFile(ts) as zf:
        record = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename
    start, size = _record_span(ts, record)
    flip_bit(ts, start + size - 1)
    with pytest.raises(CheckpointError, match=record):
        read_checkpoint(ts)


def test_cli_refuses_a_corrupt_pth_with_exit_2_and_no_traceback(tmp_path: Path, model: nn.Module) -> None:
    path = tmp_path / "corrupt.pth"
    record = _corrupt_pth(model, path)
    out = tmp_path / "out.pth"
    res = subprocess.run([sys.executable, "-m", "bnfuse_cli", "convert", str(path), "--arch", ARCH, "-o", str(out)],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, COLUMNS="200"), timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and record in res.stderr and str(path) in res.stderr
    assert not out.exists()


def _safetensors_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def _with_header(data: bytes, edit) -> bytes:  # noqa: ANN001
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def _shift(header: dict, name: str, by: int) -> None:
    header[name]["data_offsets"] = [o + by for o in header[name]["data_offsets"]]


@pytest.mark.parametrize("damage,match", [
    ("cut in the data", "cut short"),
    ("cut in the header", "header length"),
    ("bytes appended", "its header describes"),
    ("header length too large", "impossible"),
    ("shape disagrees with the span", "needs"),
    ("overlap", "hole or an overlap"),
    ("not JSON", "not valid JSON"),
])
def test_inconsistent_safetensors_is_refused(tmp_path: Path, model: nn.Module, damage: str, match: str) -> None:
    good = _safetensors_bytes(model)
    first = "features.0.weight"
    data = {
        "cut in the data": lambda: good[:-5],
        "cut in the header": lambda: good[:20],
        "bytes appended": lambda: good + b"\0" * 16,
        "header length too large": lambda: (len(good)).to_bytes(8, "little") + good[8:],
        "shape disagrees with the span": lambda: _with_header(good, lambda h: h[first].update(shape=[2, 2])),
        "overlap": lambda: _with_header(good, lambda h: _shift(h, first, -4 if h[first]["data_offsets"][0] else 4)),
        "not JSON": lambda: good[:8] + b"\xff" + good[9:],
    }[damage]()
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    for read in (lambda: read_checkpoint(path), lambda: read_object(path)):
        with pytest.raises(CheckpointError, match=match) as info:
            read()
        assert str(path) in str(info.value)
    path.write_bytes(good)  # the control: intact, it reads
    assert set(read_checkpoint(path).state_dict) == set(model.state_dict())


# ----------------------------------------------------------------------------- full disk, size limit


@pytest.fixture
def small_fs(tmp_path: Path):  # noqa: ANN201
    """A 256 KiB tmpfs (as root; skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _big_sd(mib: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(int(mib * 2**20 / 4), generator=g), "b": torch.randn(3, generator=g)}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_full_disk_is_an_output_error_leaving_the_old_file(small_fs: Path, suffix: str) -> None:
    out = small_fs / f"out{suffix}"
    write_checkpoint(out, state_dict=_big_sd(0.05), metadata=META)
    before = out.read_bytes()
    with pytest.raises(OutputError) as info:
        write_checkpoint(out, state_dict=_big_sd(1), metadata=META, force=True)
    msg = str(info.value)
    assert str(out) in msg and "No space left on device" in msg and "ENOSPC" in msg, msg
    assert "previous out" in msg and "untouched" in msg
    assert sorted(p.name for p in small_fs.iterdir()) == [out.name] and out.read_bytes() == before
    assert os.statvfs(small_fs).f_bfree > 0.7 * os.statvfs(small_fs).f_blocks  # the partial file's space is freed


def _ulimited(limit: int):  # noqa: ANN202
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return preexec


def test_file_size_limit_gives_exit_2_naming_the_file(tmp_path: Path, model: nn.Module) -> None:
    src = tmp_path / "m.pth"
    torch.save(model.state_dict(), src)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old output")
    res = subprocess.run([sys.executable, "-m", "bnfuse_cli", "convert", str(src), "--arch", ARCH, "-o", str(out),
                          "--force"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         # no bytecode caches: under the limit Python would write them cut short (a partial write)
                         env=dict(os.environ, COLUMNS="200", PYTHONDONTWRITEBYTECODE="1"),
                         preexec_fn=_ulimited(64 * 1024))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and str(out) in res.stderr and "File too large" in res.stderr, res.stderr
    assert "ulimit -f" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "out.safetensors"]
    assert out.read_bytes() == b"old output"


@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS, errno.EDQUOT, errno.ENOSPC, errno.EFBIG])
def test_every_os_write_failure_is_an_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Through torch.save (which turns the failure into 'inline_container.cc ... unexpected pos')."""
    real = ckmod._FdWriter.write
    calls = []

    def failing(self, data):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) > 3:
            self.error = OSError(code, os.strerror(code))
            raise self.error
        return real(self, data)

    monkeypatch.setattr(ckmod._FdWriter, "write", failing)
    out = tmp_path / "out.pth"
    with pytest.raises(OutputError) as info:
        write_checkpoint(out, state_dict=_big_sd(0.1), metadata=META)
    msg = str(info.value)
    assert str(out) in msg and os.strerror(code) in msg and errno.errorcode[code] in msg, msg
    assert "inline_container" not in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_torch_failure_without_an_oserror_is_explained_by_the_disk(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def torch_save(obj, f):  # noqa: ANN001, ANN202
        f.write(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 46 vs 0")

    class Full:
        f_bavail = 0

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(ckmod.os, "fstatvfs", lambda fd: Full())
    with pytest.raises(OutputError, match="No space left on device"):
        write_checkpoint(tmp_path / "out.pth", state_dict=_big_sd(0.01), metadata=META)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- kill -9


_KILL_CHILD = r"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
if sys.argv[4] == "named":
    del os.O_TMPFILE  # a platform without it: the named fallback
import torch
from bnfuse_cli.files.write import write_checkpoint
g = torch.Generator().manual_seed(0)
sd = {f"w{i}": torch.randn(2 ** 20, generator=g) for i in range(48)}  # 192 MiB
out = Path(sys.argv[2])
hook = None
if sys.argv[3] == "after-write":
    def hook(tmp):
        print("written", flush=True)
        time.sleep(60)
print("start", flush=True)
write_checkpoint(out, state_dict=sd, metadata={"arch": "x"}, force=True, _after_write=hook)
"""


def _temp_fds(pid: int, directory: Path) -> bool:
    """Whether process ``pid`` has a file of ``directory`` open other than the old output."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(ln.startswith(str(directory) + "/") and not ln.endswith("/out.pth") for ln in links)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches /proc/PID/fd")
@pytest.mark.parametrize("when", ["during the write", "after-write"])
def test_kill_9_during_the_write_leaves_nothing(tmp_path: Path, when: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.pth"
    out.write_bytes(b"old output")
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(ROOT), str(out), when, "anonymous"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "start", proc.stderr.read()
        deadline = time.monotonic() + 60
        if when == "after-write":
            assert proc.stdout.readline().strip() == "written"
        else:
            while not _temp_fds(proc.pid, out_dir):  # the temporary file is open: the write has started
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.001)
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.pth"]
    assert out.read_bytes() == b"old output"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_TMPFILE fallback is tested by removing it")
def test_named_temporary_of_a_killed_writer_is_removed_by_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "out.pth"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(ROOT), str(out), "after-write", "named"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "start", proc.stderr.read()
        assert proc.stdout.readline().strip() == "written", proc.stderr.read()
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    (stale,) = [p.name for p in tmp_path.iterdir()]  # without O_TMPFILE a named file outlives kill -9
    assert stale.startswith(".out.pth.bnfuse-tmp.") and stale.split(".")[-2] == str(proc.pid)
    alive = tmp_path / f".out.pth.bnfuse-tmp.{tmpmod._host()}.{os.getpid()}.0123abcd"  # a running writer's
    alive.write_bytes(b"in progress")
    other = tmp_path / ".out.pth.tmp-unrelated"
    other.write_bytes(b"not ours")
    write_checkpoint(out, state_dict=_big_sd(0.01), metadata=META)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "out.pth"])


# ----------------------------------------------------------------------------- concurrent writers


def test_concurrent_writers_without_force_exactly_one_wins(tmp_path: Path) -> None:
    out = tmp_path / "new.safetensors"
    both_written = threading.Barrier(2, timeout=30)
    results: dict[int, object] = {}

    def writer(i: int) -> None:
        check_output_path(out, force=False)  # both see no file: the race the check alone cannot stop
        try:
            write_checkpoint(out, state_dict={"w": torch.full((1000,), float(i))}, metadata={"writer": i},
                             _after_write=lambda tmp: both_written.wait())
            results[i] = "written"
        except OutputError as exc:
            results[i] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [i for i, r in results.items() if r == "written"]
    losers = [r for r in results.values() if isinstance(r, OutputError)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert str(out) in str(losers[0]) and "another process" in str(losers[0])
    ck = read_checkpoint(out)
    assert ck.metadata == {"writer": winners[0]} and torch.equal(ck.state_dict["w"], torch.full((1000,), float(winners[0])))
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_force_is_explicit_and_off_by_default(tmp_path: Path) -> None:
    out = tmp_path / "o.pth"
    check_output_path(out, force=True)  # the check remembers nothing: the write decides by its own force
    out.write_bytes(b"appeared meanwhile")
    with pytest.raises(OutputError, match=r"o\.pth already exists: pass --force to replace it$"):
        write_checkpoint(out, state_dict=_big_sd(0.01), metadata=META)
    assert out.read_bytes() == b"appeared meanwhile"
    write_checkpoint(out, state_dict=_big_sd(0.01), metadata=META, force=True)
    assert set(read_checkpoint(out).state_dict) == {"w", "b"}
    with pytest.raises(OutputError, match="already exists"):
        write_checkpoint(out, state_dict=_big_sd(0.01), metadata=META, force=False)


# ----------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        for suffix in (".pth", ".safetensors"):
            out = tmp_path / f"o{suffix}"
            write_checkpoint(out, state_dict=_big_sd(0.01), metadata=META, force=True)
            assert out.stat().st_mode & 0o777 == 0o666 & ~umask, (suffix, oct(out.stat().st_mode))
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- Ctrl-C message


@pytest.fixture
def sd_file(tmp_path: Path, model: nn.Module) -> Path:
    torch.save(model.state_dict(), tmp_path / "m.pth")
    return tmp_path / "m.pth"


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``os.<name>`` does its work, then Ctrl-C arrives before the next Python line runs."""
    real = getattr(os, name)

    def then_interrupt(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckmod.os, name, then_interrupt)


@pytest.mark.parametrize("stage", ["read-back", "just after the link", "just after the rename", "directory fsync"])
def test_interrupt_message_says_what_was_written(sd_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 stage: str) -> None:
    out = tmp_path / "out.pth"
    force = stage == "just after the rename"
    if force:
        out.write_bytes(b"old output")
    if stage == "read-back":
        def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise KeyboardInterrupt
        monkeypatch.setattr(ckmod, "verify_written", interrupted)
    elif stage == "just after the link":
        _interrupt_after(monkeypatch, "link")
    elif stage == "just after the rename":
        _interrupt_after(monkeypatch, "replace")
    else:
        real = os.fsync
        seen = []

        def fsync(fd: int) -> None:
            real(fd)
            seen.append(fd)
            if len(seen) == 2:  # the file's, then the directory's
                raise KeyboardInterrupt
        monkeypatch.setattr(ckmod.os, "fsync", fsync)
    res = runner.invoke(app, ["convert", str(sd_file), "--arch", ARCH, "-o", str(out)] + (["--force"] * force))
    assert res.exit_code == 130, res.output
    message = res.stderr.replace("\n", " ")
    if stage == "read-back":
        assert "nothing was written" in message and not out.exists()
    else:
        assert "nothing was written" not in message and f"after writing {out}" in message, message
        assert read_checkpoint(out).metadata["arch"] == ARCH  # it really is the new, complete file
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.pth"] + (["out.pth"] if out.exists() else []))


def test_placed_is_exact_across_an_interrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    placed: list[Path] = []
    write_checkpoint(tmp_path / "a.pth", state_dict=_big_sd(0.01), metadata=META, placed=placed)
    _interrupt_after(monkeypatch, "link")
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "b.pth", state_dict=_big_sd(0.01), metadata=META, force=False, placed=placed)
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "c.pth", state_dict=_big_sd(0.01), metadata=META, placed=placed,
                         _after_write=lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt))
    assert placed == [tmp_path / "a.pth", tmp_path / "b.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.pth"]


# ----------------------------------------------------------------------------- torch.compile pickles


def test_pickled_torch_compile_module_is_unwrapped(tmp_path: Path, model: nn.Module) -> None:
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        want = model(x)  # before wrapping: calling a wrapper would compile
    model.classifier = torch.compile(model.classifier)  # a nested wrapper too
    path = tmp_path / "compiled.pth"
    torch.save(torch.compile(model), path)
    ck = read_checkpoint(path, allow_pickle=True)
    assert not any(type(m).__name__ == "OptimizedModule" for m in ck.module.modules())
    assert any("torch.compile" in n and "2 " in n for n in ck.notes), ck.notes
    src = load_source(path, allow_pickle=True)
    assert isinstance(src.model, DigitsCNN) and not isinstance(src.model.classifier, type(torch.compile(nn.Identity())))
    with torch.no_grad():
        assert torch.equal(src.model(x), want)
    torch.save({"model": torch.compile(DigitsCNN())}, tmp_path / "nested.pth")
    ck = read_checkpoint(tmp_path / "nested.pth", allow_pickle=True)
    assert isinstance(ck.module, DigitsCNN) and any("torch.compile" in n for n in ck.notes)


# ----------------------------------------------------------------------------- weights under any key


def _training_ckpt(model: nn.Module, **weights: object) -> dict:
    opt = torch.optim.Adam(model.parameters())
    model.train()(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()  # Adam's state: many small dicts of tensors under string keys, none of them the weights
    model.eval()
    return {"optimizer": opt.state_dict(), "epoch": 7, **weights}


def test_weights_under_an_unusual_key_are_found(tmp_path: Path, model: nn.Module) -> None:
    x = torch.randn(3, 1, 8, 8)
    torch.save(_training_ckpt(model, model_state=model.state_dict()), tmp_path / "m.pth")
    src = load_source(tmp_path / "m.pth", arch=ARCH)
    assert any("'model_state'" in n for n in src.notes), src.notes
    with torch.no_grad():
        assert torch.equal(src.model(x), model(x))
    # deeper, with a DDP prefix
    torch.save({"run": {"nets": [{"module." + k: v for k, v in model.state_dict().items()}]}, "epoch": 3},
               tmp_path / "deep.pth")
    src = load_source(tmp_path / "deep.pth", arch=ARCH)
    assert any("'run.nets.0'" in n for n in src.notes)
    with torch.no_grad():
        assert torch.equal(src.model(x), model(x))


def test_several_matching_weights_are_refused_listing_them_and_key_chooses(tmp_path: Path, model: nn.Module) -> None:
    other = randomize_bn(DigitsCNN(), seed=8).eval()
    x = torch.randn(3, 1, 8, 8)
    ckpt = _training_ckpt(model, student=model.state_dict(), ema={"model": other.state_dict(), "decay": 0.999})
    torch.save(ckpt, tmp_path / "m.pth")
    with pytest.raises(CheckpointError) as info:
        load_source(tmp_path / "m.pth", arch=ARCH)
    msg = str(info.value)
    assert msg == (f"{tmp_path / 'm.pth'} holds 2 sets of weights that match {ARCH}, under 'student', 'ema.model': "
                   "pass --key with the one to use (for example --key student)")
    for key, want in (("student", model), ("ema.model", other)):
        src = load_source(tmp_path / "m.pth", arch=ARCH, key=key)
        assert any(key in n for n in src.notes)
        with torch.no_grad():
            assert torch.equal(src.model(x), want(x))
    with pytest.raises(CheckpointError, match=r"--key 'teacher'.*'student'"):
        load_source(tmp_path / "m.pth", arch=ARCH, key="teacher")
    with pytest.raises(CheckpointError, match="not tensors"):
        load_source(tmp_path / "m.pth", arch=ARCH, key="epoch")


def test_well_known_key_still_wins_and_key_overrides_it(tmp_path: Path, model: nn.Module) -> None:
    other = randomize_bn(DigitsCNN(), seed=8).eval()
    torch.save({"state_dict": model.state_dict(), "best": other.state_dict()}, tmp_path / "m.pth")
    src = load_source(tmp_path / "m.pth", arch=ARCH)
    assert any("'best' also match" in n and "--key best" in n for n in src.notes), src.notes
    assert torch.equal(src.model.state_dict()["features.1.running_var"], model.state_dict()["features.1.running_var"])
    src = load_source(tmp_path / "m.pth", arch=ARCH, key="best")
    assert torch.equal(src.model.state_dict()["features.1.running_var"], other.state_dict()["features.1.running_var"])
    # a well-known key whose weights do not match loses to the one that does
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "weights": model.state_dict()}, tmp_path / "n.pth")
    assert any("'weights'" in n for n in load_source(tmp_path / "n.pth", arch=ARCH).notes)


def test_key_where_it_does_not_apply(tmp_path: Path, model: nn.Module) -> None:
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="leave --key out"):
        load_source(tmp_path / "m.safetensors", arch=ARCH, key="model")
    with pytest.raises(UsageError, match="leave --key out"):
        load_source("resnet18", weights="none", key="model")


def test_cli_key_picks_the_weights_in_every_command(tmp_path: Path) -> None:
    """--key reaches convert, inspect, verify and bench (the ambiguous file through the real entry point, the
    rest through the same app in this process)."""
    from bench_tiny import TinyCNN
    from conftest import run_bnfuse, run_in_process

    a, b = randomize_bn(TinyCNN(), seed=1).eval(), randomize_bn(TinyCNN(), seed=2).eval()
    ck = tmp_path / "two.pth"
    torch.save({"student": a.state_dict(), "teacher": b.state_dict(), "epoch": 3}, ck)
    common = ["--arch", "bench_tiny:tiny_cnn", "--input-shape", "1,3,16,16"]
    ambiguous = run_bnfuse("inspect", str(ck), *common, cwd=ROOT / "tests")
    assert ambiguous.returncode == 2 and "--key" in ambiguous.stderr and "Traceback" not in ambiguous.stderr
    out = tmp_path / "fused.safetensors"
    conv = run_in_process("convert", str(ck), *common, "--key", "teacher", "-o", str(out), cwd=ROOT / "tests")
    assert conv.returncode == 0, conv.stderr
    ok = run_in_process("verify", str(ck), str(out), *common, "--key", "teacher", cwd=ROOT / "tests")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = run_in_process("verify", str(ck), str(out), *common, "--key", "student", cwd=ROOT / "tests")
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    bench = run_in_process("bench", str(ck), *common, "--key", "student", "--device", "cpu", "--iters", "2",
                       "--warmup", "0", cwd=ROOT / "tests")
    assert bench.returncode == 0, bench.stdout + bench.stderr


@pytest.mark.parametrize("stage", ["writing", "placed"])
def test_json_report_is_atomic_and_the_interrupt_message_true(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              stage: str) -> None:
    """--json goes through the files layer like a checkpoint: whole or not at all, and recorded."""
    from typer.testing import CliRunner

    import bnfuse_cli.files.place as fp
    import bnfuse_cli.files.write as fw
    from bnfuse_cli.cli import app

    report = tmp_path / "plan.json"
    real_write, real_sync = fw._FdWriter.write, fp._sync_directory

    def interrupted_write(self, data):  # noqa: ANN001, ANN202
        real_write(self, bytes(data)[:10])
        raise KeyboardInterrupt

    def interrupted_sync(dirfd, output):  # noqa: ANN001, ANN202
        real_sync(dirfd, output)
        raise KeyboardInterrupt

    if stage == "writing":
        monkeypatch.setattr(fw._FdWriter, "write", interrupted_write)
    else:
        monkeypatch.setattr(fp, "_sync_directory", interrupted_sync)
    res = CliRunner().invoke(app, ["inspect", "resnet18", "--weights", "none", "--input-shape", "1,3,32,32",
                                   "--json", str(report)])
    assert res.exit_code == 130, res.output
    if stage == "writing":
        assert "nothing was written" in res.stderr and not report.exists()
    else:
        assert f"after writing {report}" in res.stderr and json.loads(report.read_text())["bn_found"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == (["plan.json"] if stage == "placed" else [])


def test_a_zip_directory_that_claims_another_disk_is_exit_2(tmp_path: Path) -> None:
    """``zipfile.is_zipfile`` itself raises on a directory that names another disk ("zipfiles that span
    multiple disks"): a damaged checkpoint all the same, exit 2 naming it, no traceback."""
    from conftest import run_in_process

    path = tmp_path / "ck.pth"
    torch.save(randomize_bn(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))).state_dict(), path)
    data = bytearray(path.read_bytes())
    data[data.rindex(b"PK\x06\x07") + 4] = 1  # torch writes zip64: its locator's "disk of the zip64 directory"
    path.write_bytes(bytes(data))
    r = run_in_process("inspect", str(path), "--arch", "resnet18")
    assert r.returncode == 2 and f"{path} cannot be read as a PyTorch checkpoint" in r.stderr, r.stderr


def test_a_safetensors_header_nested_too_deep_is_exit_2(tmp_path: Path) -> None:
    from conftest import run_in_process

    path = tmp_path / "deep.safetensors"
    header = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    r = run_in_process("inspect", str(path), "--arch", "resnet18")
    assert r.returncode == 2 and "the header is not valid JSON (RecursionError" in r.stderr, r.stderr

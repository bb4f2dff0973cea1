"""Read checkpoints in the shapes people save them, and write them without ever losing a file.

Reading never executes a pickle unless the caller allows it: ``torch.load`` runs with
``weights_only=True``, and a file that needs full unpickling is refused with
:class:`UnsafeCheckpointError` before anything in it runs.

Writing goes to a temporary file in the output's directory, is read back and checked (streamed a
chunk at a time: the check costs one read buffer, not a second copy of the model), and only then
renamed over the destination, so an interrupted or failed write leaves no partial file and any
previous output intact.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import CheckpointError, OutputError, UnsafeCheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "Checkpoint",
    "read_checkpoint",
    "read_object",
    "write_checkpoint",
    "check_output_path",
    "NESTED_KEYS",
    "SUFFIXES",
]

#: where training checkpoints keep the weights, in the order they are tried
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema", "model_ema", "ema")
#: prefixes added by DataParallel/DDP and torch.compile
PREFIXES = ("module.", "_orig_mod.")
#: suffixes read as checkpoints (".tar" for the common "model_best.pth.tar")
SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".safetensors")
#: what other suffixes usually are, to say so when refusing them
_FOREIGN = {
    ".h5": "a Keras/HDF5 file", ".keras": "a Keras model", ".onnx": "an ONNX model",
    ".pb": "a TensorFlow graph", ".tflite": "a TensorFlow Lite model", ".npz": "a NumPy archive",
    ".npy": "a NumPy array", ".json": "a JSON file", ".txt": "a text file", ".yaml": "a YAML file",
    ".yml": "a YAML file", ".pkl": "a raw pickle", ".pickle": "a raw pickle", ".pt2": "a torch.export archive",
    ".gguf": "a GGUF file", ".zip": "a zip archive",
}
META_KEY = "bnfuse"


@dataclass
class Checkpoint:
    """What a file held: a whole module, or a state_dict (with bnfuse metadata if it has any)."""

    path: Path
    kind: str  # "module" | "state_dict" | "torchscript"
    module: "nn.Module | None" = None
    state_dict: "dict[str, torch.Tensor] | None" = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: how the weights were found: nested key, stripped prefix
    notes: list[str] = field(default_factory=list)


def _check_file(path: Path, *, what: str = "checkpoint", suffixes: "tuple[str, ...]" = SUFFIXES) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a {what} file")
    if path.suffix.lower() not in suffixes:
        kind = _FOREIGN.get(path.suffix.lower())
        raise CheckpointError(
            f"{path}: unknown {what} suffix {path.suffix or '(none)'!r}"
            + (f" (usually {kind}, which bnfuse does not read)" if kind else "")
            + f". bnfuse reads PyTorch files ({', '.join(s for s in suffixes if s != '.safetensors')}) and "
            ".safetensors; if this really is one of those, rename it with the right suffix"
        )
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the file was not written completely")
    if _looks_like_text(head):
        raise CheckpointError(
            f"{path} is a text file (it starts with {head[:24].decode('utf-8', 'replace')!r}), not a {what}: "
            "PyTorch and safetensors files are binary. Check that the path points at the weights file "
            "(a git-lfs pointer or a download error page also look like this)"
        )


def _looks_like_text(head: bytes) -> bool:
    """JSON, YAML, HTML, a git-lfs pointer...: printable UTF-8 with no control bytes."""
    # zip (PK\x03\x04), pickle (\x80) and .safetensors (an 8-byte length with zero bytes) never pass
    for cut in range(4):  # the 64-byte window may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return bool(text) and all(c.isprintable() or c in "\t\r\n" for c in text)
    return False


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception:  # noqa: BLE001 - a damaged zip directory raises anything; torch.load reports it
        return False
    return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in names)


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    import pickle
    import warnings

    import torch

    zipped = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4" and similar are noise here
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        raw = None if zipped else _raw_pickle_protocol(path)
        if "GLOBAL" not in msg and "allowlisted" not in msg and raw is None:
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint (or it is corrupt): {_first_line(msg, 'WeightsUnpickler error:')}"
            ) from exc
        if not allow_pickle:
            what = (f"it needs {_unsafe_detail(msg)}" if raw is None else
                    f"it is a plain Python pickle (protocol {raw}, not written by torch.save) that only full "
                    "unpickling can read")
            raise UnsafeCheckpointError(
                f"{path} is a full pickle: {what}, and loading it runs code stored in "
                "the file, which can do anything a program you run can do (delete files, steal keys). "
                "bnfuse refused and nothing in it was executed. If you trust where it came from, pass "
                "--allow-pickle (allow_pickle=True in Python); better, ask for a state_dict or .safetensors file"
            ) from exc
    except Exception as exc:  # noqa: BLE001 - the safe loader runs no file code: any failure is a bad file
        # garbage makes the unpickler raise KeyError, IndexError, struct.error, ...; a cut zip RuntimeError
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint: it is truncated or corrupt "
            f"({type(exc).__name__}: {_first_line(str(exc))})"
        ) from exc
    import sys

    if os.getcwd() not in sys.path and "" not in sys.path:  # the pickled classes may live in the user's project
        sys.path.insert(0, os.getcwd())
    try:
        if not zipped and _raw_pickle_protocol(path) is not None:  # pickle.dump, not torch.save
            with open(path, "rb") as fh:
                return pickle.load(fh)  # noqa: S301 - the user passed --allow-pickle
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        raise CheckpointError(
            f"{path}: unpickling needs the module {exc.name!r}, which cannot be imported: run bnfuse from "
            "your project's directory or add it to PYTHONPATH (the pickle stores a reference to the "
            "model's class, not its code)"
        ) from exc
    except Exception as exc:  # arbitrary code ran; report what it raised
        raise CheckpointError(f"{path}: unpickling failed: {type(exc).__name__}: {_first_line(str(exc))}") from exc


def _raw_pickle_protocol(path: Path) -> "int | None":
    """The protocol of a file written by ``pickle.dump`` (3 or more); torch's own format uses 2."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 and 3 <= head[1] <= 5 else None


def _unsafe_detail(msg: str) -> str:
    """``GLOBAL torchvision.models.resnet.ResNet`` from torch's long weights_only message."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", msg)
    if found:
        return f"the Python object {found.group(1)}"
    found = re.search(r"but got (<class '[\w.]+'>|\S+)", msg)
    return f"the Python object {found.group(1)}" if found else "Python objects other than tensors"


def _first_line(msg: str, after: str = "") -> str:
    if after and after in msg:
        msg = msg[msg.find(after) + len(after):]
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "no details"


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _strip_prefixes(sd: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            notes.append(f"stripped the {prefix!r} prefix")
    return sd


def _classify(path: Path, obj: Any) -> Checkpoint:
    import torch
    from torch import nn

    if isinstance(obj, nn.Module):
        return Checkpoint(path, "module", module=obj)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a model or a state_dict of tensors"
        )
    meta = obj.get(META_KEY) if isinstance(obj.get(META_KEY), dict) else {}
    notes: list[str] = []
    if _is_tensor_dict(obj):
        return Checkpoint(path, "state_dict", state_dict=_strip_prefixes(obj, notes), notes=notes)
    for key in NESTED_KEYS:
        inner = obj.get(key)
        others = [k for k in NESTED_KEYS if k != key and k in obj and isinstance(obj[k], (dict, nn.Module))]
        also = f" (the file also has {', '.join(map(repr, others))}, not used)" if others else ""
        if isinstance(inner, nn.Module):
            return Checkpoint(path, "module", module=inner, metadata=meta,
                              notes=[f"used the module under {key!r}{also}"])
        if isinstance(inner, dict):
            tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
            if tensors:
                if key != "state_dict" or not meta:
                    notes.append(f"used the weights under {key!r}{also}")
                return Checkpoint(path, "state_dict", state_dict=_strip_prefixes(tensors, notes),
                                  metadata=meta, notes=notes)
    keys = ", ".join(map(repr, list(obj)[:8])) or "none"
    raise CheckpointError(
        f"{path} contains no model weights: found keys {keys}, but no tensors at the top level nor "
        f"under {', '.join(NESTED_KEYS)}"
    )


def read_checkpoint(path: "str | os.PathLike[str]", *, allow_pickle: bool = False) -> Checkpoint:
    """Read ``path`` (.pth/.pt/.bin/.ckpt, TorchScript, or .safetensors) without executing code.

    Nested training checkpoints and ``module.`` prefixes are unwrapped; bnfuse's own metadata
    (from a previous ``convert``) is returned in ``metadata``.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    if _is_torchscript(path):
        import warnings

        import torch

        try:
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": the user cannot act on it here
                warnings.simplefilter("ignore", FutureWarning)
                scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path} is a corrupt TorchScript archive: {_first_line(str(exc))}") from exc
        return Checkpoint(path, "torchscript", state_dict=dict(scripted.state_dict()),
                          notes=["TorchScript archive: its weights are used, its code is not"])
    return _classify(path, _torch_load(path, allow_pickle))


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        sd = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid .safetensors file (truncated or corrupt): {exc}") from exc
    meta: dict[str, Any] = {}
    if META_KEY in raw:
        try:
            meta = json.loads(raw[META_KEY])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: its bnfuse metadata is not valid JSON ({exc})") from exc
    if not sd:
        raise CheckpointError(f"{path} contains no tensors")
    notes: list[str] = []
    return Checkpoint(path, "state_dict", state_dict=_strip_prefixes(sd, notes), metadata=meta, notes=notes)


def read_object(path: "str | os.PathLike[str]", *, allow_pickle: bool = False, what: str = "data") -> Any:
    """The raw object stored in a .pt/.pth (tensors, dicts, lists, tuples) or .safetensors file.

    For files that are not models, such as ``bnfuse verify --data``: the same safety rules as
    :func:`read_checkpoint` (no pickle code runs unless ``allow_pickle``), no unwrapping.
    """
    path = Path(path)
    _check_file(path, what=what)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a valid .safetensors file (truncated or corrupt): {exc}") from exc
    return _torch_load(path, allow_pickle)


# --------------------------------------------------------------------------- writing


def check_output_path(output: Path, *, inputs: "list[Path]" = (), force: bool = False) -> None:  # type: ignore[assignment]
    """Refuse to overwrite an input, an existing file without ``force``, or write where we cannot."""
    if output.suffix not in (".pth", ".pt", ".safetensors"):
        raise OutputError(
            f"{output}: unknown output suffix {output.suffix or '(none)'!r}; use .pth, .pt or .safetensors"
        )
    for src in inputs:
        if src.exists() and output.exists() and output.resolve() == src.resolve():
            raise OutputError(f"{output} is the input file: bnfuse never overwrites its input; choose another -o")
    if output.is_dir():
        raise OutputError(f"{output} is a directory: give a file name such as {output / 'fused.pth'}")
    if output.exists() and not force:
        raise OutputError(f"{output} already exists: pass --force to replace it (the old file stays until the new one is complete)")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {output}: the directory {parent} does not exist")
    # a real probe: os.access says yes to root on read-only file systems and /sys
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{output.stem}.probe-", dir=parent)
    except OSError as exc:
        raise OutputError(
            f"cannot write {output}: the directory {parent} is not writable ({exc.strerror or exc}); "
            "choose another -o"
        ) from exc
    os.close(fd)
    os.unlink(probe)


def _safetensors_ready(sd: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Contiguous tensors, none sharing storage (safetensors refuses shared storage)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.device.index or 0)
        if key in seen and v.numel():
            v = v.clone()
        seen.add(key)
        out[k] = v.contiguous()
    return out


#: bytes read from the written file at a time while checking it: the check's whole memory cost
_CHUNK = 2 << 20
#: the largest .safetensors header the format allows (safetensors' own limit)
_MAX_HEADER = 100_000_000
#: safetensors' dtype names, by the name of the torch dtype (those this torch lacks are skipped)
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16", "uint32": "U32",
    "uint64": "U64", "complex64": "C64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
}


def _st_dtype(dtype: "torch.dtype") -> "str | None":
    return _ST_DTYPES.get(str(dtype).replace("torch.", ""))


def _byte_view(t: "torch.Tensor") -> memoryview:
    """The bytes of ``t`` in row-major order, as safetensors stores them: no copy for a contiguous CPU tensor."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # uint8 in torch first: numpy has no bfloat16 or float8
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _storage_crc(t: "torch.Tensor") -> "tuple[int, int]":
    """(nbytes, CRC-32) of the whole storage under ``t``: what ``torch.save`` writes for it."""
    import zlib

    import torch

    storage = t.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes == 0:
        return 0, 0
    if storage.device.type != "cpu":
        storage = storage.cpu()  # one storage at a time
    whole = torch.empty(0, dtype=torch.uint8).set_(storage)  # a view, no copy
    return nbytes, zlib.crc32(memoryview(whole.numpy()))


def _file_matches(fh: Any, view: memoryview, buf: bytearray) -> bool:
    """Whether the next ``len(view)`` bytes of ``fh`` are ``view``, read a chunk at a time (no mmap)."""
    for pos in range(0, len(view), len(buf)):
        n = min(len(buf), len(view) - pos)
        chunk = buf if n == len(buf) else bytearray(n)  # bytearray == buffer is a memcmp; slices compare slowly
        if fh.readinto(chunk) != n or chunk != view[pos:pos + n]:
            return False
    return True


def _meta_equal(stored: Any, metadata: dict[str, Any]) -> bool:
    return json.loads(json.dumps(metadata, default=str)) == stored


#: what a check found: missing keys, unexpected keys, keys with different contents, metadata equal
_Found = "tuple[list[str], list[str], list[str], bool]"


def _check_safetensors(tmp: Path, expected: dict[str, "torch.Tensor"], metadata: dict[str, Any]) -> _Found:
    """Parse the header with plain reads, then compare every tensor's bytes with the file's, chunk by chunk."""
    import struct

    with open(tmp, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"the file has {size} bytes, fewer than the 8 of the header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"the header length {n} is impossible (the file has {size} bytes)")
        header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        st_meta = header.pop("__metadata__", None) or {}
        spans = []
        for name, entry in header.items():
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                    or not 0 <= offsets[0] <= offsets[1] or not isinstance(entry.get("dtype"), str)
                    or not isinstance(entry.get("shape"), list)):
                raise ValueError(f"the header entry of {name!r} is malformed: {entry!r}")
            spans.append((offsets[0], offsets[1]))
        end = 0
        for begin, stop in sorted(spans):  # the format allows no holes and no overlaps
            if begin != end:
                raise ValueError(f"the tensor data has a hole or an overlap at byte {begin}")
            end = stop
        if size != 8 + n + end:
            raise ValueError(f"the file has {size} bytes, the header describes {8 + n + end}")
        raw_meta = st_meta.get(META_KEY, "{}") if isinstance(st_meta, dict) else None
        meta_ok = isinstance(raw_meta, str) and _meta_equal(json.loads(raw_meta), metadata)
        missing = [k for k in expected if k not in header]
        extra = [k for k in header if k not in expected]
        bad, todo = [], []
        for k, t in expected.items():
            entry = header.get(k)
            if entry is None:
                continue
            begin, stop = entry["data_offsets"]
            if (entry["dtype"] != _st_dtype(t.dtype) or entry["shape"] != list(t.shape)
                    or stop - begin != t.numel() * t.element_size()):
                bad.append(k)
            else:
                todo.append((begin, k))
        buf = bytearray(_CHUNK)
        for begin, k in sorted(todo):  # in file order: one sequential pass
            fh.seek(8 + n + begin)
            if not _file_matches(fh, _byte_view(expected[k]), buf):
                bad.append(k)
    order = {k: i for i, k in enumerate(expected)}
    return missing, extra, sorted(bad, key=order.__getitem__), meta_ok


def _zip_members(tmp: Path) -> "dict[str, tuple[int, int, int, int]]":
    """Every member of the zip container: name -> (data offset, size, CRC-32 in the directory, CRC-32 of the
    bytes in the file), the bytes streamed a chunk at a time with plain reads."""
    import struct
    import zlib

    with zipfile.ZipFile(tmp) as zf:
        infos = zf.infolist()
    members = {}
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(tmp, "rb") as fh:
        for info in infos:
            if (info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1
                    or info.compress_size != info.file_size):
                raise ValueError(f"the member {info.filename} is compressed or encrypted (torch.save never does)")
            fh.seek(info.header_offset)
            local = fh.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise ValueError(f"the local header of {info.filename} is missing")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            name = fh.read(name_len).decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
            if name != info.orig_filename:
                raise ValueError(f"the local header of {info.filename} names {name!r}")
            start = info.header_offset + 30 + name_len + extra_len
            fh.seek(start)
            crc = 0
            for pos in range(0, info.file_size, len(buf)):
                n = min(len(buf), info.file_size - pos)
                if fh.readinto(view[:n]) != n:
                    raise ValueError(f"the member {info.filename} is cut short")
                crc = zlib.crc32(view[:n], crc)
            members[info.filename] = (start, info.file_size, info.CRC, crc)
    return members


def _place(storages: "set[tuple[int, int]]", data: "dict[int, tuple[str, int, int]]") -> "dict[int, int]":
    """Where each storage of an ``mmap=True`` load lies in the file: data pointer -> data offset.

    Such storages are slices of one mapping of the whole file, so pointer = base + offset for one base;
    find the base that puts every storage on a member of its size. {} when none does (not mapped).
    """
    import mmap

    nonempty = sorted(s for s in storages if s[1])
    if not nonempty:
        return {}
    first, first_size = nonempty[0]
    found = None
    for start, (_, size, _) in sorted(data.items()):
        base = first - start
        if size == first_size and all(data.get(p - base, ("", -1, 0))[1] == n for p, n in nonempty):
            if base % mmap.PAGESIZE == 0:  # a mapping starts on a page: this is it
                found = base
                break
            found = base if found is None else found
    return {} if found is None else {p: p - found for p, _ in nonempty}


def _check_torch_file(tmp: Path, expected: dict[str, "torch.Tensor"], metadata: dict[str, Any], form: str) -> _Found:
    """Stream every zip member (CRC-32 against the directory and against the tensors in memory), and load the
    structure with ``mmap=True``, which reads the pickle but touches no tensor data."""
    import warnings
    from collections import Counter

    import torch

    members = _zip_members(tmp)
    data = {}  # data offset -> (name, size, CRC-32 of the file's bytes): one storage each
    for name, (start, size, dir_crc, crc) in members.items():
        parts = name.split("/")
        is_data = len(parts) == 3 and parts[1] == "data"
        if dir_crc != crc and not is_data:
            raise ValueError(f"the member {name} fails its CRC-32 check (damaged)")
        if is_data:
            data[start] = (name, size, crc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = torch.load(tmp, map_location="cpu", weights_only=form != "module", mmap=True)
    if form == "module":
        got, meta_ok = obj.state_dict(), True
    else:
        if not isinstance(obj, dict) or set(obj) != {META_KEY, "state_dict"} or not isinstance(obj["state_dict"], dict):
            raise ValueError(f"the file holds {type(obj).__name__} {list(obj)[:4] if isinstance(obj, dict) else ''}, "
                             f"not {{{META_KEY!r}, 'state_dict'}}")
        got, meta_ok = obj["state_dict"], _meta_equal(obj[META_KEY], metadata)
    del obj
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    loaded = {(g.untyped_storage().data_ptr(), g.untyped_storage().nbytes())
              for g in got.values() if isinstance(g, torch.Tensor)}
    # each key tied to its own zip member when the mmap load lets us see where its storage lies; otherwise
    # (another torch's loader) the storages are compared as a multiset of (size, CRC-32) below
    where = _place(loaded, data)
    one_to_one = sorted(where.values()) == sorted(s for s, (_, size, _) in data.items() if size)
    if not one_to_one:
        where = {}
    in_file = Counter((size, crc) for _, size, crc in data.values() if size)
    crcs: dict[tuple[str, int, int], tuple[int, int]] = {}  # storage in memory -> (nbytes, CRC-32)
    of_key: dict[str, tuple[int, int]] = {}
    bad = []
    for k, e in expected.items():
        g = got.get(k)
        if g is None:
            continue
        if (not isinstance(g, torch.Tensor) or g.dtype != e.dtype or g.shape != e.shape or g.stride() != e.stride()
                or g.storage_offset() != e.storage_offset()):
            bad.append(k)
            continue
        storage = e.untyped_storage()
        key = (str(storage.device), storage.data_ptr(), storage.nbytes())
        if key not in crcs:
            crcs[key] = _storage_crc(e)
        nbytes, crc = of_key[k] = crcs[key]
        if g.untyped_storage().nbytes() != nbytes:
            bad.append(k)
        elif nbytes:
            start = where.get(g.untyped_storage().data_ptr())
            if start is not None:
                ok = data[start][1:] == (nbytes, crc)
            else:  # not placed: its bytes must at least be in the file (and the multisets agree, below)
                ok = in_file[(nbytes, crc)] > 0
            if not ok:
                bad.append(k)
    want = Counter(c for c in crcs.values() if c[0])
    if form == "module":  # the module may hold more storages than its state_dict, never fewer
        short = want - in_file
        bad += [k for k, c in of_key.items() if c in short and k not in bad]
    elif not one_to_one and want != in_file:
        short = want - in_file
        bad += [k for k, c in of_key.items() if c in short and k not in bad]
        if not bad:
            bad.append("(data stored that no key uses)")
    if not bad and any(dir_crc != crc for _, _, dir_crc, crc in members.values()):
        raise ValueError("a data member fails its CRC-32 check against the zip directory (damaged)")
    return missing, extra, bad, meta_ok


def _verify_written(tmp: Path, expected: dict[str, "torch.Tensor"], metadata: dict[str, Any], form: str,
                    final: Path) -> None:
    """Check the temporary file against what was meant to be written, without loading it into memory.

    Every key present and no other, dtype and shape (and for .pth strides) equal, the metadata equal, and
    the contents: bit for bit for .safetensors (file bytes against the tensors, read in chunks), by CRC-32
    per storage for .pth (each zip member streamed, its CRC-32 compared with the zip directory's and with
    the CRC-32 of the storage in memory). The memory cost is one read buffer, not a copy of the model.
    """
    try:
        if tmp.suffix == ".safetensors":
            missing, extra, bad, meta_ok = _check_safetensors(tmp, expected, metadata)
        else:
            missing, extra, bad, meta_ok = _check_torch_file(tmp, expected, metadata, form)
    except Exception as exc:  # anything unreadable in a file we just wrote is a failed write
        raise OutputError(
            f"writing {final} failed the read-back check: the file cannot be read back ({type(exc).__name__}: "
            f"{_first_line(str(exc))}); the previous file, if any, is untouched"
        ) from exc
    meta_ok = meta_ok or form == "module"
    if missing or extra or bad or not meta_ok:
        raise OutputError(
            f"writing {final} failed the read-back check (missing {missing[:5]}, unexpected {extra[:5]}, "
            f"different values or shapes {bad[:5]}{'' if meta_ok else ', different metadata'}); "
            "the previous file, if any, is untouched"
        )


def write_checkpoint(
    output: "str | os.PathLike[str]",
    *,
    state_dict: "dict[str, torch.Tensor]",
    metadata: dict[str, Any],
    module: "nn.Module | None" = None,
    _after_write: "Callable[[Path], None] | None" = None,
) -> int:
    """Write atomically; return the file size.  ``module`` given: a pickled module (.pth only).

    ``.safetensors``: the state_dict, with ``metadata`` as a JSON string under ``bnfuse``.
    ``.pth``/``.pt``: ``{"bnfuse": metadata, "state_dict": ...}`` (loads with weights_only=True),
    or ``torch.save(module)`` when ``module`` is given.
    """
    import torch

    output = Path(output)
    form = "module" if module is not None else "state_dict"
    if form == "module" and output.suffix == ".safetensors":
        raise OutputError(f"{output}: a whole pickled module cannot be stored as .safetensors; use .pth")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{output.stem}.tmp-", suffix=output.suffix,
                                        dir=str(output.parent) or ".")
    except OSError as exc:
        raise OutputError(
            f"cannot write {output}: {exc.strerror or exc} in the directory {output.parent}; choose another -o"
        ) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the output gets the usual permissions
    try:
        try:
            if output.suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file(_safetensors_ready(state_dict), str(tmp), metadata={META_KEY: json.dumps(metadata)})
            elif form == "module":
                torch.save(module, tmp)
            else:
                torch.save({META_KEY: metadata, "state_dict": state_dict}, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:
            raise OutputError(f"cannot write {output}: {exc.strerror or exc} (nothing was left behind)") from exc
        if _after_write is not None:
            _after_write(tmp)
        _verify_written(tmp, state_dict, metadata, form, output)
        try:
            os.replace(tmp, output)
        except OSError as exc:
            raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return output.stat().st_size

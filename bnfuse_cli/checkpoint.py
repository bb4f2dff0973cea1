"""Read checkpoints in the shapes people save them, and write them without ever losing a file.

Reading checks the file before anything is parsed from it: every record of a torch zip archive is
streamed through ``zipfile`` (which checks its CRC-32), and a ``.safetensors`` header must describe
exactly the bytes in the file. It never executes a pickle unless the caller allows it:
``torch.load`` runs with ``weights_only=True``, and a file that needs full unpickling is refused with
:class:`UnsafeCheckpointError` before anything in it runs.

Writing goes to an anonymous file in the output's directory (Linux ``O_TMPFILE``; elsewhere a
named temporary file that a later write removes if its process died), is fsynced, read back and
checked (streamed a chunk at a time: the check costs one read buffer, not a second copy of the
model), and only then linked into place (``os.link``: never over a file that appeared meanwhile)
or, with ``force``, renamed over the old file; then the directory is fsynced. An interrupted or
failed write leaves no file behind and any previous output intact, and :func:`written_since` says
exactly which outputs were placed.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import socket
import struct
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
    "write_mark",
    "written_since",
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
    #: every dict of tensors in the file by its dotted key path ("" for the top level), prefixes not stripped:
    #: what a caller that knows the architecture chooses from when ``state_dict`` does not match it
    candidates: "dict[str, dict[str, torch.Tensor]]" = field(default_factory=dict)
    #: the dotted key path ``state_dict`` was taken from ("" for the top level, None when not a state_dict)
    key: "str | None" = None


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


def _check_integrity(path: Path, what: str = "checkpoint") -> None:
    """Refuse a damaged file before anything is parsed from it.

    A torch zip archive: every record is streamed through ``zipfile`` a chunk at a time, which checks
    its CRC-32 (``torch.load`` does not: a flipped byte would load silently). A ``.safetensors`` file:
    its header must describe exactly the bytes the file holds (it has no checksum of the data itself).
    Legacy (non-zip) torch files carry no checksum to check.
    """
    if path.suffix.lower() == ".safetensors":
        try:
            with open(path, "rb") as fh:
                _st_header(fh, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise CheckpointError(
                f"{path} is not a valid .safetensors file (truncated or corrupt): {exc}. Nothing was loaded "
                "from it; copy or download it again"
            ) from exc
    elif zipfile.is_zipfile(path):
        _check_zip_records(path, what)


def _check_zip_records(path: Path, what: str) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:  # noqa: BLE001 - a damaged directory raises BadZipFile, ValueError, struct.error...
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch {what}: it is truncated or corrupt (its zip directory is "
            f"damaged: {_first_line(str(exc))}); copy or download it again"
        ) from exc
    with zf:
        for info in zf.infolist():
            try:
                with zf.open(info) as member:
                    while member.read(_CHUNK):
                        pass
            except OSError as exc:
                raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
            except Exception as exc:  # noqa: BLE001 - BadZipFile (CRC, header), EOFError, zlib.error, ...
                text = str(exc)
                why = ("fails its CRC-32 check: its bytes are not the ones that were written" if "CRC" in text
                       else f"is damaged ({_first_line(text)})")
                raise CheckpointError(
                    f"{path} is corrupt: its record {info.filename} {why}, so the file was damaged after it was "
                    f"saved (storage or transfer). Nothing was loaded from it; copy or download it again"
                ) from exc


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


def _is_compiled(module: Any) -> bool:
    """A ``torch.compile`` wrapper (``OptimizedModule``), recognised without importing torch._dynamo."""
    from torch import nn

    return (type(module).__name__ == "OptimizedModule" and type(module).__module__.startswith("torch._dynamo")
            and isinstance(getattr(module, "_orig_mod", None), nn.Module))


def _unwrap_compiled(module: "nn.Module", notes: list[str]) -> "nn.Module":
    """The module a pickled ``torch.compile`` wrapper holds, with nested wrappers replaced by theirs too:
    running the wrapper would compile the model (minutes, and dynamo failures) for nothing."""
    count = 0
    while _is_compiled(module):
        module, count = module._orig_mod, count + 1
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            inner = child
            while _is_compiled(inner):
                inner, count = inner._orig_mod, count + 1
            if inner is not child:
                parent._modules[name] = inner
    if count:
        notes.append(f"unwrapped {count} torch.compile wrapper{'s' if count > 1 else ''} (OptimizedModule): "
                     "the original module is used, nothing is compiled")
    return module


def _tensor_dicts(obj: Any, where: str = "", depth: int = 0,
                  found: "dict[str, dict[str, torch.Tensor]] | None" = None) -> "dict[str, dict[str, torch.Tensor]]":
    """Every dict in ``obj`` holding tensors under string keys, by dotted key path ('' for ``obj`` itself)."""
    import torch

    found = {} if found is None else found
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            found[where] = tensors
        items: Any = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return found
    if depth < 8:
        for k, v in items:
            if isinstance(v, (dict, list, tuple)) and not (depth == 0 and k == META_KEY):
                _tensor_dicts(v, f"{where}.{k}" if where else str(k), depth + 1, found)
    return found


_MISSING = object()


def _lookup(obj: Any, key: str) -> Any:
    """``obj`` at the dotted key path ``key`` (``ema.model``; dict keys may contain dots), else _MISSING."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for k, v in obj.items():
            if isinstance(k, str) and key.startswith(k + "."):
                found = _lookup(v, key[len(k) + 1:])
                if found is not _MISSING:
                    return found
    elif isinstance(obj, (list, tuple)):
        head, _, rest = key.partition(".")
        if head.isdigit() and int(head) < len(obj):
            return obj[int(head)] if not rest else _lookup(obj[int(head)], rest)
    return _MISSING


def _describe(candidates: "dict[str, dict[str, Any]]", limit: int = 8) -> str:
    shown = [f"{k or '(top level)'!r} ({len(v)} tensors)" for k, v in
             sorted(candidates.items(), key=lambda kv: -len(kv[1]))[:limit]]
    more = len(candidates) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "") if shown else "none"


def _classify(path: Path, obj: Any, key: "str | None" = None) -> Checkpoint:
    import torch
    from torch import nn

    notes: list[str] = []
    if isinstance(obj, nn.Module):
        if key is not None:
            raise CheckpointError(f"{path} holds a whole model ({type(obj).__name__}), not a dictionary: "
                                  f"there is no key {key!r} to choose; leave --key out")
        return Checkpoint(path, "module", module=_unwrap_compiled(obj, notes), notes=notes)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a model or a state_dict of tensors"
        )
    meta = obj.get(META_KEY) if isinstance(obj.get(META_KEY), dict) else {}
    candidates = _tensor_dicts(obj)
    if key is not None:
        inner = _lookup(obj, key)
        if isinstance(inner, nn.Module):
            return Checkpoint(path, "module", module=_unwrap_compiled(inner, notes), metadata=meta,
                              notes=[f"used the module under {key!r} (chosen with --key)"] + notes)
        tensors = ({k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
                   if isinstance(inner, dict) else {})
        if not tensors:
            what = "no such key" if inner is _MISSING else f"it holds a {type(inner).__name__}, not tensors"
            raise CheckpointError(
                f"{path}: --key {key!r} does not name weights ({what}). The dicts of tensors in this file are "
                f"under {_describe(candidates)}; pass one of them with --key"
            )
        notes.append(f"used the weights under {key!r} (chosen with --key)")
        return Checkpoint(path, "state_dict", state_dict=_strip_prefixes(tensors, notes), metadata=meta,
                          notes=notes, candidates=candidates, key=key)
    if _is_tensor_dict(obj):
        return Checkpoint(path, "state_dict", state_dict=_strip_prefixes(obj, notes), notes=notes,
                          candidates=candidates, key="")
    for name in NESTED_KEYS:
        inner = obj.get(name)
        others = [k for k in NESTED_KEYS if k != name and k in obj and isinstance(obj[k], (dict, nn.Module))]
        also = f" (the file also has {', '.join(map(repr, others))}, not used)" if others else ""
        if isinstance(inner, nn.Module):
            return Checkpoint(path, "module", module=_unwrap_compiled(inner, notes), metadata=meta,
                              notes=[f"used the module under {name!r}{also}"] + notes)
        if isinstance(inner, dict):
            tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
            if tensors:
                if name != "state_dict" or not meta:
                    notes.append(f"used the weights under {name!r}{also}")
                return Checkpoint(path, "state_dict", state_dict=_strip_prefixes(tensors, notes),
                                  metadata=meta, notes=notes, candidates=candidates, key=name)
    if candidates:
        # no well-known key: the caller that knows the architecture picks the dict whose keys match it
        # (loading.load_source); on its own, the largest dict of tensors is the best guess
        best = max(candidates, key=lambda k: len(candidates[k]))
        notes.append(f"used the weights under {best!r}, the largest of {len(candidates)} dicts of tensors "
                     "in the file (pass --key to choose another)" if len(candidates) > 1 else
                     f"used the weights under {best!r}")
        return Checkpoint(path, "state_dict", state_dict=_strip_prefixes(dict(candidates[best]), notes),
                          metadata=meta, notes=notes, candidates=candidates, key=best)
    keys = ", ".join(map(repr, list(obj)[:8])) or "none"
    raise CheckpointError(
        f"{path} contains no model weights: found keys {keys}, but no tensors at the top level nor "
        f"under any key (nested dicts and lists searched)"
    )


def read_checkpoint(path: "str | os.PathLike[str]", *, allow_pickle: bool = False,
                    key: "str | None" = None) -> Checkpoint:
    """Read ``path`` (.pth/.pt/.bin/.ckpt, TorchScript, or .safetensors) without executing code.

    The file is checked first (zip CRC-32 of every record, a consistent .safetensors header): a damaged
    file is a :class:`CheckpointError` naming the record. Nested training checkpoints, ``module.``
    prefixes and ``torch.compile`` wrappers are unwrapped; bnfuse's own metadata (from a previous
    ``convert``) is returned in ``metadata``. ``key`` is the dotted key path of the weights inside a
    training checkpoint (``"model_state"``, ``"ema.model"``); without it, the weights are found under the
    well-known keys (:data:`NESTED_KEYS`) or else in the largest dict of tensors, and every dict of tensors
    is listed in ``candidates`` for a caller that can match them against an architecture.
    """
    path = Path(path)
    _check_file(path)
    _check_integrity(path)
    if path.suffix.lower() == ".safetensors":
        if key is not None:
            raise CheckpointError(f"{path} is a .safetensors file: it has no nested keys, leave --key out")
        return _read_safetensors(path)
    if _is_torchscript(path):
        import warnings

        import torch

        if key is not None:
            raise CheckpointError(f"{path} is a TorchScript archive: it has no nested keys, leave --key out")
        try:
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": the user cannot act on it here
                warnings.simplefilter("ignore", FutureWarning)
                scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path} is a corrupt TorchScript archive: {_first_line(str(exc))}") from exc
        return Checkpoint(path, "torchscript", state_dict=dict(scripted.state_dict()),
                          notes=["TorchScript archive: its weights are used, its code is not"], key="")
    return _classify(path, _torch_load(path, allow_pickle), key)


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
    return Checkpoint(path, "state_dict", state_dict=_strip_prefixes(sd, notes), metadata=meta, notes=notes, key="")


def read_object(path: "str | os.PathLike[str]", *, allow_pickle: bool = False, what: str = "data") -> Any:
    """The raw object stored in a .pt/.pth (tensors, dicts, lists, tuples) or .safetensors file.

    For files that are not models, such as ``bnfuse verify --data``: the same safety rules as
    :func:`read_checkpoint` (no pickle code runs unless ``allow_pickle``), no unwrapping.
    """
    path = Path(path)
    _check_file(path, what=what)
    _check_integrity(path, what)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a valid .safetensors file (truncated or corrupt): {exc}") from exc
    return _torch_load(path, allow_pickle)


# --------------------------------------------------------------------------- writing

#: outputs this process has placed, complete and checked, in order (see :func:`written_since`)
_WRITTEN: "list[Path]" = []
#: ``force`` as given to :func:`check_output_path` for each output path (absolute), for write_checkpoint
_FORCE: "dict[str, bool]" = {}


def write_mark() -> int:
    """A mark in this process's record of placed outputs: pass it to :func:`written_since` later."""
    return len(_WRITTEN)


def written_since(mark: int) -> "list[Path]":
    """The outputs :func:`write_checkpoint` placed since ``mark`` (each complete and checked).

    True at every instant, also when a ``KeyboardInterrupt`` arrives during a write: an output is
    recorded as soon as the link or rename that places it has happened (an interrupt between that call
    and the record is caught by comparing the output's inode with the written file's), and an output
    that is not recorded was not created or changed.
    """
    return list(_WRITTEN[mark:])


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "host"


def _temp_name(output_name: str) -> str:
    """``.NAME.bnfuse-tmp.HOST.PID.RANDOM``: whose it is, so a later write can tell a stale one."""
    return f".{output_name}.bnfuse-tmp.{_host()}.{os.getpid()}.{os.urandom(4).hex()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _remove_stale_temporaries(directory: Path, output_name: str) -> None:
    """Remove named temporary files of earlier writes of ``output_name`` whose process has died (kill -9,
    power loss) on this host. Only bnfuse's own pattern, only dead processes, only this host: a
    temporary file of a write still running, here or on another machine sharing the directory, stays."""
    prefix = f".{output_name}.bnfuse-tmp."
    pattern = re.compile(re.escape(prefix) + r"(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}")
    try:
        names = [e.name for e in os.scandir(directory) if e.name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        found = pattern.fullmatch(name)
        if found and found["host"] == _host() and not _alive(int(found["pid"])):
            try:
                os.unlink(directory / name)
            except OSError:
                pass


def _open_temporary(directory: Path, output_name: str) -> "tuple[int, Path | None]":
    """A new empty file in ``directory``, mode 0666 less the umask: (fd, None) for an anonymous file
    (Linux ``O_TMPFILE``: it has no name, so no crash can leave it behind), else (fd, its name)."""
    cloexec = getattr(os, "O_CLOEXEC", 0)
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile and os.path.isdir("/proc/self/fd"):  # linking it into place needs /proc/self/fd
        try:
            return os.open(directory, tmpfile | os.O_RDWR | cloexec, 0o666), None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # not supported here: fall back
                raise
    named = directory / _temp_name(output_name)
    return os.open(named, os.O_RDWR | os.O_CREAT | os.O_EXCL | cloexec, 0o666), named


def check_output_path(output: Path, *, inputs: "list[Path]" = (), force: bool = False) -> None:  # type: ignore[assignment]
    """Refuse to overwrite an input, an existing file without ``force``, or write where we cannot.

    ``force`` is remembered for this path: a later :func:`write_checkpoint` of it without an explicit
    ``force`` places the file without overwriting (``os.link``) unless ``force`` was given here.
    """
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
        fd, named = _open_temporary(parent, output.name)
    except OSError as exc:
        raise OutputError(
            f"cannot write {output}: the directory {parent} is not writable ({exc.strerror or exc}); "
            "choose another -o"
        ) from exc
    os.close(fd)
    if named is not None:
        named.unlink(missing_ok=True)
    _FORCE[os.path.abspath(output)] = force


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


#: bytes per element of safetensors' dtypes (sub-byte and unknown ones are not size-checked)
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
             "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1}


def _st_header(fh: Any, size: int) -> "tuple[int, dict[str, Any], Any]":
    """(header length, {tensor: entry}, ``__metadata__``) of a .safetensors file, read with plain reads and
    checked to describe exactly the file's bytes: a header length that fits, a JSON object, well-formed
    entries whose byte spans match their dtype and shape, no holes or overlaps, and nothing after the last
    tensor. Raises ValueError naming what is wrong."""
    head = fh.read(8)
    if len(head) != 8:
        raise ValueError(f"the file has {size} bytes, fewer than the 8 of the header length")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, _MAX_HEADER):
        raise ValueError(f"the header length {n} is impossible (the file has {size} bytes)")
    try:
        header = json.loads(fh.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    st_meta = header.pop("__metadata__", None) or {}
    spans = []
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] or not isinstance(entry.get("dtype"), str)
                or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"the header entry of tensor {name!r} is malformed: {entry!r}")
        itemsize = _ST_SIZES.get(entry["dtype"])
        numel = 1
        for d in shape:
            numel *= d
        if itemsize is not None and offsets[1] - offsets[0] != numel * itemsize:
            raise ValueError(f"tensor {name!r} ({entry['dtype']} {shape}) needs {numel * itemsize} bytes, its "
                             f"header entry gives it {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):  # the format allows no holes and no overlaps
        if begin != end:
            raise ValueError(f"the data of tensor {name!r} starts at byte {begin} of the data, not {end} "
                             "(a hole or an overlap)")
        end = stop
    if size != 8 + n + end:
        last = max(spans)[2] if spans else None
        cut = f" (the data of tensor {last!r} is cut short)" if size < 8 + n + end and last else ""
        raise ValueError(f"the file has {size} bytes, its header describes {8 + n + end}{cut}")
    return n, header, st_meta


def _check_safetensors(tmp: Path, expected: dict[str, "torch.Tensor"], metadata: dict[str, Any]) -> _Found:
    """Parse the header with plain reads, then compare every tensor's bytes with the file's, chunk by chunk."""
    with open(tmp, "rb") as fh:
        n, header, st_meta = _st_header(fh, os.fstat(fh.fileno()).st_size)
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
        if final.suffix == ".safetensors":
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


class _FdWriter(io.RawIOBase):
    """A file object over a raw descriptor for ``torch.save`` that keeps the first ``OSError``: torch turns a
    failed write into ``RuntimeError: ... inline_container.cc ... unexpected pos``, losing the cause."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.error: "OSError | None" = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:done + (1 << 30)])
        except OSError as exc:
            self.error = self.error or exc
            raise
        return done


def _write_safetensors(out: _FdWriter, state_dict: "dict[str, torch.Tensor]", metadata: dict[str, Any],
                       output: Path) -> None:
    """The .safetensors format, streamed one tensor at a time (safetensors' own writer goes through a named
    temporary file of its own, mode 0600, which neither an anonymous file nor the umask allow)."""
    names = sorted(state_dict, key=lambda k: -state_dict[k].element_size())  # widest first: every offset aligned
    header: dict[str, Any] = {"__metadata__": {META_KEY: json.dumps(metadata)}}
    offset = 0
    for k in names:
        t = state_dict[k]
        dtype = _st_dtype(t.dtype)
        if dtype is None:
            raise OutputError(f"cannot write {output}: tensor {k!r} has dtype {t.dtype}, which .safetensors cannot "
                              "store; write a .pth instead")
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    out.write(struct.pack("<Q", len(raw)) + raw)
    for k in names:
        out.write(_byte_view(state_dict[k]))


#: what to do about a failed write, by errno
_WRITE_HINTS = {
    errno.ENOSPC: "the file system is full: free space there or choose another -o",
    errno.EDQUOT: "the disk quota is used up: free space or choose another -o",
    errno.EFBIG: "the file is larger than the file size limit allows (ulimit -f, or the file system's own limit): "
                 "raise the limit or choose another -o",
    errno.EROFS: "the file system is read-only: choose another -o",
    errno.EIO: "the device reported an I/O error: check the disk or network file system and retry",
}


def _cause(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


def _guess_cause(fd: int) -> OSError:
    """Why torch's own write failed when no OSError reached us: a full file system or the size limit."""
    try:
        import resource

        st = os.fstatvfs(fd)
        if st.f_bavail == 0:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and os.fstat(fd).st_size >= limit:
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    except (ImportError, OSError, ValueError):
        pass
    return OSError(errno.EIO, "the write failed")


def _is_placed(output: Path, fd: int) -> bool:
    """Whether ``output`` now is the file open as ``fd`` (a link or rename happened)."""
    try:
        a, b = os.lstat(output), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def write_checkpoint(
    output: "str | os.PathLike[str]",
    *,
    state_dict: "dict[str, torch.Tensor]",
    metadata: dict[str, Any],
    module: "nn.Module | None" = None,
    force: "bool | None" = None,
    _after_write: "Callable[[Path], None] | None" = None,
) -> int:
    """Write atomically; return the file size.  ``module`` given: a pickled module (.pth only).

    ``.safetensors``: the state_dict, with ``metadata`` as a JSON string under ``bnfuse``.
    ``.pth``/``.pt``: ``{"bnfuse": metadata, "state_dict": ...}`` (loads with weights_only=True),
    or ``torch.save(module)`` when ``module`` is given.

    The data goes to an anonymous file (``O_TMPFILE``; a named ``.NAME.bnfuse-tmp.*`` file where that is
    not supported), is fsynced, read back and checked, and placed: ``force=False`` links it into place and
    fails with :class:`OutputError` if ``output`` exists, even when another process created it during the
    write; ``force=True`` renames it over ``output`` atomically. Then the directory is fsynced. ``force=None``
    (the default) uses the ``force`` given to :func:`check_output_path` for this path, else True. The file
    gets mode 0666 less the umask. An OS-level failure (ENOSPC, EFBIG, EIO, EROFS, EDQUOT) is an
    :class:`OutputError` naming the file and the cause; nothing is left behind and an old file is intact.
    """
    import torch

    output = Path(output)
    form = "module" if module is not None else "state_dict"
    if form == "module" and output.suffix == ".safetensors":
        raise OutputError(f"{output}: a whole pickled module cannot be stored as .safetensors; use .pth")
    if force is None:
        force = _FORCE.get(os.path.abspath(output), True)
    directory = output.parent
    if not force and os.path.lexists(output):
        raise OutputError(f"{output} already exists: pass --force to replace it")
    _remove_stale_temporaries(directory, output.name)
    existed = os.path.lexists(output)
    kept = f"the previous {output.name} is untouched" if existed else f"no {output.name} was created"
    try:
        fd, named = _open_temporary(directory, output.name)
    except OSError as exc:
        raise OutputError(
            f"cannot write {output}: {_cause(exc)} in the directory {directory}; choose another -o"
        ) from exc
    tmp = named if named is not None else Path(f"/proc/self/fd/{fd}")
    link: "Path | None" = None  # the name an anonymous file gets for an atomic replace
    entry = Path(output)  # this write's record in _WRITTEN (found by identity)
    try:
        writer = _FdWriter(fd)
        try:
            if output.suffix == ".safetensors":
                _write_safetensors(writer, state_dict, metadata, output)
            elif form == "module":
                torch.save(module, writer)
            else:
                torch.save({META_KEY: metadata, "state_dict": state_dict}, writer)
            os.fsync(fd)
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and writer.error is None and "unexpected pos" not in str(exc):
                raise  # not a failed write: a bug, or an object torch cannot save
            cause = exc if isinstance(exc, OSError) else writer.error or _guess_cause(fd)
            hint = _WRITE_HINTS.get(cause.errno or 0, "choose another -o or retry")
            raise OutputError(
                f"cannot write {output}: {_cause(cause)} after {os.fstat(fd).st_size:,} bytes; {hint}. The "
                f"partial file was removed and {kept}"
            ) from exc
        if _after_write is not None:
            _after_write(tmp)
        _verify_written(tmp, state_dict, metadata, form, output)
        try:
            dirfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as exc:
            raise OutputError(f"cannot write {output}: {_cause(exc)} opening the directory {directory}") from exc
        try:
            try:
                if named is None and not force:  # no name ever: a crash now leaves nothing
                    os.link(str(tmp), output.name, dst_dir_fd=dirfd, follow_symlinks=True)
                elif named is None:
                    link = directory / _temp_name(output.name)
                    os.link(str(tmp), link.name, dst_dir_fd=dirfd, follow_symlinks=True)
                    os.replace(link.name, output.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
                elif not force:
                    os.link(named.name, output.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
                else:
                    os.replace(named.name, output.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            except FileExistsError as exc:
                raise OutputError(
                    f"{output} was created by another process while bnfuse was writing it: it was left as it is "
                    "and this result was not written; pass --force to replace it, or choose another -o"
                ) from exc
            except OSError as exc:
                hint = _WRITE_HINTS.get(exc.errno or 0, "choose another -o or retry")
                raise OutputError(f"cannot write {output}: {_cause(exc)} placing the file; {hint}; {kept}") from exc
            _WRITTEN.append(entry)
            try:
                os.fsync(dirfd)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # directories that cannot sync
                    raise OutputError(
                        f"{output} was written and checked, but its directory could not be synced ({_cause(exc)}): "
                        "a crash now could lose it; check the disk"
                    ) from exc
            if named is not None and not force:
                os.unlink(named)  # linked into place: the temporary name goes
        finally:
            os.close(dirfd)
        size = os.fstat(fd).st_size
    except BaseException:
        if not any(e is entry for e in _WRITTEN) and _is_placed(output, fd):  # interrupted right after placing
            _WRITTEN.append(entry)
        for name in (named, link):
            if name is not None:
                try:
                    os.unlink(name)
                except OSError:
                    pass
        raise
    finally:
        os.close(fd)
    return size

"""Read checkpoints in the shapes people save them, and write them without ever losing a file.

Reading never executes a pickle unless the caller allows it: ``torch.load`` runs with
``weights_only=True``, and a file that needs full unpickling is refused with
:class:`UnsafeCheckpointError` before anything in it runs.

Writing goes to a temporary file in the output's directory, is read back and checked, and only
then renamed over the destination, so an interrupted or failed write leaves no partial file and
any previous output intact.
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


def _read_back(tmp: Path, form: str) -> "tuple[dict[str, torch.Tensor], dict[str, Any]]":
    """The state_dict and metadata exactly as stored (no prefix stripping, no unwrapping)."""
    import torch

    if tmp.suffix == ".safetensors":
        from safetensors.torch import load_file, safe_open

        with safe_open(str(tmp), framework="pt") as f:
            raw = f.metadata() or {}
        return load_file(str(tmp), device="cpu"), json.loads(raw.get(META_KEY, "{}"))
    if form == "module":
        obj = torch.load(tmp, map_location="cpu", weights_only=False)  # our own file, just written
        return obj.state_dict(), {}
    obj = torch.load(tmp, map_location="cpu", weights_only=True)
    return obj["state_dict"], obj.get(META_KEY, {})


def _same(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.is_floating_point():
        return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    return torch.equal(a, b)


def _verify_written(tmp: Path, expected: dict[str, "torch.Tensor"], metadata: dict[str, Any], form: str,
                    final: Path) -> None:
    """Read the temporary file back and compare every tensor bit for bit, and the metadata."""
    try:
        got, meta = _read_back(tmp, form)
    except Exception as exc:  # anything unreadable in a file we just wrote is a failed write
        raise OutputError(
            f"writing {final} failed the read-back check: the file cannot be read back ({type(exc).__name__}: "
            f"{_first_line(str(exc))}); the previous file, if any, is untouched"
        ) from exc
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    bad = [k for k in expected if k in got and not _same(got[k], expected[k])]
    meta_ok = form == "module" or json.loads(json.dumps(metadata, default=str)) == meta
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

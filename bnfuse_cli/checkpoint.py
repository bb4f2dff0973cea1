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

__all__ = ["Checkpoint", "read_checkpoint", "write_checkpoint", "NESTED_KEYS", "SUFFIXES"]

#: where training checkpoints keep the weights, in the order they are tried
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema", "model_ema", "ema")
#: prefixes added by DataParallel/DDP and torch.compile
PREFIXES = ("module.", "_orig_mod.")
SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
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


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the file was not written completely")


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in names)


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    import pickle

    import torch

    zipped = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "GLOBAL" not in msg:
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint (or it is corrupt): {_first_line(msg, 'WeightsUnpickler error:')}"
            ) from exc
        if not allow_pickle:
            detail = msg[msg.find("GLOBAL"):].split("\n", 1)[0].rstrip(". ")
            raise UnsafeCheckpointError(
                f"{path} is a full pickle ({detail}): loading it runs code stored in the file, which can "
                "do anything a program you run can do. bnfuse refused and nothing in it was executed. "
                "If you trust where it came from, pass --allow-pickle (allow_pickle=True in Python); "
                "better, ask for a state_dict or .safetensors file"
            ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint: it is truncated or corrupt "
            f"({_first_line(str(exc))})"
        ) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # arbitrary code ran; report what it raised
        raise CheckpointError(f"{path}: unpickling failed: {type(exc).__name__}: {_first_line(str(exc))}") from exc


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
        if isinstance(inner, nn.Module):
            return Checkpoint(path, "module", module=inner, metadata=meta, notes=[f"used the module under {key!r}"])
        if isinstance(inner, dict):
            tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
            if tensors:
                if key != "state_dict" or not meta:
                    notes.append(f"used the weights under {key!r}")
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
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if _is_torchscript(path):
        import torch

        try:
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
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {output}: the directory {parent} is not writable")


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


def _verify_written(tmp: Path, expected: dict[str, "torch.Tensor"], form: str, final: Path) -> None:
    if form == "module":
        import torch

        obj = torch.load(tmp, map_location="cpu", weights_only=False)  # our own file, just written
        got = obj.state_dict()
    else:
        got = read_checkpoint(tmp).state_dict or {}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    bad = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if missing or extra or bad:
        raise OutputError(
            f"writing {final} failed the read-back check (missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shapes {bad[:5]}); the previous file, if any, is untouched"
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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.stem}.tmp-", suffix=output.suffix, dir=output.parent or ".")
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
        _verify_written(tmp, state_dict, form, output)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return output.stat().st_size

"""Read checkpoints in every form people save them (state_dicts, training checkpoints, whole modules,
TorchScript, .safetensors) without executing code, and say where in the file the weights were found.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .formats import META_KEY, first_line
from .unpickle import torch_load

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Checkpoint", "read_torch", "read_safetensors", "torch_object", "safetensors_object", "strip_prefixes",
           "NESTED_KEYS"]

#: where training checkpoints keep the weights, in the order they are tried
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema", "model_ema", "ema")
#: prefixes added by DataParallel/DDP and torch.compile
PREFIXES = ("module.", "_orig_mod.")


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


def read_torch(path: Path, allow_pickle: bool = False, key: "str | None" = None) -> Checkpoint:
    """A checked PyTorch file (.pth/.pt/.bin/.ckpt/.tar, TorchScript) read without executing code (a full
    unpickle only with ``allow_pickle``): a state_dict, a training checkpoint (its weights found under
    ``key``, the dotted key path of them, or else under the well-known keys, :data:`NESTED_KEYS`, or in the
    largest dict of tensors, every dict of tensors listed in ``candidates``), a whole module."""
    if _is_torchscript(path):
        if key is not None:
            raise CheckpointError(f"{path} is a TorchScript archive: it has no nested keys, leave --key out")
        return _read_torchscript(path)
    return _classify(path, torch_load(path, allow_pickle), key)


def torch_object(path: Path, allow_pickle: bool = False) -> Any:
    """The raw object a checked PyTorch file stores (no unwrapping)."""
    return torch_load(path, allow_pickle)


def safetensors_object(path: Path, allow_pickle: bool = False) -> "dict[str, torch.Tensor]":  # noqa: ARG001
    """The tensors a checked .safetensors file stores."""
    return _load_safetensors(path)


def _load_safetensors(path: Path) -> "dict[str, torch.Tensor]":
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid .safetensors file (truncated or corrupt): {exc}") from exc


def read_safetensors(path: Path, allow_pickle: bool = False, key: "str | None" = None) -> Checkpoint:  # noqa: ARG001
    """A checked .safetensors file: its tensors and bnfuse's record (no code can run from it)."""
    if key is not None:
        raise CheckpointError(f"{path} is a .safetensors file: it has no nested keys, leave --key out")
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid .safetensors file (truncated or corrupt): {exc}") from exc
    sd = _load_safetensors(path)
    meta: dict[str, Any] = {}
    if META_KEY in raw:
        try:
            meta = json.loads(raw[META_KEY])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: its bnfuse metadata is not valid JSON ({exc})") from exc
    if not sd:
        raise CheckpointError(f"{path} contains no tensors")
    notes: list[str] = []
    return Checkpoint(path, "state_dict", state_dict=strip_prefixes(sd, notes), metadata=meta, notes=notes, key="")


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception:  # noqa: BLE001 - a damaged zip directory raises anything; torch.load reports it
        return False
    return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in names)


def _read_torchscript(path: Path) -> Checkpoint:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": the user cannot act on it here
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path} is a corrupt TorchScript archive: {first_line(str(exc))}") from exc
    return Checkpoint(path, "torchscript", state_dict=dict(scripted.state_dict()),
                      notes=["TorchScript archive: its weights are used, its code is not"], key="")


# --------------------------------------------------------------------------- where the weights are


def strip_prefixes(sd: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """``sd`` without a ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile) prefix shared by
    every key; each stripped prefix is noted."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = dict(sd)  # torch's helper renames in place: never the caller's dict
            consume_prefix_in_state_dict_if_present(sd, prefix)
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


def _tensors(obj: Any) -> "dict[str, torch.Tensor]":
    """The tensors ``obj`` holds directly under string keys ({} for anything but a dict)."""
    import torch

    return ({k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if isinstance(obj, dict) else {})


def _tensor_dicts(obj: Any, where: str = "", depth: int = 0,
                  found: "dict[str, dict[str, torch.Tensor]] | None" = None) -> "dict[str, dict[str, torch.Tensor]]":
    """Every dict in ``obj`` holding tensors under string keys, by dotted key path ('' for ``obj`` itself)."""
    found = {} if found is None else found
    if isinstance(obj, dict):
        tensors = _tensors(obj)
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
    """What ``obj`` (a loaded file) holds: a module, or the weights under ``key``, the top level, a
    well-known key, or else the largest dict of tensors."""
    from torch import nn

    notes: list[str] = []
    if isinstance(obj, nn.Module):
        if key is not None:
            raise CheckpointError(f"{path} holds a whole model ({type(obj).__name__}), not a dictionary: "
                                  f"there is no key {key!r} to choose; leave --key out")
        return Checkpoint(path, "module", module=_unwrap_compiled(obj, notes), notes=notes)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a model or a state_dict of tensors")
    meta = obj.get(META_KEY) if isinstance(obj.get(META_KEY), dict) else {}
    candidates = _tensor_dicts(obj)
    if key is not None:
        return _chosen(path, obj, key, meta, candidates)
    if obj and len(candidates.get("", {})) == len(obj):  # a plain state_dict: nothing but tensors at the top level
        return Checkpoint(path, "state_dict", state_dict=strip_prefixes(obj, notes), notes=notes,
                          candidates=candidates, key="")
    found = _under_known_key(path, obj, meta, candidates)
    if found is not None:
        return found
    if candidates:
        # no well-known key: the caller that knows the architecture picks the dict whose keys match it
        # (files.load.load_source); on its own, the largest dict of tensors is the best guess
        best = max(candidates, key=lambda k: len(candidates[k]))
        notes.append(f"used the weights under {best!r}, the largest of {len(candidates)} dicts of tensors "
                     "in the file (pass --key to choose another)" if len(candidates) > 1 else
                     f"used the weights under {best!r}")
        return Checkpoint(path, "state_dict", state_dict=strip_prefixes(dict(candidates[best]), notes),
                          metadata=meta, notes=notes, candidates=candidates, key=best)
    keys = ", ".join(map(repr, list(obj)[:8])) or "none"
    raise CheckpointError(
        f"{path} contains no model weights: found keys {keys}, but no tensors at the top level nor "
        f"under any key (nested dicts and lists searched)"
    )


def _chosen(path: Path, obj: dict, key: str, meta: dict[str, Any],
            candidates: "dict[str, dict[str, torch.Tensor]]") -> Checkpoint:
    """The module or weights at the dotted key path ``key`` (``--key``), or a CheckpointError listing the
    dicts of tensors there are."""
    from torch import nn

    notes: list[str] = []
    inner = _lookup(obj, key)
    if isinstance(inner, nn.Module):
        return Checkpoint(path, "module", module=_unwrap_compiled(inner, notes), metadata=meta,
                          notes=[f"used the module under {key!r} (chosen with --key)"] + notes)
    tensors = _tensors(inner)
    if not tensors:
        what = "no such key" if inner is _MISSING else f"it holds a {type(inner).__name__}, not tensors"
        raise CheckpointError(
            f"{path}: --key {key!r} does not name weights ({what}). The dicts of tensors in this file are "
            f"under {_describe(candidates)}; pass one of them with --key"
        )
    notes.append(f"used the weights under {key!r} (chosen with --key)")
    return Checkpoint(path, "state_dict", state_dict=strip_prefixes(tensors, notes), metadata=meta,
                      notes=notes, candidates=candidates, key=key)


def _under_known_key(path: Path, obj: dict, meta: dict[str, Any],
                     candidates: "dict[str, dict[str, torch.Tensor]]") -> "Checkpoint | None":
    """The module or weights under the first of :data:`NESTED_KEYS` that holds one, else None."""
    import torch
    from torch import nn

    notes: list[str] = []
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
                return Checkpoint(path, "state_dict", state_dict=strip_prefixes(tensors, notes),
                                  metadata=meta, notes=notes, candidates=candidates, key=name)
    return None

"""Turn a source (a model name, with or without a weights file, or a checkpoint file) into a ready
``nn.Module`` in eval mode, choosing the weights in the file that match the architecture."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BnfuseError, CheckpointError, UsageError
from .meta import FusedMeta
from .models import build, own_init_only
from .read import NESTED_KEYS, Checkpoint, strip_prefixes
from .table import FORMATS, check_file, read_checkpoint

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Source", "load_source", "load", "load_state_dict_strict", "check_arch"]


@dataclass
class Source:
    model: "nn.Module"
    #: how to rebuild the architecture (torchvision name, timm:NAME, pkg.mod:factory), if known
    arch: "str | None"
    #: "name" (built from a name), "module" (pickled module), "state_dict", "torchscript"
    kind: str
    #: what a bnfuse output records of its conversion (None for anything else)
    meta: "FusedMeta | None" = None
    path: "Path | None" = None
    weights: str = "none"
    notes: list[str] = field(default_factory=list)
    #: the seed its random initialisation was drawn from (a name built with weights "none"), else None
    seed: "int | None" = None
    #: where ``arch`` came from when neither the file itself nor ``--arch`` gave it (another file's record)
    arch_from: "str | None" = None


def check_arch(arch: "str | None", meta: "FusedMeta | None", where: Any) -> None:
    """Refuse an explicit ``arch`` that disagrees with the architecture a fused file records (a
    :class:`UsageError` naming both): the file's folds and merges were planned for that architecture."""
    if arch is None or meta is None or meta.arch is None or arch == meta.arch:
        return
    raise UsageError(
        f"--arch {arch} disagrees with {where}'s record: it was converted from {meta.arch}. A bnfuse output "
        f"brings its own architecture: leave --arch out, or compare files of the same architecture"
    )


def _dominant_dtype(sd: "dict[str, torch.Tensor]") -> "torch.dtype | None":
    counts: dict[Any, int] = {}
    for t in sd.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else None


def _strip_wrapper_prefix(expected: "set[str]", sd: "dict[str, Any]") -> "tuple[dict[str, Any], str | None]":
    """Drop a leading ``model.`` (Lightning) or other wrapper attribute shared by every key when
    the keys then match the architecture better (so a remaining mismatch names the real keys)."""
    if set(sd) == expected or not sd:
        return sd, None
    first = {k.split(".", 1)[0] for k in sd}
    if len(first) != 1 or not all("." in k for k in sd):
        return sd, None
    prefix = next(iter(first)) + "."
    stripped = {k[len(prefix):]: v for k, v in sd.items()}
    better = len(set(stripped) & expected) > len(set(sd) & expected)
    return (stripped, prefix) if better else (sd, None)


def load_state_dict_strict(model: "nn.Module", sd: "dict[str, torch.Tensor]", *, what: str, arch: str) -> list[str]:
    """Load strictly; a mismatch lists the missing and unexpected keys (never a silent partial load).

    A prefix shared by every key (``model.`` from a Lightning module, or another wrapper) is
    dropped when more keys then match the architecture; the load stays strict.  The model takes
    the dtype of most of the file's floating-point weights (said in a note when that is not
    float32).  Returns notes.
    """
    import torch

    notes: list[str] = []
    dtype = _dominant_dtype(sd)
    if dtype is not None and dtype != torch.float32:
        model.to(dtype)
        notes.append(f"the weights in {what} are {str(dtype).replace('torch.', '')}: the model was cast to it")
    expected = model.state_dict()
    sd, prefix = _strip_wrapper_prefix(set(expected), sd)
    if prefix:
        notes.append(f"stripped the {prefix!r} prefix shared by every key")
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    # torch reports a wrong shape only as text (and raises): those keys are held back and named here
    keys = model.load_state_dict({k: v for k, v in sd.items() if k not in wrong}, strict=False)
    missing = [k for k in keys.missing_keys if k not in wrong]
    if missing or keys.unexpected_keys or wrong:
        def show(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "") if items else "none"

        shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong]
        raise CheckpointError(
            f"{what} does not match architecture {arch}: missing keys: {show(missing)}; unexpected keys: "
            f"{show(list(keys.unexpected_keys))}; wrong shapes: {show(shapes)}. Check --arch (and its options), or "
            "that the file holds this model's weights"
        )
    return notes


def _normalised_keys(sd: "dict[str, Any]", expected: "set[str]") -> "set[str]":
    """The keys of ``sd`` after the prefix stripping a load does (``module.``, ``_orig_mod.``, a wrapper's)."""
    stripped = strip_prefixes(dict(sd), [])
    return set(_strip_wrapper_prefix(expected, stripped)[0])


def _pick_weights(ck: Checkpoint, expected: "set[str]", arch: str, *, explicit: bool) -> "tuple[dict[str, Any], list[str]]":
    """The state_dict of ``ck`` to load into ``arch``, with the notes on how it was found (replacing
    ``ck.notes`` when the choice changed): the one chosen with ``key`` (``explicit``), or the top level's or
    the first well-known key's (:data:`NESTED_KEYS`) when its keys match the architecture, else the only
    dict of tensors in the file whose keys match (searched under every key, nested too). Several matching
    and none chosen: a CheckpointError listing them (pass --key)."""
    sd = ck.state_dict or {}
    if explicit or not ck.candidates or len(ck.candidates) == 1 and ck.key in ck.candidates:
        return sd, ck.notes
    matching = [k for k, c in ck.candidates.items() if _normalised_keys(c, expected) == expected]
    decided = ck.key == "" or ck.key in NESTED_KEYS
    if decided and _normalised_keys(sd, expected) == expected:
        others = [k for k in matching if k != ck.key]
        if others and ck.key != "":
            return sd, ck.notes + [f"the weights under {', '.join(map(repr, others))} also match {arch}: not used "
                        f"(pass --key {others[0]} to use them)"]
        return sd, ck.notes
    if len(matching) == 1:
        notes: list[str] = []
        chosen = strip_prefixes(dict(ck.candidates[matching[0]]), notes)
        return chosen, [f"used the weights under {matching[0]!r}: the only dict of tensors in the file whose keys "
                        f"match {arch}"] + notes
    if len(matching) > 1:
        raise CheckpointError(
            f"{ck.path} holds {len(matching)} sets of weights that match {arch}, under "
            f"{', '.join(map(repr, matching))}: pass --key with the one to use (for example --key {matching[0]})"
        )
    return sd, ck.notes  # none matches: the strict load lists what differs


def _from_checkpoint(ck: Checkpoint, arch: "str | None", key: "str | None" = None,
                     record: "Source | None" = None) -> Source:
    """A checkpoint's model: a pickled module as it is; a state_dict loaded strictly into ``arch``, else the
    architecture its own record names, else the one ``record`` (a fused file loaded first) names."""
    from ..engine.passes import rebuild

    meta = FusedMeta.parse(ck.metadata, str(ck.path))
    check_arch(arch, meta, ck.path)
    if ck.kind == "module":
        return Source(ck.module, arch or (meta.arch if meta else None), "module", meta, ck.path, "file", ck.notes)
    use_arch = arch or (meta.arch if meta else None)
    kwargs = meta.arch_kwargs if meta else {}
    arch_from = None
    if not use_arch and record is not None and record.meta is not None and record.meta.arch:
        use_arch, kwargs, arch_from = record.meta.arch, record.meta.arch_kwargs, f"{record.path}'s record"
    if not use_arch:
        hint = " (a TorchScript archive)" if ck.kind == "torchscript" else ""
        raise UsageError(
            f"{ck.path} holds only a state_dict{hint}, so bnfuse needs the model code: pass --arch NAME "
            "(a torchvision name such as resnet50, timm:NAME, or package.module:factory)"
        )
    model = build(use_arch, weights=None, **kwargs)
    if meta is not None:
        model = rebuild(model, meta.steps)  # each round's items, as recorded (a new root for a top-level merge)
    sd, picked = _pick_weights(ck, set(model.state_dict()), use_arch, explicit=key is not None)
    named = use_arch if arch_from is None else f"{use_arch} (from {arch_from})"
    notes = load_state_dict_strict(model, sd, what=str(ck.path), arch=named)
    kind = "torchscript" if ck.kind == "torchscript" else "state_dict"
    return Source(model, use_arch, kind, meta, ck.path, "file", picked + notes, arch_from=arch_from)


def _from_program(path: Path, fmt: Any, device: str, allow_pickle: bool = False) -> Source:
    """An exported program (``.pt2``, ``.onnx``): opened in its own runtime, run as exported (no model code).
    Its opener checks the file first (a ``.pt2`` archive's members and CRC-32s in the same open file torch
    reads, an ``.onnx`` file through ``onnx.checker``); nothing in it runs unless ``allow_pickle``."""
    check_file(path, f"{fmt.runtime} program", (fmt,))
    try:
        module, raw = fmt.open(path, device, allow_pickle=allow_pickle)
    except BnfuseError:
        raise
    except Exception as exc:  # not a program of this format, or one from an incompatible version
        raise CheckpointError(f"{path} cannot be opened in {fmt.runtime} ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]})") from exc
    meta = FusedMeta.parse(raw, str(path))
    return Source(module, meta.arch if meta else None, "program", meta, path, "file",
                  [f"an exported program, run as exported in {fmt.runtime}"])


def load_source(
    source: "str | os.PathLike[str]",
    *,
    arch: "str | None" = None,
    weights: str = "default",
    allow_pickle: bool = False,
    key: "str | None" = None,
    seed: int = 0,
    device: str = "cpu",
    programs: bool = False,
    record: "Source | None" = None,
) -> Source:
    """Resolve ``source``: an existing file is a checkpoint, otherwise a model name.

    For a name, ``weights`` is ``default``, a torchvision weights name, ``none`` (random
    initialisation drawn from ``seed``: the same name and seed give the same model) or a path to
    a state_dict file.  The model is returned in eval mode.  With ``programs``, an exported program
    (``.pt2``, ``.onnx``) is opened in its own runtime, on ``device`` where that runtime can use it
    (``verify`` runs them; nothing folds a program).  A name that has no pretrained weights bnfuse can
    load (``timm:NAME``, ``package.module:factory``) takes ``weights="default"`` as its own
    initialisation, drawn from ``seed`` as ``none`` is.  ``record``, a fused file loaded first, gives
    a file that holds only a state_dict its architecture when ``arch`` is None; an explicit ``arch``
    that disagrees with a file's own record is a :class:`UsageError`.

    ``key`` is the dotted key path of the weights inside the checkpoint file read (the source, or the
    ``weights`` file of a name), such as ``"model_state"`` or ``"ema.model"``. Without it the weights are
    found under the well-known keys or, failing a match with the architecture, as the one dict of tensors
    anywhere in the file whose keys match it; when several match, a :class:`CheckpointError` lists them.
    """
    text = str(source)
    path = Path(text)
    looks_like_path = ":" not in text and ("/" in text or os.sep in text or bool(path.suffix))
    program = next((f for f in FORMATS if f.program and path.suffix.lower() in f.suffixes), None)
    if path.exists() and program is not None and programs:
        src = _from_program(path, program, device, allow_pickle)
    elif path.exists():
        src = _from_checkpoint(read_checkpoint(path, allow_pickle=allow_pickle, key=key), arch, key, record)
    elif not looks_like_path:
        w = weights.strip()
        if key is not None and (w.lower() == "none" or not Path(w).exists()):
            raise UsageError(f"--key {key} chooses the weights inside a checkpoint file, but {text} is a model name "
                             "without a --weights FILE: leave --key out")
        if w.lower() == "none" or (w.lower() == "default" and own_init_only(text)):
            model = build(text, seed=seed)
            src = Source(model, text, "name", weights="none", seed=seed, notes=_reproducible(text, seed, model))
        elif Path(w).exists():
            model = build(text, seed=seed)
            ck = read_checkpoint(w, allow_pickle=allow_pickle, key=key)
            if ck.kind == "module":
                raise UsageError(f"--weights {w} holds a whole model, not a state_dict: convert it directly")
            sd, picked = _pick_weights(ck, set(model.state_dict()), text, explicit=key is not None)
            notes = load_state_dict_strict(model, sd, what=w, arch=text)
            src = Source(model, text, "name", weights=w, notes=picked + notes)
        else:
            if ":" in text:
                raise UsageError(f"--weights {w!r}: {text} has no pretrained weights bnfuse can load; it takes "
                                 "--weights default or none (its own initialisation) or a local state_dict file")
            src = Source(build(text, weights=w, seed=seed), text, "name", weights=w)
    else:
        raise CheckpointError(f"{path}: no such file")
    if src.kind != "program":  # an exported program is already in the mode it was exported in
        src.model.eval()
    return src


def _reproducible(arch: str, seed: int, model: "nn.Module") -> list[str]:
    """A note when a factory's random initialisation is not the same from the same seed (it draws from
    a random source bnfuse does not seed): then nothing can rebuild the original.  torchvision and timm
    draw from torch's generator, which :func:`build` seeds."""
    import torch

    if not own_init_only(arch) or arch.startswith("timm:"):
        return []
    again = build(arch, seed=seed).state_dict()
    if all(k in again and torch.equal(v, again[k]) for k, v in model.state_dict().items()):
        return []
    return [f"{arch} builds different weights from the same seed (it draws from a random source that bnfuse does "
            "not seed): the original cannot be rebuilt to verify the output; save its state_dict and convert that "
            "file instead"]


def load(path: "str | os.PathLike[str]", *, allow_pickle: bool = False, arch: "str | None" = None,
         key: "str | None" = None) -> "nn.Module":
    """Rebuild a ready, fused ``nn.Module`` (eval mode) from a file written by ``bnfuse convert``.

    A state_dict output (.pth or .safetensors) is loaded strictly into its architecture given the
    fused structure recorded in its metadata; a pickled-module output needs ``allow_pickle=True``.
    An exported program comes back as a module that runs it: a ``.pt2`` as its program's module (the
    archive checked first: nothing in it runs, and no member is inflated beyond what it should hold,
    unless ``allow_pickle``), an ``.onnx`` file run by onnxruntime (the ``onnx`` extra).
    """
    return load_source(path, arch=arch, allow_pickle=allow_pickle, key=key, programs=True).model

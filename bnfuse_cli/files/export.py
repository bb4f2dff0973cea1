"""Fused models as programs that run without bnfuse or the model's code: ``torch.export`` (``.pt2``), and
what the ONNX writer (:mod:`.onnxfile`) shares with it: the example made batch 2, the dynamic dimensions,
the exporter's quiet, and the bit-for-bit comparison of what was written with what was meant.

The model is exported with ``torch.export.export`` on the check input (made batch 2: an example of
batch 1 would fix the batch size), the batch and spatial dimensions marked ``Dim.AUTO`` so that
each stays dynamic where the model allows it; which ones did is read back from the exported
graph and said.  bnfuse's record travels inside the archive (``extra_files``), and the file loads
with ``torch.export.load(path).module()`` in a process that has neither bnfuse nor the model's code.
bnfuse itself reads a ``.pt2`` only through :mod:`.pt2archive`, which checks the archive before torch
sees it and hands torch the same open file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import OutputError, UsageError
from .formats import META_KEY, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["ExportError", "ExtraMissing", "export_program", "load_program", "program_bytes", "dynamic_dims",
           "check_program", "pt2_bytes", "open_pt2", "program_weights", "same_bits"]

#: the archive entry bnfuse's record is stored under
META_FILE = f"{META_KEY}.json"


class ExportError(OutputError):
    """The model cannot be exported (data-dependent control flow, an unsupported op)."""


class ExtraMissing(UsageError):
    """A format needs an optional extra that is not installed."""


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """The exporter's log lines (and the partial graphs it prints to stderr on failure) only with
    ``verbose``, and then each once: torch prints a failed graph twice, so everything is gathered and a
    repeat of what was just printed is dropped (:func:`once`)."""
    if not verbose:
        logger = logging.getLogger("torch")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            logger.setLevel(level)
        return
    import sys

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):  # torch's log handlers write to whatever sys.stderr is
            yield
    finally:
        sys.stderr.write(once(buffer.getvalue()))


def once(text: str) -> str:
    """``text`` with every run of three or more lines that repeats the run just before it dropped (blank
    lines aside): what torch printed twice, printed once."""
    lines = text.split("\n")
    content = [i for i, line in enumerate(lines) if line.strip()]
    drop: set[int] = set()
    j = 0
    while j < len(content):
        run = next((k for k in range(min(j, len(content) - j), 2, -1)
                    if all(lines[content[j + t]] == lines[content[j - k + t]] for t in range(k))), 0)
        if run:
            drop.update(range(content[j], content[j + run - 1] + 1))
        j += run or 1
    return "\n".join(line for i, line in enumerate(lines) if i not in drop)


def user_line(exc: BaseException) -> "str | None":
    """Where the model's own code was when the exporter gave up: the innermost frame of ``exc`` (or of
    what caused it) outside torch, bnfuse and the standard library, as ``file:line: code``."""
    import os
    import sysconfig
    import traceback

    import torch

    skip = tuple(os.path.dirname(p) + os.sep for p in (torch.__file__, __file__.rsplit(os.sep, 2)[0] + os.sep))
    stdlib = sysconfig.get_paths()["stdlib"] + os.sep
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(("<", stdlib))
                  and not f.filename.startswith(skip) and "/torch/" not in f.filename]
        if frames:
            f = frames[-1]
            where = os.path.relpath(f.filename) if not os.path.relpath(f.filename).startswith("..") else f.filename
            return f"{where}:{f.lineno}" + (f": {f.line.strip()}" if f.line else "")
        exc = exc.__cause__ or exc.__context__
    return None


def export_failure(exc: BaseException, what: str, instead: str) -> "ExportError":
    """The refusal for an export that failed: the model's line that stopped it, and the exporter's reason."""
    import re

    cause = exc.__cause__ or exc
    reason = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).split("\n\n")[0].split())
    line = user_line(exc)
    data = "DataDependent" in type(cause).__name__ or "data-dependent" in reason
    at = (f"{line} depends on the values of a tensor, which {what} cannot follow" if data and line else
          f"it fails at {line}" if line else "")
    return ExportError(
        f"the fused model cannot be exported with {what}{': ' + at if at else ''} ({type(cause).__name__}: "
        f"{reason[:400]}); nothing was written. A model with data-dependent control flow cannot become "
        f"{instead}: write .pth or .safetensors instead (-v shows the exporter's graph)"
    )


def _batch_of_two(args: tuple[Any, ...]) -> "tuple[tuple[Any, ...], bool]":
    """``args`` with every tensor's first dimension made 2 (repeating the first sample), and whether
    that was possible (all tensors batched alike); an example of batch 1 would make the batch static."""
    import torch
    from torch.utils._pytree import tree_leaves, tree_map_only

    tensors = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
    if not tensors or any(t.dim() == 0 for t in tensors) or len({t.shape[0] for t in tensors}) != 1 \
            or not all(isinstance(a, torch.Tensor) for a in args):
        return args, False
    return tree_map_only(torch.Tensor, lambda t: t[:1].expand(2, *t.shape[1:]).contiguous(), args), True


def _auto_dims(example: tuple[Any, ...]) -> tuple[dict[int, Any], ...]:
    """Batch and spatial dimensions as ``Dim.AUTO`` (each stays dynamic where the model allows it);
    the channel (feature) dimension 1 static, as the weights fix it."""
    from torch.export import Dim

    return tuple({d: Dim.AUTO for d in range(a.dim()) if d != 1} for a in example)


def export_program(model: "nn.Module", args: tuple[Any, ...], *, verbose: bool = False
                   ) -> "tuple[torch.export.ExportedProgram, list[str]]":
    """``model`` exported with ``torch.export`` on ``args``: (the program, notes on its dynamic dimensions).
    An :class:`ExportError` with the exporter's reason, in one paragraph, when it cannot be exported."""
    import torch
    example, batched = _batch_of_two(args)
    shapes = None
    if batched:
        shapes = _auto_dims(example)
    try:
        with quiet(verbose), torch.no_grad():
            ep = torch.export.export(model, example, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # the exporter raises many types (UserError, GuardOnDataDependentSymNode, ...)
        raise export_failure(exc, "torch.export", "a .pt2 program") from exc
    return ep, dynamic_dims(ep, example)


def dynamic_dims(ep: "torch.export.ExportedProgram", example: tuple[Any, ...]) -> list[str]:
    """Which input dimensions stayed dynamic in ``ep``, in words (e.g. ``input 0: batch, 2, 3 dynamic``)."""
    import torch

    notes = []
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"
                    and n.name in set(ep.graph_signature.user_inputs)]
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        dyn = [d for d, size in enumerate(val.shape) if not isinstance(size, int)
               and not torch.fx.experimental.symbolic_shapes.is_concrete_int(size)]
        static = [d for d in range(val.dim()) if d not in dyn]
        # the ones exported as Dim.AUTO (every one but the channel dimension 1) that the model made static
        fixed = [d for d in static if d != 1]
        words = ["batch" if d == 0 else str(d) for d in dyn]
        notes.append(f"input {i} {'x'.join(str(int(s)) if d in static else '?' for d, s in enumerate(val.shape))}: "
                     + (f"dynamic {', '.join(words)}" if dyn else "every dimension static")
                     + ("" if not dyn or not fixed else
                        f"; the model fixes dimension(s) {', '.join('0 (batch)' if d == 0 else str(d) for d in fixed)}"))
    return notes


def pt2_bytes(model: "nn.Module", args: tuple[Any, ...], metadata: dict[str, Any], *, verbose: bool = False
              ) -> "tuple[bytes, list[str]]":
    """``model`` as a ``.pt2`` file's bytes with bnfuse's record inside, and notes on its dynamic dimensions."""
    ep, dims = export_program(model, args, verbose=verbose)
    return program_bytes(ep, metadata), dims


def program_bytes(ep: "torch.export.ExportedProgram", metadata: dict[str, Any]) -> bytes:
    """The ``.pt2`` archive of ``ep`` with bnfuse's record inside."""
    import torch

    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files={META_FILE: json.dumps(metadata)})
    return buf.getvalue()


def load_program(path: Path, *, allow_pickle: bool = False) -> "tuple[torch.export.ExportedProgram, dict[str, Any]]":
    """A ``.pt2`` file: (the program, bnfuse's record, {} when absent).  The archive is opened once and
    checked before torch reads it (:func:`~.pt2archive.checked_pt2`): nothing in it runs unless
    ``allow_pickle``, and no member is inflated beyond what it should hold."""
    import torch

    from .pt2archive import checked_pt2

    extra = {META_FILE: ""}
    with checked_pt2(path, allow_pickle=allow_pickle) as fh, quiet():
        ep = torch.export.load(fh, extra_files=extra)
    raw = extra[META_FILE]
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise OutputError(f"{path}: its bnfuse record is not valid JSON ({first_line(str(exc))})") from exc
    return ep, meta if isinstance(meta, dict) else {}


def check_program(tmp: Path, expected: "dict[str, torch.Tensor]", metadata: dict[str, Any]
                  ) -> "tuple[list[str], list[str], list[str], bool]":
    """The read-back proof of a ``.pt2`` file: loaded with ``torch.export.load``, its weights (by name)
    against the fused model's, value for value, and its record against the one written."""
    from .readback import meta_equal

    ep, meta = load_program(tmp)
    got = ep.state_dict
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    return missing, extra, _differing(expected, got), meta_equal(meta, metadata)


def _differing(expected: "dict[str, torch.Tensor]", got: "dict[str, torch.Tensor]") -> list[str]:
    """The names in both whose tensors differ in dtype, shape or any bit (-0.0 is not 0.0, a NaN is itself)."""
    return [k for k, e in expected.items() if k in got and not same_bits(got[k], e)]


def same_bits(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    """Whether ``a`` and ``b`` have the same dtype, shape and bytes (row-major), wherever they live."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False

    def raw(t: "torch.Tensor") -> "torch.Tensor":
        t = t.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        return t.view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)

    return torch.equal(raw(a), raw(b))


def open_pt2(path: Path, device: str = "cpu", *, allow_pickle: bool = False) -> "tuple[nn.Module, dict[str, Any]]":
    """A ``.pt2`` file as its program's module, and bnfuse's record in it (checked as :func:`load_program` says)."""
    ep, meta = load_program(path, allow_pickle=allow_pickle)
    return ep.module(), meta


def program_weights(module: "nn.Module") -> "dict[str, torch.Tensor]":
    """An opened program's weights by the fused model's names (an ONNX program keeps them with ``/``)."""
    return {k.replace("/", "."): v for k, v in module.state_dict().items()}

"""The one table of file formats: for each, its suffixes, how a file of it is checked before anything
is parsed, how it is read without running code, where bnfuse's record lives in it, and how it is
written and proved on disk; what it needs, which extra.

Every reader and writer goes through a row: :func:`read_checkpoint` and :func:`read_object` check and
read any readable row, :func:`bnfuse_cli.files.write.write_checkpoint` writes any writable row through
the same temporary file, read-back and placement, and the CLI's help and suffix checks are made from
the rows.  Adding a format is one row here (and its reader, writer and proof functions).  A *program*
format is exported from the fused module on the example input and runs without bnfuse or the model's
code; it is read only as a fused model, opened in its own runtime (verify's FUSED, ``bnfuse_cli.load``).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import CheckpointError, OutputError
from . import export, integrity, onnxfile, read, readback
from .formats import META_KEY, byte_view, st_dtype

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Payload", "Format", "FORMATS", "format_of", "output_format", "suffixes_text", "read_checkpoint",
           "read_object", "check_file"]


@dataclass
class Payload:
    """What goes into a file: the fused state_dict and bnfuse's record, and, by format, the module
    itself (a pickled-module .pth) or the exported program: its bytes (.pt2, .onnx), or, for a model
    written as several files (.onnx with external data), an object whose ``save(folder, name)`` writes
    ``folder/name`` and returns the names of the files it wrote beside it."""

    state_dict: "dict[str, torch.Tensor]"
    metadata: dict[str, Any]
    module: "nn.Module | None" = None
    program: "bytes | Any | None" = None

    @property
    def files(self) -> bool:
        """Whether the program writes itself as files (a model and the data beside it), not bytes."""
        return self.program is not None and not isinstance(self.program, (bytes, bytearray, memoryview))

    @property
    def form(self) -> str:
        return "module" if self.module is not None else ("program" if self.program is not None else "state_dict")


#: (file, payload, final path) -> None: write the payload to an open binary file
Writer = Callable[[Any, Payload, Path], None]
#: (written temporary file, payload) -> (missing keys, unexpected keys, differing keys, metadata equal)
Proof = Callable[[Path, Payload], "tuple[list[str], list[str], list[str], bool]"]
#: (fused module, example args, metadata, verbose=...) -> (the file's bytes, or an object that saves itself as
#: files (:class:`Payload`), and notes on its dynamic dimensions)
Exporter = Callable[[Any, "tuple[Any, ...]", "dict[str, Any]", bool], "tuple[Any, list[str]]"]
#: (path, device, allow_pickle=...) -> (the program as a module that runs it in its own runtime, bnfuse's record)
Opener = Callable[..., "tuple[Any, dict[str, Any]]"]
#: (path, what) -> None: a damaged file refused before anything is parsed from it
Check = Callable[[Path, str], None]
#: (path, allow_pickle, key) -> the Checkpoint it holds, read without running code
Reader = Callable[[Path, bool, "str | None"], Any]
#: (path, allow_pickle) -> the raw object it stores (``--data`` files)
ObjectReader = Callable[[Path, bool], Any]


@dataclass(frozen=True)
class Format:
    """One file format bnfuse reads, writes, or both."""

    name: str
    #: every suffix read as this format
    suffixes: tuple[str, ...]
    #: what a file of it is, for messages ("PyTorch files", "an ONNX model")
    what: str
    #: where bnfuse's record of a conversion lives in it
    record: str
    #: a damaged file refused before anything is parsed from it (None: its opener checks it)
    check: "Check | None" = None
    #: reads a checkpoint of it without running code (None: not read as a checkpoint)
    read: "Reader | None" = None
    #: reads the raw object it stores, for files that are not models (``--data``)
    read_object: "ObjectReader | None" = None
    #: the suffixes it is written under (empty: read only)
    written: tuple[str, ...] = ()
    write: "Writer | None" = None
    #: the read-back proof of what is on disk (structure and bytes; a program is also judged by the workflow)
    prove: "Proof | None" = None
    #: can hold a whole pickled module (``--save-as module``)
    holds_module: bool = False
    #: an exported program (needs the module and the example input, runs without bnfuse): how it is
    #: exported, and how it is opened and run in its own runtime
    export: "Exporter | None" = None
    open: "Opener | None" = None
    #: the runtime a program runs in, for messages and reports
    runtime: str = "bnfuse_cli.load"
    #: checks that what the format needs is installed (an ``ExtraMissing`` naming the install command)
    require: "Callable[[], None] | None" = None
    #: the files bnfuse wrote beside an existing output of this format (an .onnx file's external data),
    #: which replacing that output replaces too
    companions: "Callable[[Path], list[Path]] | None" = None

    @property
    def program(self) -> bool:
        return self.export is not None


def _write_torch(out: Any, p: Payload, final: Path) -> None:
    import torch

    torch.save(p.module if p.module is not None else {META_KEY: p.metadata, "state_dict": p.state_dict}, out)


def _write_safetensors(out: Any, p: Payload, final: Path) -> None:
    """The .safetensors format, streamed one tensor at a time (safetensors' own writer goes through a named
    temporary file of its own, mode 0600, which neither an anonymous file nor the umask allow)."""
    sd = p.state_dict
    names = sorted(sd, key=lambda k: -sd[k].element_size())  # widest first: every offset aligned
    header: dict[str, Any] = {"__metadata__": {META_KEY: json.dumps(p.metadata)}}
    offset = 0
    for k in names:
        t = sd[k]
        dtype = st_dtype(t.dtype)
        if dtype is None:
            raise OutputError(f"cannot write {final}: tensor {k!r} has dtype {t.dtype}, which .safetensors cannot "
                              "store; write a .pth instead")
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    out.write(struct.pack("<Q", len(raw)) + raw)
    for k in names:
        out.write(byte_view(sd[k]))


def _write_program(out: Any, p: Payload, final: Path) -> None:
    if p.program is None:  # pragma: no cover - the workflow exports before writing
        raise OutputError(f"{final}: nothing was exported to write")
    out.write(p.program)


FORMATS: tuple[Format, ...] = (
    Format("pth", (".pth", ".pt", ".bin", ".ckpt", ".tar"), "PyTorch files",
           "the 'bnfuse' key of the saved dict (a pickled module: none)", check=integrity.check_torch_file,
           read=read.read_torch, read_object=read.torch_object, written=(".pth", ".pt"), write=_write_torch,
           prove=lambda tmp, p: readback.check_torch_file(tmp, p.state_dict, p.metadata, p.form), holds_module=True),
    Format("safetensors", (".safetensors",), ".safetensors files", "__metadata__['bnfuse'], a JSON string",
           check=integrity.check_safetensors, read=read.read_safetensors, read_object=read.safetensors_object,
           written=(".safetensors",), write=_write_safetensors,
           prove=lambda tmp, p: readback.check_safetensors(tmp, p.state_dict, p.metadata)),
    Format("pt2", (".pt2",), "a torch.export program", "the archive's extra file bnfuse.json", written=(".pt2",),
           write=_write_program, prove=lambda tmp, p: export.check_program(tmp, p.state_dict, p.metadata),
           export=export.pt2_bytes, open=export.open_pt2, runtime="torch.export"),
    Format("onnx", (".onnx",), "an ONNX model", "metadata_props['bnfuse'], a JSON string", written=(".onnx",),
           write=_write_program, prove=lambda tmp, p: onnxfile.check_onnx(tmp, p.state_dict, p.metadata),
           export=onnxfile.export_onnx, open=onnxfile.open_onnx, runtime="onnxruntime",
           require=onnxfile.require_onnx, companions=onnxfile.data_files),
)


def _join(items: "list[str]") -> str:
    return ", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else "".join(items)


def suffixes_text(read: bool = False) -> str:
    """``.pth, .pt, .safetensors, .pt2 or .onnx``: the suffixes bnfuse writes (``read``: reads as a
    checkpoint), for help and messages."""
    return _join([s for f in FORMATS for s in (f.suffixes if read and f.read else () if read else f.written)])


def format_of(path: "str | Path") -> "Format | None":
    """The format a path's suffix names, or None."""
    suffix = Path(path).suffix.lower()
    return next((f for f in FORMATS if suffix in f.suffixes), None)


def output_format(path: "str | Path") -> Format:
    """The format of an output path, by its suffix; an :class:`OutputError` naming the suffixes known."""
    suffix = Path(path).suffix.lower()
    for f in FORMATS:
        if suffix in f.written:
            return f
    raise OutputError(f"{path}: unknown output suffix {Path(path).suffix or '(none)'!r}; use {suffixes_text()}")


def check_file(path: Path, what: str = "checkpoint", formats: "tuple[Format, ...] | None" = None) -> Format:
    """``path`` exists, has the suffix of one of ``formats`` (those read as checkpoints by default), is not
    empty and is not text (a :class:`CheckpointError` naming the file and the formats bnfuse reads
    otherwise); its format."""
    accepted = formats if formats is not None else tuple(f for f in FORMATS if f.read)
    integrity.check_file(path, what=what, suffixes=tuple(s for f in accepted for s in f.suffixes),
                         reads=" and ".join(f"{f.what} ({', '.join(f.suffixes)})" for f in accepted),
                         elsewhere={s: f.what for f in FORMATS if f not in accepted and f.open for s in f.suffixes})
    fmt = format_of(path)
    if fmt is None:  # pragma: no cover - integrity.check_file refused it
        raise CheckpointError(f"{path}: unknown suffix")
    return fmt


def read_checkpoint(path: "str | os.PathLike[str]", *, allow_pickle: bool = False,
                    key: "str | None" = None) -> Any:
    """Read the checkpoint at ``path`` in any readable format of the table, without executing code.

    The file is checked first (:attr:`Format.check`: the zip CRC-32 of every record, a consistent
    .safetensors header): a damaged file is a :class:`CheckpointError` naming the record.  Then its row
    reads it (:func:`bnfuse_cli.files.read.read_torch`, :func:`~bnfuse_cli.files.read.read_safetensors`):
    nested training checkpoints, ``module.`` prefixes and ``torch.compile`` wrappers are unwrapped, and
    bnfuse's own record (from a previous ``convert``) is returned in ``metadata``.  ``key`` is the dotted key
    path of the weights inside a training checkpoint (``"model_state"``, ``"ema.model"``)."""
    path = Path(path)
    fmt = check_file(path)
    fmt.check(path, "checkpoint")
    return fmt.read(path, allow_pickle, key)


def read_object(path: "str | os.PathLike[str]", *, allow_pickle: bool = False, what: str = "data") -> Any:
    """The raw object stored in a readable file (tensors, dicts, lists, tuples), for files that are not
    models, such as ``bnfuse verify --data``: the same checks and safety as :func:`read_checkpoint`, no
    unwrapping."""
    path = Path(path)
    fmt = check_file(path, what)
    fmt.check(path, what)
    return fmt.read_object(path, allow_pickle)

"""The one table of output formats: suffix -> writer, read-back proof, what it needs, which extra.

:func:`bnfuse_cli.files.write.write_checkpoint` writes any row through the same temporary file,
read-back and placement; adding a format is one row here (and its writer and proof functions).
A *program* format is exported from the fused module on the example input and runs without
bnfuse or the model's code; the workflow that writes it also judges it in its own runtime.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import OutputError
from . import export, onnxfile, readback
from .formats import META_KEY, byte_view, st_dtype

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Payload", "OutputFormat", "OUTPUT_FORMATS", "output_format", "suffixes_text"]


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


@dataclass(frozen=True)
class OutputFormat:
    """One output format."""

    name: str
    suffixes: tuple[str, ...]
    write: Writer
    #: the read-back proof of what is on disk (structure and bytes; a program is also judged by the workflow)
    prove: Proof
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


OUTPUT_FORMATS: tuple[OutputFormat, ...] = (
    OutputFormat("pth", (".pth", ".pt"), _write_torch,
                 lambda tmp, p: readback.check_torch_file(tmp, p.state_dict, p.metadata, p.form), holds_module=True),
    OutputFormat("safetensors", (".safetensors",), _write_safetensors,
                 lambda tmp, p: readback.check_safetensors(tmp, p.state_dict, p.metadata)),
    OutputFormat("pt2", (".pt2",), _write_program, lambda tmp, p: export.check_program(tmp, p.state_dict, p.metadata),
                 export=export.pt2_bytes, open=export.open_pt2, runtime="torch.export"),
    OutputFormat("onnx", (".onnx",), _write_program,
                 lambda tmp, p: onnxfile.check_onnx(tmp, p.state_dict, p.metadata), export=onnxfile.export_onnx,
                 open=onnxfile.open_onnx, runtime="onnxruntime", require=onnxfile.require_onnx,
                 companions=onnxfile.data_files),
)


def suffixes_text() -> str:
    """``.pth, .pt, .safetensors or .pt2``: the suffixes bnfuse writes, for messages."""
    all_ = [s for f in OUTPUT_FORMATS for s in f.suffixes]
    return ", ".join(all_[:-1]) + " or " + all_[-1]


def output_format(path: "str | Path") -> OutputFormat:
    """The format of an output path, by its suffix; an :class:`OutputError` naming the suffixes known."""
    suffix = Path(path).suffix.lower()
    for f in OUTPUT_FORMATS:
        if suffix in f.suffixes:
            return f
    raise OutputError(f"{path}: unknown output suffix {Path(path).suffix or '(none)'!r}; use {suffixes_text()}")

"""A ``.pt2`` archive checked before ``torch.export.load`` sees it, and handed to torch as the same open file.

``torch.export.load`` runs code from an archive in several places: it unpickles weights and constants
marked ``use_pickle``, custom and opaque objects, and the sample inputs and legacy weight files whenever
``torch.load(weights_only=True)`` cannot read them (it then falls back to a full unpickle); it loads
AOTInductor's compiled libraries; and the graph holds expressions, targets and guards that become Python
(:mod:`.pt2graph`).  It also reads every ``extra/`` member, the configs, the graph and each weight record
whole, so an archive that claims gigabytes from a few kilobytes (a zip bomb) would be inflated in memory.

:func:`checked_pt2` opens the file once and reads the archive's own directory, configs and graph with
``zipfile``: every member's size against what it should hold (nothing is decompressed before its size is
known to be in proportion), every record's CRC-32, and, unless code from the file is allowed, every part
torch would run.  The same open file then goes to torch, so the archive checked is the archive loaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from ..errors import CheckpointError, UnsafeCheckpointError
from .formats import first_line, looks_zipped
from .integrity import check_zip_records
from .pt2graph import unsafe_graph_parts
from .unpickle import _unsafe_detail

__all__ = ["checked_pt2", "EXTRA_LIMIT", "META_LIMIT", "JSON_LIMIT", "PICKLE_LIMIT", "MAX_EXPANSION"]

#: the largest ``extra/`` member other than bnfuse's record (torch reads each one whole, as text)
EXTRA_LIMIT = 1 << 20
#: all of them together
EXTRA_TOTAL = 8 << 20
#: the largest bnfuse record (``extra/bnfuse.json``)
META_LIMIT = 64 << 20
#: the largest JSON member torch parses (the graph, the weight and constant configs)
JSON_LIMIT = 256 << 20
#: the largest pickled member (sample inputs, a legacy weight file, a pickled weight), nested records included
PICKLE_LIMIT = 1 << 30
#: a compressed member may hold at most this many times its size on disk (torch stores members uncompressed)
MAX_EXPANSION = 100
_SLACK = 1 << 20


@contextlib.contextmanager
def checked_pt2(path: Path, *, allow_pickle: bool = False, what: str = "torch.export program"
                ) -> Iterator[BinaryIO]:
    """``path`` opened once and checked (sizes, CRC-32s, and, unless ``allow_pickle``, everything torch would
    run); yields the same open file at its start, for ``torch.export.load``.  A refusal names the member:
    :class:`UnsafeCheckpointError` for code, :class:`CheckpointError` for a damaged or disproportionate file."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - held open until torch has read it
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with fh:
        _check(fh, path, allow_pickle, what)
        fh.seek(0)
        yield fh


def _check(fh: BinaryIO, path: Path, allow_pickle: bool, what: str) -> None:
    with _open_zip(fh, path) as zf:
        members = _members(zf, path)
        _sizes_in_directory(members, path)
        archive = _Archive(zf, members, path)
        archive.check_records()
        check_zip_records(zf, path, what)
        if not allow_pickle:
            archive.check_code()


def _open_zip(fh: BinaryIO, path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(fh)
    except Exception as exc:  # noqa: BLE001 - BadZipFile, ValueError, struct.error, OSError...
        fh.seek(0)
        head = fh.read(4)
        if head == b"PK\x03\x04":
            why = ("it is truncated: it starts as a zip archive, as every .pt2 does, but its zip directory (the "
                   f"end of the file) is missing or damaged ({first_line(str(exc))})")
        else:
            why = f"it is not a zip archive, as every .pt2 is (it starts with {head!r})"
        raise CheckpointError(f"{path} cannot be read as a torch.export program: {why}. Nothing was loaded from "
                              "it; copy or download it again, or export it anew") from exc


def _members(zf: zipfile.ZipFile, path: Path) -> "dict[str, zipfile.ZipInfo]":
    """The members by their name inside the archive's one folder (as torch names them); duplicates refused."""
    infos = zf.infolist()
    names = [i.filename for i in infos]
    twice = next((n for n in names if names.count(n) > 1), None) if len(set(names)) != len(names) else None
    if twice is not None:
        raise CheckpointError(f"{path} has two members named {twice}: zip readers disagree on which one they read, "
                              "so bnfuse cannot check the one torch would load. torch.export.save never writes this")
    root = names[0].split("/", 1)[0] + "/" if names else ""
    outside = next((n for n in names if not n.startswith(root) or n == root), None)
    if not names or outside is not None:
        raise CheckpointError(f"{path} is not a torch.export archive: its members are not all in one folder"
                              + (f" ({outside!r} is not)" if outside else " (it is empty)"))
    return {i.filename[len(root):]: i for i in infos}


def _too_big(path: Path, member: str, size: int, why: str) -> CheckpointError:
    """``member``: ``member NAME``, or what several members are."""
    return CheckpointError(
        f"{path}: its {member} would take {size:,} bytes when read, {why}. bnfuse refused before "
        "decompressing it: an archive that claims far more than it holds is a zip bomb. Ask for the file "
        "again, or export it anew with torch.export.save")


def _sizes_in_directory(members: "dict[str, zipfile.ZipInfo]", path: Path) -> None:
    """Each member's size, as the zip directory declares it, against what that member may hold; then all of
    them together (many members each just under its limit)."""
    from torch.export.pt2_archive import constants as c

    for name, info in members.items():
        if info.file_size > MAX_EXPANSION * info.compress_size + _SLACK:
            raise _too_big(path, f"member {name}", info.file_size, f"from {info.compress_size:,} bytes on disk (more "
                           f"than {MAX_EXPANSION} times its stored size; torch.export.save stores members uncompressed)")
        if name.startswith(c.EXTRA_DIR):
            limit = META_LIMIT if name == f"{c.EXTRA_DIR}bnfuse.json" else EXTRA_LIMIT
            if info.file_size > limit:
                raise _too_big(path, f"member {name}", info.file_size, "as an extra file that torch.export.load reads "
                               f"whole (bnfuse allows {limit:,} bytes there)")
        elif name.endswith(".json") or name in (c.ARCHIVE_FORMAT_PATH, c.ARCHIVE_VERSION_PATH):
            if info.file_size > JSON_LIMIT:
                raise _too_big(path, f"member {name}", info.file_size, f"as a record torch parses whole (bnfuse allows "
                               f"{JSON_LIMIT:,} bytes)")
    extra = [i.file_size for n, i in members.items() if n.startswith(c.EXTRA_DIR) and n != f"{c.EXTRA_DIR}bnfuse.json"]
    if sum(extra) > EXTRA_TOTAL:
        raise _too_big(path, f"members under {c.EXTRA_DIR} ({len(extra):,})", sum(extra), "all together, as extra "
                       f"files that torch.export.load reads whole (bnfuse allows {EXTRA_TOTAL:,} bytes of them)")
    stored = sum(i.compress_size for i in members.values())
    total = sum(i.file_size for i in members.values())
    if total > MAX_EXPANSION * stored + _SLACK:
        raise _too_big(path, f"members ({len(members):,})", total, f"all together, from {stored:,} bytes on disk "
                       f"(more than {MAX_EXPANSION} times their stored size)")


class _Archive:
    """The archive's configs and graphs, read through ``zipfile`` (their sizes already checked)."""

    def __init__(self, zf: zipfile.ZipFile, members: "dict[str, zipfile.ZipInfo]", path: Path) -> None:
        from torch.export.pt2_archive import constants as c

        self.zf, self.members, self.path, self.c = zf, members, path, c
        fmt = self._text(c.ARCHIVE_FORMAT_PATH) if c.ARCHIVE_FORMAT_PATH in members else None
        if fmt != c.ARCHIVE_FORMAT_VALUE:
            raise CheckpointError(f"{path} is not a torch.export archive this torch reads: it has no "
                                  f"{c.ARCHIVE_FORMAT_PATH} record saying {c.ARCHIVE_FORMAT_VALUE!r} (an archive of "
                                  "another kind, or of a torch before 2.6); export it anew")
        self.models = sorted(n[len(c.MODELS_DIR):-len(".json")] for n in members
                             if n.startswith(c.MODELS_DIR) and n.endswith(".json"))
        stray = next((n for n in members if n.startswith(c.MODELS_DIR) and not n.endswith(".json")), None)
        if stray is not None or not self.models:
            raise CheckpointError(f"{path} is not a torch.export archive: "
                                  + (f"its member {stray} is not a program" if stray else "it holds no program"))

    def _bytes(self, name: str) -> bytes:
        try:
            return self.zf.read(self.members[name])
        except Exception as exc:  # noqa: BLE001 - BadZipFile (CRC), zlib.error, EOFError...
            raise CheckpointError(f"{self.path} is corrupt: its member {name} cannot be read "
                                  f"({first_line(str(exc))}); copy or download it again") from exc

    def _text(self, name: str) -> str:
        return self._bytes(name).decode("utf-8", "replace").strip()

    def _json(self, name: str) -> Any:
        try:
            return json.loads(self._bytes(name))
        except ValueError as exc:
            raise CheckpointError(f"{self.path} is corrupt: its member {name} is not valid JSON "
                                  f"({first_line(str(exc))})") from exc

    def configs(self) -> "Iterator[tuple[str, str, dict[str, Any]]]":
        """(config member, the folder its records are in, its entries) of every model's weights and constants."""
        c = self.c
        for model in self.models:
            for fmt, folder in ((c.WEIGHTS_CONFIG_FILENAME_FORMAT, c.WEIGHTS_DIR),
                                (c.CONSTANTS_CONFIG_FILENAME_FORMAT, c.CONSTANTS_DIR)):
                name = fmt.format(model)
                if name in self.members:
                    raw = self._json(name)
                    entries = raw.get("config") if isinstance(raw, dict) else None
                    if not isinstance(entries, dict):
                        raise CheckpointError(f"{self.path} is corrupt: its member {name} holds no config")
                    yield name, folder, entries

    def check_records(self) -> None:
        """Every tensor record at most the bytes its config entries declare, and present."""
        spans: dict[str, int] = {}
        for name, folder, entries in self.configs():
            for fqn, entry in entries.items():
                if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
                    raise CheckpointError(f"{self.path} is corrupt: {name} has no record name for {fqn!r}")
                record = posixpath.join(folder, entry["path_name"])
                raw = folder == self.c.WEIGHTS_DIR or entry["path_name"].startswith(
                    self.c.TENSOR_CONSTANT_FILENAME_PREFIX)
                if entry.get("use_pickle") or not raw:  # a pickled tensor, a custom or opaque object
                    self._pickled_size(record)
                if entry.get("use_pickle"):
                    continue
                # torch reads every other entry as raw bytes, whatever its name (an empty record: zeros of
                # the size its config declares)
                if record not in self.members:
                    raise CheckpointError(f"{self.path} is corrupt: {name} keeps {fqn!r} in {record}, which the "
                                          "archive does not have")
                spans[record] = max(spans.get(record, 0), _span(entry.get("tensor_meta"), self.path, name, fqn))
        for record, span in spans.items():
            size = self.members[record].file_size
            if size > span or (size == 0 and span > 0):
                why = (f"but its config declares {span:,} bytes of weights in it" if size else
                       f"from an empty record, as zeros of the {span:,} bytes its config declares")
                raise _too_big(self.path, f"member {record}", max(size, span), why)
        for model in self.models:  # members torch unpickles with the weights_only fallback
            for record in self._fallback_pickles(model):
                self._pickled_size(record)

    def _fallback_pickles(self, model: str) -> list[str]:
        """The members torch reads with ``torch.load(weights_only=True)`` and, when that fails, in full."""
        c = self.c
        names = [c.SAMPLE_INPUTS_FILENAME_FORMAT.format(model), f"{c.WEIGHTS_DIR}{model}.pt",
                 f"{c.CONSTANTS_DIR}{model}.pt"]
        return [n for n in names if n in self.members]

    def _pickled_size(self, record: str) -> None:
        info = self.members.get(record)
        if info is not None and info.file_size > PICKLE_LIMIT:
            raise _too_big(self.path, f"member {record}", info.file_size, "as a pickle torch reads whole (bnfuse "
                           f"allows {PICKLE_LIMIT:,} bytes)")

    def check_code(self) -> None:
        """Refuse every member torch would run, naming it (:class:`UnsafeCheckpointError`)."""
        c = self.c
        compiled = next((n for n in self.members if n.startswith(c.AOTINDUCTOR_DIR)), None)
        if compiled is not None:
            raise self._unsafe(compiled, "is AOTInductor compiled code, a shared library torch.export.load would "
                                         "load and run")
        for name, folder, entries in self.configs():
            for fqn, entry in entries.items():
                record = posixpath.join(folder, entry["path_name"])
                kind = entry["path_name"]
                if kind.startswith(c.CUSTOM_OBJ_FILENAME_PREFIX):
                    raise self._unsafe(record, f"is the custom object {fqn!r}, which torch.export.load unpickles "
                                               "in full (TorchScript's pickler)")
                if kind.startswith(c.OPAQUE_OBJ_FILENAME_PREFIX):
                    raise self._unsafe(record, f"is the opaque object {fqn!r}, which torch.export.load unpickles "
                                               "with pickle.loads")
                if entry.get("use_pickle"):
                    raise self._unsafe(record, f"is {fqn!r} stored as a pickle (use_pickle in {name}), which "
                                               "torch.export.load unpickles in full")
        for model in self.models:
            for record in self._fallback_pickles(model):
                why = _weights_only_refusal(self._bytes(record))
                if why:
                    raise self._unsafe(record, f"is a pickle that torch.load(weights_only=True) cannot read ({why}), "
                                               "so torch.export.load would unpickle it in full")
            graph = c.MODELS_FILENAME_FORMAT.format(model)
            for why in unsafe_graph_parts(self._json(graph), _resolves_to_operator):
                raise self._unsafe(graph, why)

    def _unsafe(self, member: str, why: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{self.path} holds code that loading or running it would execute: its member {member} {why}. bnfuse "
            "refused before torch.export.load saw the file, and nothing in it was executed. If you trust where it "
            "came from, pass --allow-pickle (allow_pickle=True in Python)")


def _span(meta: Any, path: Path, config: str, fqn: str) -> int:
    """The bytes a raw tensor entry addresses in its record: (offset + the last element it reaches + 1) x size."""
    from torch._export.serde.serialize import deserialize_scalar_type

    try:
        sizes = [int(s["as_int"]) for s in meta["sizes"]]
        strides = [int(s["as_int"]) for s in meta["strides"]]
        offset = int(meta["storage_offset"]["as_int"])
        element = deserialize_scalar_type(meta["dtype"]).itemsize
        if len(sizes) != len(strides) or min([offset, *sizes, *strides]) < 0:
            raise ValueError("negative or mismatched sizes")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {config} describes {fqn!r} with sizes, strides or a dtype torch "
                              f"cannot use ({type(exc).__name__}: {exc})") from exc
    if 0 in sizes:
        return 0
    return (offset + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1) * element


def _weights_only_refusal(data: bytes) -> "str | None":
    """Why ``torch.load(weights_only=True)`` refuses ``data`` (None when it reads it), its nested records'
    sizes checked first."""
    import pickle
    import warnings

    import torch

    buf = io.BytesIO(data)
    if looks_zipped(buf):
        try:
            with zipfile.ZipFile(buf) as inner:
                claimed = sum(i.file_size for i in inner.infolist())
        except Exception as exc:  # noqa: BLE001 - a damaged directory raises BadZipFile, ValueError, struct.error...
            return f"it is a damaged zip archive ({first_line(str(exc))})"
        if claimed > max(PICKLE_LIMIT, MAX_EXPANSION * len(data)):
            return f"its records claim {claimed:,} bytes"
    buf.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(buf, weights_only=True)
    except pickle.UnpicklingError as exc:
        return f"it needs {_unsafe_detail(str(exc))}"
    except Exception as exc:  # noqa: BLE001 - torch falls back to a full unpickle on any failure
        return f"{type(exc).__name__}: {first_line(str(exc))}"
    return None


def _resolves_to_operator(name: str) -> bool:
    """Whether a ``torch.ops`` name is an operator (or names nothing: torch then refuses the file itself)."""
    import torch

    obj: Any = torch
    for part in name.split(".")[1:]:
        try:
            obj = getattr(obj, part)
        except Exception:  # noqa: BLE001 - an unknown op namespace raises RuntimeError, AttributeError...
            return True
    ops = torch._ops
    return isinstance(obj, (ops.OpOverload, ops.OpOverloadPacket, ops.HigherOrderOperator))


"""Prove that a file just written holds what was meant: every key, dtype, shape and byte, and the metadata,
in one read buffer of memory (never a second copy of the model). ``safetensors.safe_open`` and ``zipfile``
read the file's structure; the bytes are streamed and compared, or CRC-32-checked, a chunk at a time.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputError
from .formats import CHUNK, META_KEY, ST_SIZES, byte_view, first_line, st_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["verify_written", "check_safetensors", "check_torch_file", "meta_equal"]

#: what a check found: missing keys, unexpected keys, keys with different contents, metadata equal
_Found = "tuple[list[str], list[str], list[str], bool]"


def verify_written(tmp: Path, fmt: Any, payload: Any, final: Path) -> None:
    """Check the file ``tmp`` against what was meant to be written (``payload``), by the read-back proof of
    its format's row (:mod:`.outputs`), without loading it into memory where the format allows.

    Every key present and no other, dtype and shape (and for .pth strides) equal, the metadata equal, and
    the contents: bit for bit for .safetensors (file bytes against the tensors, read in chunks), by CRC-32
    per storage for .pth (each zip record streamed through ``zipfile``, which checks it against the zip
    directory's CRC-32, and that CRC-32 compared with the storage's in memory), value for value for an
    exported program loaded back. An OutputError naming ``final`` if anything differs.
    """
    try:
        missing, extra, bad, meta_ok = fmt.prove(tmp, payload)
    except Exception as exc:  # anything unreadable in a file we just wrote is a failed write
        raise OutputError(
            f"writing {final} failed the read-back check: the file cannot be read back ({type(exc).__name__}: "
            f"{first_line(str(exc))}); the previous file, if any, is untouched"
        ) from exc
    meta_ok = meta_ok or payload.form == "module"
    if missing or extra or bad or not meta_ok:
        raise OutputError(
            f"writing {final} failed the read-back check (missing {missing[:5]}, unexpected {extra[:5]}, "
            f"different values or shapes {bad[:5]}{'' if meta_ok else ', different metadata'}); "
            "the previous file, if any, is untouched"
        )


def meta_equal(stored: Any, metadata: dict[str, Any]) -> bool:
    """Whether a record read back equals the one written (as JSON sees them)."""
    return json.loads(json.dumps(metadata, default=str)) == stored


def _file_matches(fh: Any, view: memoryview, buf: bytearray) -> bool:
    """Whether the next ``len(view)`` bytes of ``fh`` are ``view``, read a chunk at a time (no mmap)."""
    for pos in range(0, len(view), len(buf)):
        n = min(len(buf), len(view) - pos)
        chunk = buf if n == len(buf) else bytearray(n)  # bytearray == buffer is a memcmp; slices compare slowly
        if fh.readinto(chunk) != n or chunk != view[pos:pos + n]:
            return False
    return True


# --------------------------------------------------------------------------- .safetensors


def _safetensors_layout(path: Path) -> "tuple[dict[str, tuple[str, list[int], int, int]], dict[str, str]]":
    """({tensor: (dtype, shape, file offset, nbytes)}, ``__metadata__``) of a .safetensors file.

    ``safe_open`` parses and validates the header (its data spans cover the file to its end, in order,
    without holes or overlaps, each the size of its dtype and shape) and touches no tensor data; the
    offsets follow from ``offset_keys()`` (file order) and the sizes.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        st_meta = f.metadata() or {}
        order = [(k, f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.offset_keys()]
    sizes = []
    for name, dtype, shape in order:
        if dtype not in ST_SIZES:
            raise ValueError(f"tensor {name!r} has the dtype {dtype}, which bnfuse never writes")
        sizes.append(math.prod(shape) * ST_SIZES[dtype])
    offset = os.stat(path).st_size - sum(sizes)  # the data ends the file: where it starts
    layout = {}
    for (name, dtype, shape), nbytes in zip(order, sizes):
        layout[name] = (dtype, shape, offset, nbytes)
        offset += nbytes
    return layout, st_meta


def check_safetensors(tmp: Path, expected: dict[str, "torch.Tensor"], metadata: dict[str, Any]) -> _Found:
    """Read the structure with ``safe_open``, then compare every tensor's bytes with the file's, chunk by chunk."""
    layout, st_meta = _safetensors_layout(tmp)
    raw_meta = st_meta.get(META_KEY, "{}")
    meta_ok = meta_equal(json.loads(raw_meta), metadata)
    missing = [k for k in expected if k not in layout]
    extra = [k for k in layout if k not in expected]
    bad, todo = [], []
    for k, t in expected.items():
        if k not in layout:
            continue
        dtype, shape, start, nbytes = layout[k]
        if dtype != st_dtype(t.dtype) or shape != list(t.shape) or nbytes != t.numel() * t.element_size():
            bad.append(k)
        else:
            todo.append((start, k))
    buf = bytearray(CHUNK)
    with open(tmp, "rb") as fh:
        for start, k in sorted(todo):  # in file order: one sequential pass
            fh.seek(start)
            if not _file_matches(fh, byte_view(expected[k]), buf):
                bad.append(k)
    order = {k: i for i, k in enumerate(expected)}
    return missing, extra, sorted(bad, key=order.__getitem__), meta_ok


# --------------------------------------------------------------------------- torch zip archives


def _is_data(name: str) -> bool:
    """A tensor storage record (``ARCHIVE/data/N``) rather than the pickle or a format record."""
    parts = name.split("/")
    return len(parts) == 3 and parts[1] == "data"


def _zip_records(path: Path) -> "dict[str, tuple[int, int | None]]":
    """Every record of the zip archive: name -> (size, CRC-32 in the directory, or None when the bytes in
    the file fail it). Each record is streamed through ``zipfile`` a chunk at a time, which checks it."""
    records: dict[str, tuple[int, int | None]] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if (info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1
                    or info.compress_size != info.file_size):
                raise ValueError(f"the record {info.filename} is compressed or encrypted (torch.save never does)")
            try:
                with zf.open(info) as member:
                    while member.read(CHUNK):
                        pass
            except zipfile.BadZipFile as exc:
                if "CRC" not in str(exc):  # a damaged local header: nothing to compare
                    raise ValueError(f"the record {info.filename} is damaged ({first_line(str(exc))})") from exc
                records[info.filename] = (info.file_size, None)
            else:
                records[info.filename] = (info.file_size, info.CRC)
    return records


def _record_offsets(path: Path, names: "list[str]") -> "dict[str, int]":
    """Where each record's bytes start in the file, as torch's own zip reader (the one whose offsets an
    ``mmap=True`` load maps storages at) reports them; {} where this torch does not say."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(str(path))
        return {name: reader.get_record_offset(name.split("/", 1)[1]) for name in names}
    except (AttributeError, RuntimeError, TypeError):
        return {}


def _place(storages: "set[tuple[int, int]]", data: "dict[int, tuple[str, int, int | None]]") -> "dict[int, int]":
    """Where each storage of an ``mmap=True`` load lies in the file: data pointer -> data offset.

    Such storages are slices of one mapping of the whole file, so pointer = base + offset for one base;
    find the base that puts every storage on a record of its size. {} when none does (not mapped).
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


def _load_structure(tmp: Path, metadata: dict[str, Any], form: str) -> "tuple[dict[str, Any], bool]":
    """(the state_dict, metadata equal) of the written file, loaded with ``mmap=True``: the pickle is read,
    no tensor data is touched."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = torch.load(tmp, map_location="cpu", weights_only=form != "module", mmap=True)
    if form == "module":
        return obj.state_dict(), True
    if not isinstance(obj, dict) or set(obj) != {META_KEY, "state_dict"} or not isinstance(obj["state_dict"], dict):
        raise ValueError(f"the file holds {type(obj).__name__} {list(obj)[:4] if isinstance(obj, dict) else ''}, "
                         f"not {{{META_KEY!r}, 'state_dict'}}")
    return obj["state_dict"], meta_equal(obj[META_KEY], metadata)


def check_torch_file(tmp: Path, expected: dict[str, "torch.Tensor"], metadata: dict[str, Any], form: str) -> _Found:
    """Stream every zip record through ``zipfile`` (its CRC-32 checked), load the structure with ``mmap=True``,
    and compare each key's storage (by its CRC-32) with the record it was loaded from."""
    import torch

    records = _zip_records(tmp)
    damaged = [name for name, (_, crc) in records.items() if crc is None]
    for name in damaged:
        if not _is_data(name):  # the pickle or a format record: nothing to compare, the file is bad
            raise ValueError(f"the record {name} fails its CRC-32 check (damaged)")
    names = [name for name in records if _is_data(name)]
    data = {start: (name, *records[name]) for name, start in _record_offsets(tmp, names).items()}
    got, meta_ok = _load_structure(tmp, metadata, form)
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    loaded = {(g.untyped_storage().data_ptr(), g.untyped_storage().nbytes())
              for g in got.values() if isinstance(g, torch.Tensor)}
    # each key tied to its own record when the mmap load lets us see where its storage lies; otherwise
    # (another torch's loader) the storages are compared as a multiset of (size, CRC-32) below
    where = _place(loaded, data)
    nonempty = sorted(start for start, (_, size, _) in data.items() if size)
    one_to_one = len(data) == len(names) and sorted(where.values()) == nonempty
    if not one_to_one:
        where = {}
    in_file = Counter(records[name] for name in names if records[name][0])
    bad, of_key, want = _compare_keys(expected, got, data, where, in_file)
    if form == "module" or (not one_to_one and want != in_file):  # a module may hold more storages, never fewer
        short = want - in_file
        bad += [k for k, c in of_key.items() if c in short and k not in bad]
        if form != "module" and not bad:
            bad.append("(data stored that no key uses)")
    if not bad and damaged:
        raise ValueError(f"the data record {damaged[0]} fails its CRC-32 check against the zip directory (damaged)")
    return missing, extra, bad, meta_ok


def _compare_keys(
    expected: dict[str, "torch.Tensor"], got: dict[str, Any], data: "dict[int, tuple[str, int, int | None]]",
    where: "dict[int, int]", in_file: "Counter[tuple[int, int | None]]",
) -> "tuple[list[str], dict[str, tuple[int, int]], Counter[tuple[int, int]]]":
    """(keys whose loaded tensor differs, {key: (nbytes, CRC-32) of its storage in memory}, the multiset of
    the non-empty storages' (nbytes, CRC-32), each storage once): dtype, shape,
    strides, offset and storage size from the loaded structure; contents by CRC-32 against the key's own
    record when placed, else against any record of the file."""
    import torch

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
        ident = (str(storage.device), storage.data_ptr(), storage.nbytes())
        if ident not in crcs:
            crcs[ident] = _storage_crc(e)
        nbytes, crc = of_key[k] = crcs[ident]
        if g.untyped_storage().nbytes() != nbytes:
            bad.append(k)
        elif nbytes:
            start = where.get(g.untyped_storage().data_ptr())
            ok = data[start][1:] == (nbytes, crc) if start is not None else in_file[(nbytes, crc)] > 0
            if not ok:
                bad.append(k)
    return bad, of_key, Counter(c for c in crcs.values() if c[0])

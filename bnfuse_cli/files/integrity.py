"""Refuse a file that is not what its name says, or is damaged, before anything is parsed from it.

``zipfile`` streams every record of a torch zip archive (checking its CRC-32, which ``torch.load`` does not);
``safetensors.safe_open`` checks that a ``.safetensors`` header describes exactly the bytes in the file.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path

from ..errors import CheckpointError
from .formats import CHUNK, ST_SIZES, first_line, looks_zipped

__all__ = ["check_file", "check_torch_file", "check_safetensors", "check_zip_records"]

#: what other suffixes usually are, to say so when refusing them
_FOREIGN = {
    ".h5": "a Keras/HDF5 file", ".keras": "a Keras model",
    ".pb": "a TensorFlow graph", ".tflite": "a TensorFlow Lite model", ".npz": "a NumPy archive",
    ".npy": "a NumPy array", ".json": "a JSON file", ".txt": "a text file", ".yaml": "a YAML file",
    ".yml": "a YAML file", ".pkl": "a raw pickle", ".pickle": "a raw pickle", ".gguf": "a GGUF file",
    ".zip": "a zip archive",
}
def check_file(path: Path, *, what: str, suffixes: "tuple[str, ...]", reads: str,
               elsewhere: "dict[str, str] | None" = None) -> None:
    """A file that exists, has one of ``suffixes``, is not empty and is not text (CheckpointError if not).
    ``reads`` says which formats those are, ``elsewhere`` what the suffixes bnfuse reads only as a fused
    model are (the table of formats, :mod:`.table`, gives both)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a {what} file")
    suffix = path.suffix.lower()
    if suffix not in suffixes and suffix in (elsewhere or {}):
        raise CheckpointError(
            f"{path} is {elsewhere[suffix]}: bnfuse reads one only as the fused model (the FUSED "
            f"argument of verify, or bnfuse_cli.load), never as a {what} to convert, inspect, bench or verify "
            "against; give the original's checkpoint or model name"
        )
    if suffix not in suffixes:
        kind = _FOREIGN.get(suffix)
        raise CheckpointError(
            f"{path}: unknown {what} suffix {path.suffix or '(none)'!r}"
            + (f" (usually {kind}, which bnfuse does not read)" if kind else "")
            + f". bnfuse reads {reads} here; if this really is one of those, rename it with the right suffix"
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


def check_torch_file(path: Path, what: str = "checkpoint") -> None:
    """Refuse a damaged PyTorch file before anything is parsed from it: every record of a zip archive is
    streamed through ``zipfile`` a chunk at a time, which checks its CRC-32 (``torch.load`` does not: a
    flipped byte would load silently).  Legacy (non-zip) torch files carry no checksum to check."""
    if looks_zipped(path):
        _check_zip_records(path, what)


def _check_zip_records(path: Path, what: str) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:  # noqa: BLE001 - a damaged directory raises BadZipFile, ValueError, struct.error...
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch {what}: it is truncated or corrupt (its zip directory is "
            f"damaged: {first_line(str(exc))}); copy or download it again"
        ) from exc
    with zf:
        check_zip_records(zf, path, what)


def check_zip_records(zf: zipfile.ZipFile, path: Path, what: str = "checkpoint") -> None:
    """Stream every record of the open archive ``zf`` (of the file ``path``) through ``zipfile`` a chunk at a
    time, which checks its CRC-32; a damaged record is a :class:`CheckpointError` naming it."""
    for info in zf.infolist():
        try:
            with zf.open(info) as member:
                while member.read(CHUNK):
                    pass
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except Exception as exc:  # noqa: BLE001 - BadZipFile (CRC, header), EOFError, zlib.error, ...
            text = str(exc)
            why = ("fails its CRC-32 check: its bytes are not the ones that were written" if "CRC" in text
                   else f"is damaged ({first_line(text)})")
            raise CheckpointError(
                f"{path} is corrupt: its record {info.filename} {why}, so the file was damaged after it was "
                f"saved (storage or transfer). Nothing was loaded from it; copy or download it again"
            ) from exc


def check_safetensors(path: Path, what: str = "checkpoint") -> None:  # noqa: ARG001 - the table's signature
    """Refuse a damaged .safetensors file: ``safe_open`` validates the header against the file (no tensor
    data is read; the format has no checksum of the data itself); a refusal is explained."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001 - SafetensorError, and whatever a stranger header makes it raise
        raise CheckpointError(
            f"{path} is not a valid .safetensors file (truncated or corrupt): {_explain(path, str(exc))}. "
            "Nothing was loaded from it; copy or download it again"
        ) from exc


def _explain(path: Path, refusal: str) -> str:
    """What is wrong with a .safetensors file that ``safe_open`` refused, in the words of the format,
    naming the tensor and the byte counts where the header says them; safetensors' own words otherwise."""
    detail = first_line(refusal, "deserializing header:")
    found = _raw_header(path)
    if isinstance(found, str):
        return found
    size, n, header = found
    entries = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
    named = re.search(r"offset for tensor `(.+)`", detail)
    try:
        if named:  # safetensors names it
            return (f"the data of tensor {named.group(1)!r} does not start where the previous one ends "
                    "(a hole or an overlap)")
        if "shape, data type, or offset" in detail:  # safetensors does not say which tensor
            for k, v in entries.items():
                begin, stop = v["data_offsets"]
                need = math.prod(v["shape"]) * ST_SIZES.get(v["dtype"], 0)
                if v["dtype"] in ST_SIZES and need != stop - begin:
                    return (f"tensor {k!r} ({v['dtype']} {v['shape']}) needs {need} bytes, its header entry gives "
                            f"it {stop - begin}")
        if "not fully covered" in detail and entries:
            end, last = max((v["data_offsets"][1], k) for k, v in entries.items())
            why = f"the data of tensor {last!r} is cut short" if size < 8 + n + end else "bytes after the last tensor"
            return f"the file has {size} bytes, its header describes {8 + n + end} ({why})"
    except (KeyError, TypeError, IndexError):  # an entry safetensors' words describe better
        pass
    return detail


def _raw_header(path: Path) -> "tuple[int, int, object] | str":
    """(file size, header length, the header's JSON) of a .safetensors file, or what makes them unreadable."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"the file has {size} bytes, fewer than the 8 of the header length"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"the header length {n} is impossible (the file has {size} bytes)"
        try:
            return size, n, json.loads(fh.read(n))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
            return f"the header is not valid JSON ({type(exc).__name__}: {first_line(str(exc))})"

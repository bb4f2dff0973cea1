"""What bnfuse's files hold, shared by the writer and the read-back: the metadata key, the read chunk,
safetensors' dtype names and sizes, a tensor's bytes in file order, and one-line messages from exceptions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["META_KEY", "CHUNK", "ST_SIZES", "st_dtype", "byte_view", "first_line", "looks_zipped"]

#: the key bnfuse's metadata lives under (a .pth dict key, a .safetensors ``__metadata__`` entry)
META_KEY = "bnfuse"
#: bytes read from a file at a time while checking it: the whole memory cost of a check
CHUNK = 2 << 20
#: safetensors' dtype names, by the name of the torch dtype (those this torch lacks are skipped)
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16", "uint32": "U32",
    "uint64": "U64", "complex64": "C64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
}
#: bytes per element of safetensors' dtypes (sub-byte ones are absent: bnfuse never writes them)
ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
            "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1}


def st_dtype(dtype: "torch.dtype") -> "str | None":
    """safetensors' name for ``dtype`` (``F32``), None when .safetensors cannot store it."""
    return _ST_DTYPES.get(str(dtype).replace("torch.", ""))


def byte_view(t: "torch.Tensor") -> memoryview:
    """The bytes of ``t`` in row-major order, as safetensors stores them: no copy for a contiguous CPU tensor."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # uint8 in torch first: numpy has no bfloat16 or float8
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def first_line(msg: str, after: str = "") -> str:
    """The first non-blank line of ``msg`` (after ``after`` when it occurs): an exception's gist."""
    if after and after in msg:
        msg = msg[msg.find(after) + len(after):]
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "no details"


def looks_zipped(file: "Any") -> bool:
    """``zipfile.is_zipfile(file)`` (a path or a binary file), which raises on some damaged directories
    (``BadZipFile``: "zipfiles that span multiple disks"): such a file looks zipped, and opening it as an
    archive then says what is wrong with it."""
    import zipfile

    try:
        return zipfile.is_zipfile(file)
    except Exception:  # noqa: BLE001 - BadZipFile, struct.error, ValueError from a damaged directory
        return True

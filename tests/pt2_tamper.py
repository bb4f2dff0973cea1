"""Hostile ``.pt2`` archives for the tests: a member replaced or added, a pickle whose payload touches a
marker file and returns what torch expects, a member that claims gigabytes from a few bytes."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch


def rewrite(src: Path, dst: Path, replace: "dict[str, bytes] | None" = None, add: "dict[str, bytes] | None" = None,
            drop: "tuple[str, ...]" = ()) -> Path:
    """A copy of the zip ``src`` at ``dst`` with members (named inside the archive's folder) replaced or added,
    every member stored uncompressed as torch writes them."""
    replace, add = dict(replace or {}), dict(add or {})
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        root = zi.namelist()[0].split("/", 1)[0]
        for info in zi.infolist():
            name = info.filename[len(root) + 1:]
            if name in drop:
                continue
            zo.writestr(info.filename, replace.pop(name) if name in replace else zi.read(info))
        for name, data in {**replace, **add}.items():
            zo.writestr(f"{root}/{name}", data)
    return dst


def member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        return zf.read(f"{root}/{name}")


def members(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return [n.split("/", 1)[1] for n in zf.namelist()]


class Payload:
    """Unpickles by running ``eval``: touches ``marker``, then gives ``value`` (what torch expects there)."""

    def __init__(self, marker: Path, value: str) -> None:
        self.code = f"(__import__('pathlib').Path({str(marker)!r}).touch(), {value})[1]"

    def __reduce__(self) -> "tuple[Any, tuple[str]]":
        return eval, (self.code,)


def payload(marker: Path, value: str) -> bytes:
    """``torch.save`` of a :class:`Payload`: a pickle ``torch.load(weights_only=True)`` refuses."""
    buf = io.BytesIO()
    torch.save(Payload(marker, value), buf)
    return buf.getvalue()


def sample_inputs_payload(src: Path, dst: Path, marker: Path) -> Path:
    """``src`` with its sample inputs replaced by a pickle that touches ``marker`` and returns them."""
    inputs = torch.load(io.BytesIO(member(src, "data/sample_inputs/model.pt")), weights_only=True)
    shape = tuple(inputs[0][0].shape)
    return rewrite(src, dst, {"data/sample_inputs/model.pt": payload(
        marker, f"((__import__('torch').zeros{shape},), {{}})")})


def pickled_weight(src: Path, dst: Path, marker: Path, key: "str | None" = None) -> Path:
    """``src`` with one weight (``key``, else the first) marked ``use_pickle`` and its record a payload that
    returns the weight itself."""
    config = json.loads(member(src, "data/weights/model_weights_config.json"))
    key = key or next(iter(config["config"]))
    entry = config["config"][key]
    shape = tuple(s["as_int"] for s in entry["tensor_meta"]["sizes"])
    entry["use_pickle"] = True
    entry["path_name"] = "weight_pickled"
    return rewrite(src, dst, {"data/weights/model_weights_config.json": json.dumps(config).encode()},
                   {"data/weights/weight_pickled": payload(
                       marker, f"__import__('torch').nn.Parameter(__import__('torch').zeros{shape})")})


def pickled_constant(src: Path, dst: Path, marker: Path, kind: str = "tensor_") -> Path:
    """``src`` with a constant added to its constants config: a pickled tensor (``tensor_``, ``use_pickle``), an
    opaque object (``opaque_obj_``, ``pickle.loads``) or a custom object (``custom_obj_``)."""
    config = json.loads(member(src, "data/constants/model_constants_config.json"))
    name = f"{kind}0"
    data = payload(marker, "__import__('torch').zeros(1)")
    if kind == "opaque_obj_":
        import pickle

        data = pickle.dumps(Payload(marker, "0"))
    config["config"]["evil"] = {"path_name": name, "is_param": False, "use_pickle": True,
                                "tensor_meta": None}
    return rewrite(src, dst, {"data/constants/model_constants_config.json": json.dumps(config).encode()},
                   {f"data/constants/{name}": data})


def graph_edit(src: Path, dst: Path, edit: Any) -> Path:
    """``src`` with its graph JSON changed by ``edit(graph)`` (in place)."""
    graph = json.loads(member(src, "models/model.json"))
    edit(graph)
    return rewrite(src, dst, {"models/model.json": json.dumps(graph).encode()})


def zip_bomb(src: Path, dst: Path, name: str = "extra/padding", size: int = 2 << 30) -> Path:
    """``src`` with a member of ``size`` zero bytes added, deflated (2 GiB takes about 2 MB on disk)."""
    import shutil

    shutil.copyfile(src, dst)
    with zipfile.ZipFile(dst, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        with zf.open(f"{root}/{name}", "w", force_zip64=True) as out:
            chunk = bytes(16 << 20)
            for _ in range(size // len(chunk)):
                out.write(chunk)
            out.write(bytes(size % len(chunk)))
    return dst

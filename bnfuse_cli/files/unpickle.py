"""Load a torch file without running code from it: ``torch.load(weights_only=True)``, and a file that needs
full unpickling refused with :class:`UnsafeCheckpointError` before anything in it runs, unless allowed."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsafeCheckpointError
from .formats import first_line, looks_zipped

__all__ = ["torch_load"]


def torch_load(path: Path, allow_pickle: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; a file that needs full unpickling is refused with
    :class:`UnsafeCheckpointError` before anything in it runs, unless ``allow_pickle``."""
    import pickle
    import warnings

    import torch

    zipped = looks_zipped(path)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4" and similar are noise here
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        raw = None if zipped else _raw_pickle_protocol(path)
        if "GLOBAL" not in msg and "allowlisted" not in msg and raw is None:
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint (or it is corrupt): {first_line(msg, 'WeightsUnpickler error:')}"
            ) from exc
        if not allow_pickle:
            what = (f"it needs {_unsafe_detail(msg)}" if raw is None else
                    f"it is a plain Python pickle (protocol {raw}, not written by torch.save) that only full "
                    "unpickling can read")
            raise UnsafeCheckpointError(
                f"{path} is a full pickle: {what}, and loading it runs code stored in "
                "the file, which can do anything a program you run can do (delete files, steal keys). "
                "bnfuse refused and nothing in it was executed. If you trust where it came from, pass "
                "--allow-pickle (allow_pickle=True in Python); better, ask for a state_dict or .safetensors file"
            ) from exc
    except Exception as exc:  # noqa: BLE001 - the safe loader runs no file code: any failure is a bad file
        # garbage makes the unpickler raise KeyError, IndexError, struct.error, ...; a cut zip RuntimeError
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint: it is truncated or corrupt "
            f"({type(exc).__name__}: {first_line(str(exc))})"
        ) from exc
    return _unpickle(path, zipped)


def _unpickle(path: Path, zipped: bool) -> Any:
    """Full unpickling, which runs code stored in the file: only ever called with ``allow_pickle``."""
    import pickle
    import sys
    import warnings

    import torch

    if os.getcwd() not in sys.path and "" not in sys.path:  # the pickled classes may live in the user's project
        sys.path.insert(0, os.getcwd())
    try:
        if not zipped and _raw_pickle_protocol(path) is not None:  # pickle.dump, not torch.save
            with open(path, "rb") as fh:
                return pickle.load(fh)  # noqa: S301 - the user passed --allow-pickle
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        raise CheckpointError(
            f"{path}: unpickling needs the module {exc.name!r}, which cannot be imported: run bnfuse from "
            "your project's directory or add it to PYTHONPATH (the pickle stores a reference to the "
            "model's class, not its code)"
        ) from exc
    except Exception as exc:  # arbitrary code ran; report what it raised
        raise CheckpointError(f"{path}: unpickling failed: {type(exc).__name__}: {first_line(str(exc))}") from exc


def _raw_pickle_protocol(path: Path) -> "int | None":
    """The protocol of a file written by ``pickle.dump`` (3 or more); torch's own format uses 2."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 and 3 <= head[1] <= 5 else None


def _unsafe_detail(msg: str) -> str:
    """``GLOBAL torchvision.models.resnet.ResNet`` from torch's long weights_only message."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", msg)
    if found:
        return f"the Python object {found.group(1)}"
    found = re.search(r"but got (<class '[\w.]+'>|\S+)", msg)
    return f"the Python object {found.group(1)}" if found else "Python objects other than tensors"

"""bnfuse: fold BatchNorm into Conv/Linear layers of PyTorch models, exactly, and prove it.

Importing this package does not import torch; the functions below import it when called.

>>> import bnfuse_cli
>>> result = bnfuse_cli.fuse(model, torch.randn(1, 3, 224, 224))   # doctest: +SKIP
>>> result.model, result.folds, result.skipped, result.error.rel    # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BnfuseError,
    CheckpointError,
    DeviceError,
    FoldError,
    OutputError,
    SourceError,
    UnsafeCheckpointError,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "fuse",
    "plan",
    "FuseResult",
    "convert",
    "ConvertReport",
    "load",
    "read_checkpoint",
    "verify",
    "VerifyReport",
    "bench",
    "BenchReport",
    "BnfuseError",
    "UsageError",
    "SourceError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "OutputError",
    "FoldError",
    "DeviceError",
]

_LAZY = {
    "fuse": "fuse",
    "plan": "fuse",
    "FuseResult": "fuse",
    "convert": "convert",
    "ConvertReport": "convert",
    "load": "loading",
    "read_checkpoint": "checkpoint",
    "verify": "verify",
    "VerifyReport": "verify",
    "bench": "bench",
    "BenchReport": "bench",
}

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import read_checkpoint
    from .convert import ConvertReport, convert
    from .fuse import FuseResult, fuse, plan
    from .loading import load


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfuse_cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

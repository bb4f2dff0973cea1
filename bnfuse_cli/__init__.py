"""bnfuse: fold BatchNorm into Conv/Linear layers of PyTorch models, exactly, and prove it.

Importing this package imports neither torch nor the library modules: each public name below
is imported from its module on first use (PEP 562), so ``bnfuse --help`` starts in a fraction
of a second.  The functions import torch when called.

>>> import bnfuse_cli
>>> result = bnfuse_cli.fuse(model, torch.randn(1, 3, 224, 224))   # doctest: +SKIP
>>> result.model, result.folds, result.skipped, result.error.rel    # doctest: +SKIP
"""

from __future__ import annotations

import importlib
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

from .version import __version__

#: public name -> the module that defines it.  Those modules live in subpackages
#: (``workflows.convert`` is an attribute of ``workflows``, ``files.load`` of ``files``), so importing
#: one never replaces the function of the same name on this package.
_LAZY = {
    "fuse": "workflows.fuse",
    "FuseOptions": "workflows.options",
    "ConvertOptions": "workflows.options",
    "JudgeOptions": "workflows.options",
    "BenchSettings": "workflows.options",
    "plan": "workflows.fuse",
    "FuseResult": "workflows.fuse",
    "convert": "workflows.convert",
    "ConvertReport": "workflows.convert",
    "inspect": "workflows.convert",
    "InspectReport": "workflows.convert",
    "SourceOptions": "workflows.source",
    "prepare": "workflows.source",
    "Prepared": "workflows.source",
    "load": "files.load",
    "read_checkpoint": "files.table",
    "verify": "workflows.verify",
    "VerifyReport": "workflows.verify",
    "bench": "workflows.bench",
    "BenchReport": "workflows.bench",
}

__all__ = [
    "__version__",
    *_LAZY,
    "BnfuseError",
    "UsageError",
    "SourceError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "OutputError",
    "FoldError",
    "DeviceError",
]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .workflows.bench import BenchReport, bench
    from .workflows.convert import ConvertReport, InspectReport, convert, inspect
    from .files.load import load
    from .files.table import read_checkpoint
    from .workflows.fuse import FuseResult, fuse, plan
    from .workflows.options import BenchSettings, ConvertOptions, FuseOptions, JudgeOptions
    from .workflows.source import Prepared, SourceOptions, prepare
    from .workflows.verify import VerifyReport, verify


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {"errors"})

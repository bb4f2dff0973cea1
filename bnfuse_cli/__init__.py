"""bnfuse: fold BatchNorm into Conv/Linear layers of PyTorch models, exactly, and prove it.

Importing this package does not import torch; the functions below import it when called.

>>> import bnfuse_cli
>>> result = bnfuse_cli.fuse(model, torch.randn(1, 3, 224, 224))   # doctest: +SKIP
>>> result.model, result.folds, result.skipped, result.error.rel    # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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

# Imported eagerly on purpose: these modules import torch only inside their functions, and
# binding the functions here keeps ``bnfuse_cli.convert`` the function even after the
# submodule of the same name has been imported (a lazy __getattr__ would be shadowed by it).
from .bench import BenchReport, bench  # noqa: E402
from .checkpoint import read_checkpoint  # noqa: E402
from .convert import ConvertReport, convert  # noqa: E402
from .fuse import FuseResult, fuse, plan  # noqa: E402
from .loading import load  # noqa: E402
from .verify import VerifyReport, verify  # noqa: E402

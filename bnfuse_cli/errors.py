"""The exceptions bnfuse raises for a user's mistake or a model it cannot handle.

Standard library only: ``bnfuse --help`` imports this module without torch.
Every error bnfuse raises on purpose is a :class:`BnfuseError`; anything else is a bug.
"""

from __future__ import annotations

__all__ = [
    "BnfuseError",
    "UsageError",
    "SourceError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "OutputError",
    "FoldError",
    "DeviceError",
]


class BnfuseError(Exception):
    """Base class: a clear, one-paragraph message for the user, no traceback."""


class UsageError(BnfuseError):
    """An option or argument that cannot be used as given."""


class SourceError(BnfuseError):
    """A model name, architecture or factory that cannot be resolved."""


class CheckpointError(BnfuseError):
    """A file that is missing, unreadable, truncated or not a checkpoint bnfuse understands."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that can only be read by executing a full pickle, refused without --allow-pickle."""


class OutputError(BnfuseError):
    """An output path that cannot be written (exists, same as the input, unwritable directory)."""


class FoldError(BnfuseError):
    """Folding would give a wrong or non-finite model (bad BN statistics, overflow)."""


class DeviceError(BnfuseError):
    """A device that is not available on this machine (for example --device cuda without CUDA)."""

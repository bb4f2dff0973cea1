"""The device, dtype and math flags a run uses: parsed from options, switched, and reported.

Float32 math is not one thing: on Ampere and newer GPUs PyTorch runs cuDNN convolutions in
TF32 by default (10 mantissa bits), users turn matmul TF32 on, and autocast runs layers in
float16/bfloat16.  The judge (:mod:`bnfuse_cli.checks`) reports these flags with every verdict.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

from .errors import DeviceError, UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "AUTOCAST_DTYPES", "resolve_device", "parse_dtype", "check_autocast", "autocast",
           "exact_math", "precision_flags"]

#: ``--dtype`` choices
DTYPES = ("float32", "float16", "bfloat16")
#: ``--autocast`` choices
AUTOCAST_DTYPES = ("float16", "bfloat16")


def resolve_device(text: str) -> "torch.device":
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available); :class:`DeviceError` if absent."""
    import torch

    name = text.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(
                f"--device {text}: CUDA is not available ({why}; torch {torch.__version__}). "
                "Run on a machine with an NVIDIA GPU and a CUDA build of PyTorch, or use --device cpu "
                "(or auto)"
            )
        try:
            dev = torch.device(name)
        except RuntimeError as exc:
            raise UsageError(f"--device {text!r} is not a device name: use cpu, cuda, cuda:N or auto") from exc
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return dev
    raise UsageError(f"--device {text!r}: choose cpu, cuda (or cuda:N) or auto")


def parse_dtype(text: str) -> "torch.dtype":
    """``float32``, ``float16`` or ``bfloat16`` as a torch dtype, with a clear error otherwise."""
    import torch

    name = text.strip().lower()
    if name not in DTYPES:
        raise UsageError(f"--dtype {text!r}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def check_autocast(name: "str | None") -> "str | None":
    """``--autocast`` validated: None, float16 or bfloat16."""
    if name is None:
        return None
    if name.strip().lower() not in AUTOCAST_DTYPES:
        raise UsageError(f"--autocast {name!r}: choose float16 or bfloat16 (mixed precision as with AMP)")
    return name.strip().lower()


def autocast(device: Any, name: "str | None") -> Any:
    """``torch.autocast`` on ``device`` for ``--autocast float16|bfloat16``; a no-op for None."""
    import torch

    name = check_autocast(name)
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, name))


@contextlib.contextmanager
def exact_math() -> Iterator[None]:
    """Reduced-precision float32 math (TF32 for cuDNN and matmul) off inside, restored after."""
    import torch

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])


def precision_flags(device: Any = "cpu", autocast_dtype: "str | None" = None, dtype: Any = None) -> dict[str, Any]:
    """The switches that decide how exactly the models' math runs, as they are now."""
    import torch

    return {
        "device": str(device),
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "autocast": autocast_dtype,
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }

"""Example inputs for a model, and how far apart two outputs are.

An input *spec* is a shape plus how the model takes it: ``tensor`` (``model(x)``) or ``images``
(torchvision detection models take a list of CHW images, ``model([img, ...])``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["InputSpec", "parse_shape", "infer_spec", "make_input", "as_args", "compare", "Comparison"]

#: torchvision video classifiers and the clip shape they expect (C, T, H, W)
_VIDEO_SHAPES = {"s3d": (3, 16, 224, 224), "mvit_v1_b": (3, 16, 224, 224), "mvit_v2_s": (3, 16, 224, 224)}


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    kind: str = "tensor"  # "tensor" | "images"

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        return cls(tuple(int(x) for x in d["shape"]), str(d.get("kind", "tensor")))


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``1,3,224,224`` (or ``1x3x224x224``) into a shape, with a clear error."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(
            f"--input-shape {text!r} is not a shape: give positive integers separated by commas, "
            "for example 1,3,224,224"
        )
    return shape


def _is_detection(model: "nn.Module") -> bool:
    try:
        from torchvision.models.detection import FCOS, SSD, GeneralizedRCNN, RetinaNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return isinstance(model, (GeneralizedRCNN, RetinaNet, FCOS, SSD))


def infer_spec(model: "nn.Module", arch: "str | None" = None) -> InputSpec:
    """A sensible default input for ``model``: 3x224x224 images, clips for video, else from layer 1."""
    from torch import nn

    name = (arch or "").rsplit(":", 1)[-1]
    if _is_detection(model):
        return InputSpec((1, 3, 320, 320), "images")
    if name in _VIDEO_SHAPES:
        return InputSpec((1, *_VIDEO_SHAPES[name]))
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                                                              nn.ConvTranspose1d, nn.ConvTranspose2d,
                                                              nn.ConvTranspose3d))), None)
    if isinstance(first, (nn.Conv3d, nn.ConvTranspose3d)):
        return InputSpec((1, first.in_channels, 16, 112, 112))
    if isinstance(first, (nn.Conv2d, nn.ConvTranspose2d)):
        return InputSpec((1, first.in_channels, 224, 224))
    if isinstance(first, (nn.Conv1d, nn.ConvTranspose1d)):
        return InputSpec((1, first.in_channels, 256))
    if isinstance(first, nn.Linear):
        return InputSpec((2, first.in_features))
    raise UsageError(
        f"cannot infer an input shape for {type(model).__name__}: pass --input-shape (for example 1,3,224,224)"
    )


def make_input(spec: InputSpec, *, dtype: "torch.dtype", device: "torch.device | str" = "cpu", seed: int = 0) -> Any:
    """A seeded standard-normal input for ``spec``, as the model's single argument."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(spec.shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    if spec.kind == "images":
        if x.dim() == 3:
            return [x]
        return [img for img in x]
    return x


def as_args(example: Any) -> tuple[Any, ...]:
    """A tuple is positional arguments; anything else (a tensor, a list of images) is one argument."""
    return example if isinstance(example, tuple) else (example,)


def model_dtype(model: "nn.Module") -> "tuple[torch.dtype, torch.device]":
    import torch

    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")


@dataclass(frozen=True)
class Comparison:
    max_abs: float
    rel: float
    cosine: float
    #: the outputs differ in structure or shape (tensors could not be compared element-wise)
    mismatch: "str | None" = None


def _flat(out: Any) -> list["torch.Tensor"]:
    import torch
    from torch.utils._pytree import tree_flatten

    leaves = tree_flatten(out)[0]
    return [t for t in leaves if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]


def compare(reference: Any, output: Any) -> Comparison:
    """Max abs error, relative error ``||a-b|| / ||a||`` and cosine similarity over all float outputs."""
    import torch

    a, b = _flat(reference), _flat(output)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return Comparison(float("inf"), float("inf"), float("nan"), mismatch=(
            f"output structure differs: {[tuple(x.shape) for x in a]} vs {[tuple(y.shape) for y in b]}"
        ))
    if not a:
        return Comparison(0.0, 0.0, 1.0)
    va = torch.cat([x.detach().reshape(-1).to(torch.float64).cpu() for x in a])
    vb = torch.cat([y.detach().reshape(-1).to(torch.float64).cpu() for y in b])
    diff = (va - vb).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    na = float(va.norm())
    rel = float((va - vb).norm()) / na if na > 0 else (0.0 if max_abs == 0 else float("inf"))
    nb = float(vb.norm())
    cos = float(va.dot(vb)) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    return Comparison(max_abs, rel, cos)

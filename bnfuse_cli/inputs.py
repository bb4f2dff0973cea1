"""Example inputs for a model: which shape, and a seeded random tensor of it.

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

__all__ = ["InputSpec", "parse_shape", "infer_spec", "input_spec", "make_input", "as_args", "model_dtype"]

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


def input_spec(src: Any, input_shape: "str | tuple[int, ...] | None" = None, *,
               batch_size: "int | None" = None) -> InputSpec:
    """The input for the checks of a loaded source (``.model``, ``.arch``, ``.metadata``):
    ``input_shape``, else the one recorded by an earlier conversion, else the model's own
    ``example_input_shape`` attribute, else inferred from its first layer.  ``batch_size``
    replaces the first dimension."""
    declared = getattr(src.model, "example_input_shape", None)
    if src.metadata.get("input"):
        auto = InputSpec.from_dict(src.metadata["input"])
    elif isinstance(declared, (tuple, list)) and declared and all(isinstance(d, int) and d > 0 for d in declared):
        auto = InputSpec(tuple(declared))
    else:
        auto = infer_spec(src.model, src.arch)
    shape = auto.shape
    if input_shape is not None:
        shape = parse_shape(input_shape) if isinstance(input_shape, str) else tuple(int(d) for d in input_shape)
        if auto.kind == "images" and len(shape) == 3:
            shape = (1, *shape)
    if batch_size is not None:
        shape = (batch_size, *shape[1:])
    return InputSpec(shape, auto.kind)

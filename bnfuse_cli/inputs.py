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

__all__ = ["InputSpec", "parse_shape", "check_shape_option", "check_budget", "input_budget", "infer_spec", "input_spec",
           "make_input", "as_args", "model_dtype", "randomize_bn", "memory_format", "to_memory_format",
           "cast_floats"]

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


#: environment variable that raises (or lowers) the example-input budget, in MiB
BUDGET_ENV = "BNFUSE_MAX_INPUT_MIB"
#: default budget for one example input: 1 GiB of float64 (the input is drawn in float64)
DEFAULT_BUDGET_MIB = 1024


def input_budget() -> int:
    """The largest example input bnfuse allocates, in bytes (``BNFUSE_MAX_INPUT_MIB``, default 1024)."""
    import os

    text = os.environ.get(BUDGET_ENV, "").strip()
    if not text:
        return DEFAULT_BUDGET_MIB * 2**20
    try:
        mib = float(text)
    except ValueError:
        mib = -1.0
    if not (mib > 0 and mib < 2**40):
        raise UsageError(f"{BUDGET_ENV}={text!r}: give the example-input budget as a positive number of MiB")
    return int(mib * 2**20)


def check_budget(shape: tuple[int, ...], what: str = "--input-shape") -> None:
    """Refuse an example input larger than the budget, before anything is allocated."""
    elements = 1
    for d in shape:
        elements *= d
    size, budget = elements * 8, input_budget()
    if size > budget:
        raise UsageError(
            f"{what} {'x'.join(map(str, shape))} needs {size / 2**30:,.1f} GiB for one example input (drawn in "
            f"float64), above the {budget / 2**20:,.0f} MiB budget: give a smaller shape, or raise the budget "
            f"with the environment variable {BUDGET_ENV}"
        )


def check_shape_option(input_shape: "str | tuple[int, ...] | list[int] | None") -> None:
    """Validate an ``--input-shape`` option (parsed, positive, within the budget) before any work."""
    if input_shape is None:
        return
    if isinstance(input_shape, str):
        shape = parse_shape(input_shape)
    else:
        try:
            shape = tuple(int(d) for d in input_shape)
        except (TypeError, ValueError):
            shape = ()
        if not shape or any(d <= 0 for d in shape):
            raise UsageError(f"input_shape {input_shape!r} is not a shape: give positive integers, e.g. (1, 3, 224, 224)")
    check_budget(shape)


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
    """A seeded standard-normal input for ``spec``, as the model's single argument (refused above
    the budget of :func:`input_budget`, before allocating it)."""
    import torch

    check_budget(spec.shape, "the example input")
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
    """The input for the checks of a loaded source (``.model``, ``.arch``, ``.meta``):
    ``input_shape``, else the one recorded by an earlier conversion, else the model's own
    ``example_input_shape`` attribute, else inferred from its first layer.  ``batch_size``
    replaces the first dimension."""
    declared = getattr(src.model, "example_input_shape", None)
    recorded = src.meta.input if getattr(src, "meta", None) is not None else None
    if recorded:
        auto = InputSpec.from_dict(recorded)
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


def randomize_bn(model: "nn.Module", *, seed: int = 0, example: "tuple[Any, ...] | None" = None) -> int:
    """Give every BatchNorm-like layer random affine parameters and non-trivial statistics, in place.

    A randomly initialised model has fresh BatchNorms (mean 0, variance 1, weight 1, bias 0),
    which are the identity: a fold of them checks nothing.  Scale and shift are drawn around 1
    and 0 (standard deviation 0.4) and running statistics around 0 and 1 (mean +-0.5, variance
    0.25 to 1.75).  With ``example`` (the model's positional arguments), the running statistics
    are then measured on it instead, as training would: every layer then normalises what it
    really sees, so activations stay of order 1 and a float16 run does not overflow the way
    an un-normalised random ResNet-50 does.  A model whose BatchNorms cannot run in training
    mode on ``example`` keeps the random statistics.  Returns the number of layers changed.
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    norms = []
    with torch.no_grad():
        for m in model.modules():
            rm = getattr(m, "running_mean", None)
            rv = getattr(m, "running_var", None)
            if not isinstance(rm, torch.Tensor) or not isinstance(rv, torch.Tensor) or rm.shape != rv.shape:
                continue
            n = rm.numel()
            rm.copy_((torch.randn(n, generator=g) * 0.5).to(rm.dtype))
            rv.copy_((torch.rand(n, generator=g) * 1.5 + 0.25).to(rv.dtype))
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.Tensor) and w.numel() == n:
                w.copy_((torch.randn(n, generator=g) * 0.4 + 1.0).to(w.dtype))
            if isinstance(b, torch.Tensor) and b.numel() == n:
                b.copy_((torch.randn(n, generator=g) * 0.4).to(b.dtype))
            norms.append(m)
    calibrate = [m for m in norms if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if example is None or not calibrate:
        return len(norms)
    saved = {id(m): (m.running_mean.clone(), m.running_var.clone(), m.momentum, m.training) for m in calibrate}
    was_training = model.training
    model.eval()
    try:
        for m in calibrate:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
            m.train()
        with torch.no_grad():
            model(*example)
    except (ValueError, RuntimeError):  # e.g. one value per channel: keep the random statistics
        with torch.no_grad():
            for m in calibrate:
                m.running_mean.copy_(saved[id(m)][0])
                m.running_var.copy_(saved[id(m)][1])
    finally:
        for m in calibrate:
            m.momentum = saved[id(m)][2]
            m.train(saved[id(m)][3])
        model.train(was_training)
    return len(norms)


def to_memory_format(x: Any, fmt: Any) -> Any:
    """Every 4-D (5-D for channels_last_3d) tensor in ``x`` (any pytree) in memory format ``fmt``."""
    import torch
    from torch.utils._pytree import tree_map_only

    if fmt is None:
        return x
    rank = 4 if fmt is torch.channels_last else 5
    return tree_map_only(torch.Tensor, lambda t: t.contiguous(memory_format=fmt) if t.dim() == rank else t, x)


def memory_format(spec: "InputSpec", channels_last: bool) -> Any:
    import torch

    if not channels_last:
        return None
    rank = len(spec.shape) + (1 if spec.kind == "images" and len(spec.shape) == 3 else 0)
    if rank == 4:
        return torch.channels_last
    if rank == 5:
        return torch.channels_last_3d
    raise UsageError(
        f"--channels-last needs a 4-D (N,C,H,W) or 5-D input; this model takes {'x'.join(map(str, spec.shape))}"
    )


def cast_floats(x: Any, dtype: Any) -> Any:
    """Every floating-point tensor in ``x`` (any pytree) cast to ``dtype``."""
    import torch
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, x)

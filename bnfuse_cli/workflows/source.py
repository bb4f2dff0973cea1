"""One prepared source: how a source is loaded (:class:`SourceOptions`, checked before any work) and
what every workflow starts from once it is (:class:`Prepared`: the model in eval mode, its example
input, the input's spec, dtype and device, its tensor counts, and where it came from).

The CLI builds one :class:`SourceOptions` from its options and hands it to ``convert``, ``inspect``,
``verify`` and ``bench``; each builds its :class:`Prepared` once with :func:`prepare`, and nothing
downstream works the spec, dtype or example input out again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..files.load import Source, load_source
from ..files.meta import seed_problem
from ..inputs import InputSpec, as_args, check_shape_option, input_spec, make_input, model_dtype

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["SourceOptions", "Prepared", "prepare", "count_tensors"]


@dataclass(frozen=True)
class SourceOptions:
    """How to load a source (a model name or a file): the CLI's source options as one object.

    ``arch`` rebuilds a state_dict's architecture; ``weights`` chooses a model name's weights
    (``default``, a torchvision weights name, ``none`` for a random initialisation drawn from
    ``seed``, or a state_dict file); ``input_shape`` replaces the inferred example input;
    ``allow_pickle`` allows a full unpickle; ``key`` picks the weights inside a file that holds
    several.  ``seed`` also draws the first example input.  Checked when made, before any work.
    """

    arch: "str | None" = None
    weights: str = "default"
    input_shape: "str | tuple[int, ...] | None" = None
    allow_pickle: bool = False
    key: "str | None" = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_shape_option(self.input_shape)
        if why := seed_problem(self.seed):
            raise UsageError(f"--seed: {why}")

    @classmethod
    def of(cls, options: "SourceOptions | None", given: "dict[str, Any]") -> "SourceOptions":
        """``options``, or one made of the keyword arguments a workflow was called with (``arch=``,
        ``weights=``, ...): the Python API's shorthand.  Both at once is refused."""
        if options is not None and given:
            raise UsageError(f"give the source options either as options=SourceOptions(...) or as keywords "
                             f"({', '.join(sorted(given))}), not both")
        if options is not None:
            return options
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}: the source options are "
                            f"{', '.join(f.name for f in fields(cls))}")
        return cls(**given)


def count_tensors(model: "nn.Module") -> tuple[int, int]:
    """(floating-point parameter elements, floating-point buffer elements), shared tensors counted once:
    the weights, the same in every format (an ONNX graph's integer shape constants are not weights)."""
    params = sum(p.numel() for p in model.parameters() if p.is_floating_point())
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return params, buffers


@dataclass
class Prepared:
    """A source made ready once: what every workflow starts from."""

    #: the source as given (a name or a path), for reports
    name: str
    #: where the model came from: architecture, kind, weights, seed, a fused file's record, notes
    origin: "Source"
    spec: InputSpec
    #: the example input as positional arguments, in the model's dtype on its device
    args: tuple[Any, ...]
    dtype: "torch.dtype"
    device: "torch.device"
    options: SourceOptions
    #: parameter and buffer elements when it was loaded
    params: int = 0
    buffers: int = 0

    @property
    def model(self) -> "nn.Module":
        return self.origin.model

    @property
    def arch(self) -> "str | None":
        return self.origin.arch

    @property
    def path(self) -> "Path | None":
        return self.origin.path

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def prepare(source: "str | os.PathLike[str] | Prepared", options: "SourceOptions | None" = None, *,
            batch_size: "int | None" = None) -> Prepared:
    """Load ``source`` with ``options`` (:func:`bnfuse_cli.files.load.load_source`) and make its
    example input, once; a :class:`Prepared` is returned as it is.  ``batch_size`` replaces the
    input's first dimension."""
    if isinstance(source, Prepared):
        return source
    opts = options or SourceOptions()
    src = load_source(source, arch=opts.arch, weights=opts.weights, allow_pickle=opts.allow_pickle, key=opts.key,
                      seed=opts.seed)
    spec = input_spec(src, opts.input_shape, batch_size=batch_size)
    dtype, on = model_dtype(src.model)
    args = as_args(make_input(spec, dtype=dtype, device=on, seed=opts.seed))
    params, buffers = count_tensors(src.model)
    return Prepared(str(source), src, spec, args, dtype, on, opts, params, buffers)

"""The options objects of the public workflows: each workflow takes a few positional arguments and
one of these, built once (by the CLI, or by the caller), checked when made, before any work.

- :class:`FuseOptions`: how :func:`~bnfuse_cli.fuse` judges (``rtol``, ``atol``) and the options of
  the passes, by the names the table of passes declares (``passes={"unwrap": True}``);
- :class:`ConvertOptions`: what ``convert`` writes, how, and the fuse options;
- :class:`JudgeOptions`: how ``verify`` runs both models and what it compares;
- :class:`BenchSettings`: how ``bench`` times them.

The keywords these replaced (``fuse(model, x, rtol=..., unwrap=True)``) still work for one release,
with a :class:`DeprecationWarning` (:func:`from_keywords`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Mapping

from ..engine.passes import options as pass_options
from ..errors import UsageError

if TYPE_CHECKING:
    import os

__all__ = ["FuseOptions", "ConvertOptions", "JudgeOptions", "BenchSettings", "from_keywords", "split_call", "check_tolerance"]


def check_tolerance(name: str, value: "float | None") -> None:
    """A tolerance is None (the default by dtype) or a finite number >= 0 (UsageError naming it)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"--{name} {value!r}: give a finite number >= 0")


@dataclass(frozen=True)
class FuseOptions:
    """How :func:`~bnfuse_cli.fuse` judges the fused model and which passes run.

    ``rtol``/``atol``: the tolerances of the end-to-end check (None: by dtype,
    :data:`bnfuse_cli.checks.TOLERANCES`).  ``passes``: the options of the table of passes by
    name (``merge``, ``clone_shared``, ``horizontal``, ``unwrap``, ...: each pass's row declares its
    option, its default and its help); an option not given takes its row's default.
    ``keep_reference`` keeps the original's output in the result (to judge an exported copy later).
    """

    rtol: "float | None" = None
    atol: "float | None" = None
    passes: "Mapping[str, bool]" = field(default_factory=dict)
    keep_reference: bool = False

    def __post_init__(self) -> None:
        check_tolerance("rtol", self.rtol)
        check_tolerance("atol", self.atol)
        known = {o.name for o in pass_options()}
        unknown = sorted(set(self.passes) - known)
        if unknown:
            raise UsageError(f"unknown pass option(s) {', '.join(unknown)}: the passes' options are "
                             f"{', '.join(sorted(known))}")
        object.__setattr__(self, "passes", {k: bool(v) for k, v in self.passes.items()})

    def resolved(self, names_reach_user: bool) -> "FuseOptions":
        """A copy with every pass option set: as given, else its row's default where the fused model
        goes (``names_reach_user``: a model or state_dict keys the user sees, not an exported program)."""
        return replace(self, passes={o.name: o.value(self.passes, names_reach_user) for o in pass_options()})


@dataclass(frozen=True)
class ConvertOptions:
    """What ``convert`` writes and how: ``save_as`` (``module`` or ``state-dict`` for a .pth; None
    mirrors the input), ``force`` (replace an existing output), ``verbose`` (the exporter's
    messages), and the :class:`FuseOptions` of the fold."""

    fuse: FuseOptions = field(default_factory=FuseOptions)
    save_as: "str | None" = None
    force: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.save_as not in (None, "module", "state-dict"):
            raise UsageError(f"--save-as {self.save_as!r}: choose module or state-dict")


@dataclass(frozen=True)
class JudgeOptions:
    """How ``verify`` judges a fused model against its original: ``samples`` seeded random inputs
    and, with ``data``, real ones (``batch_size`` per forward pass), both models on ``device``
    (cpu, cuda, cuda:N, auto) in ``dtype`` (float32, float16, bfloat16; None: as stored) under
    ``autocast`` (float16 or bfloat16), within ``atol + rtol * max|ref|`` plus the original's own
    error (None: by dtype)."""

    samples: int = 3
    rtol: "float | None" = None
    atol: "float | None" = None
    data: "str | os.PathLike[str] | None" = None
    batch_size: int = 256
    device: str = "cpu"
    dtype: "str | None" = None
    autocast: "str | None" = None

    def __post_init__(self) -> None:
        check_tolerance("rtol", self.rtol)
        check_tolerance("atol", self.atol)


@dataclass(frozen=True)
class BenchSettings:
    """How ``bench`` times each model against its fused copy: on ``device`` (auto, cpu, cuda,
    cuda:N) in ``dtype`` under ``autocast``, ``batch_size`` (None: 1 on CPU, 32 on CUDA),
    ``channels_last``, ``threads`` intra-op CPU threads (None: bench chooses), ``iters`` timed
    pairs after ``warmup`` untimed ones and at most ``time_budget`` seconds (None: by device; 0: no
    limit), ``compile`` (torch.compile both), ``runtime`` (eager, export or onnxruntime); the
    fused side is made with ``fuse``; ``min_sample_ms``: a timed sample repeats a faster model."""

    device: str = "auto"
    dtype: str = "float32"
    autocast: "str | None" = None
    batch_size: "int | None" = None
    channels_last: bool = False
    threads: "int | None" = None
    iters: "int | None" = None
    warmup: "int | None" = None
    time_budget: "float | None" = None
    compile: bool = False
    runtime: str = "eager"
    fuse: FuseOptions = field(default_factory=FuseOptions)
    min_sample_ms: float = 2.0


#: the old keywords of the fuse options: passed to FuseOptions as they are
_FUSE_FIELDS = ("rtol", "atol", "keep_reference")


def fuse_from(given: "dict[str, Any]", base: "FuseOptions | None" = None) -> FuseOptions:
    """The :class:`FuseOptions` that old keywords of a fuse call describe (taken out of ``given``)."""
    names = {o.name for o in pass_options()}
    passes = {k: given.pop(k) for k in list(given) if k in names}
    direct = {k: given.pop(k) for k in list(given) if k in _FUSE_FIELDS}
    opts = base or FuseOptions()
    return replace(opts, **direct, passes={**opts.passes, **passes})


def from_keywords(cls: type, options: Any, given: "dict[str, Any]", where: str, depth: int = 0) -> Any:
    """``options``, or one of ``cls`` made of the keyword arguments of a call from before the
    options objects (``where``: the function, for the warning, which names the line of the call:
    ``depth`` more frames up when reached through a helper); both at once is refused."""
    if not given:
        return options if options is not None else cls()
    if options is not None:
        raise UsageError(f"{where}: give the options either as an options object or as keywords "
                         f"({', '.join(sorted(given))}), not both")
    warnings.warn(f"{where}({', '.join(f'{k}=' for k in sorted(given))}) is deprecated: pass "
                  f"{cls.__name__}(...) instead", DeprecationWarning, stacklevel=3 + depth)
    if cls is FuseOptions:
        opts = fuse_from(given)
    else:
        own = {f.name for f in fields(cls)}
        kwargs = {k: given.pop(k) for k in list(given) if k in own and k != "fuse"}
        if "fuse" in own:
            kwargs["fuse"] = fuse_from(given)
        opts = cls(**kwargs)
    if given:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(sorted(given))}")
    return opts


def split_call(cls: type, options: Any, source_options: Any, keywords: "dict[str, Any]", where: str
               ) -> "tuple[Any, Any]":
    """(the workflow's options, its :class:`~bnfuse_cli.workflows.source.SourceOptions`) from a call
    that may use the keywords of bnfuse 0.1: ``options=SourceOptions(...)`` (the old meaning of
    ``options``), the source options as keywords (``arch=``, ``weights=``, ...) and the workflow's
    own (``force=``, ``rtol=``, ...), each with a DeprecationWarning."""
    from .source import SourceOptions

    if isinstance(options, SourceOptions):
        warnings.warn(f"{where}(options=SourceOptions(...)) is deprecated: pass it as source_options=",
                      DeprecationWarning, stacklevel=3)
        if source_options is not None:
            raise UsageError(f"{where}: the source options are given twice")
        options, source_options = None, options
    names = {f.name for f in fields(SourceOptions)}
    loading = {k: keywords.pop(k) for k in list(keywords) if k in names}
    if loading:
        warnings.warn(f"{where}({', '.join(f'{k}=' for k in sorted(loading))}) is deprecated: pass "
                      "source_options=SourceOptions(...)", DeprecationWarning, stacklevel=3)
        source_options = SourceOptions.of(source_options, loading)
    return from_keywords(cls, options, keywords, where, depth=1), source_options or SourceOptions()

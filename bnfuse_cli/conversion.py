"""``convert``: load a model, fold its BatchNorms in place, check the outputs, write the result."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .checkpoint import check_output_path, write_checkpoint
from .errors import FoldError, UsageError
from .graph import Plan, analyse
from .inputs import Comparison, InputSpec, as_args, compare, infer_spec, make_input, model_dtype, parse_shape
from .loading import Source, load_source
from .rewrite import apply_plan

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ConvertReport", "convert", "inspect", "count_tensors", "default_tolerance", "input_spec"]


@dataclass
class ConvertReport:
    """Everything ``bnfuse convert`` prints, as data (``to_dict`` for --json)."""

    source: str
    output: "str | None"
    arch: "str | None"
    weights: str
    input: InputSpec
    dtype: str
    plan: Plan
    params_before: int = 0
    params_after: int = 0
    buffers_before: int = 0
    buffers_after: int = 0
    file_size: int = 0
    form: str = "state_dict"
    error: "Comparison | None" = None
    tolerance: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return (self.params_before + self.buffers_before) - (self.params_after + self.buffers_after)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "arch": self.arch,
            "weights": self.weights,
            "input": self.input.to_dict(),
            "dtype": self.dtype,
            "bn_found": len(self.plan.norms),
            "bn_folded": len(self.plan.folded_norms),
            "bn_skipped": len(self.plan.skipped),
            "folds": [asdict(f) for f in self.plan.folds],
            "skipped": [asdict(s) for s in self.plan.skipped],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "buffers_before": self.buffers_before,
            "buffers_after": self.buffers_after,
            "removed": self.removed,
            "form": self.form,
            "file_size": self.file_size,
            "max_abs_error": None if self.error is None else self.error.max_abs,
            "rel_error": None if self.error is None else self.error.rel,
            "tolerance": self.tolerance,
            "seconds": self.seconds,
            "notes": self.notes,
            "bnfuse_version": __version__,
        }


def count_tensors(model: "nn.Module") -> tuple[int, int]:
    """(parameter elements, buffer elements), shared tensors counted once."""
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return params, buffers


def default_tolerance(dtype: Any) -> float:
    """Largest relative output error accepted from a correct fold, by dtype."""
    import torch

    return {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}.get(dtype, 1e-4)


def input_spec(src: Source, input_shape: "str | tuple[int, ...] | None" = None) -> InputSpec:
    """The input for the checks: ``input_shape``, else the one recorded by an earlier conversion,
    else the model's own ``example_input_shape`` attribute, else inferred from its first layer."""
    declared = getattr(src.model, "example_input_shape", None)
    if src.metadata.get("input"):
        auto = InputSpec.from_dict(src.metadata["input"])
    elif isinstance(declared, (tuple, list)) and declared and all(isinstance(d, int) and d > 0 for d in declared):
        auto = InputSpec(tuple(declared))
    else:
        auto = infer_spec(src.model, src.arch)
    if input_shape is None:
        return auto
    shape = parse_shape(input_shape) if isinstance(input_shape, str) else tuple(input_shape)
    if auto.kind == "images" and len(shape) == 3:
        shape = (1, *shape)
    return InputSpec(shape, auto.kind)


_spec = input_spec


def inspect(source: str, *, arch: "str | None" = None, weights: str = "default", input_shape: Any = None,
            allow_pickle: bool = False) -> tuple[Source, InputSpec, Plan]:
    """The fold plan for ``source`` without changing or writing anything."""
    src = load_source(source, arch=arch, weights=weights, allow_pickle=allow_pickle)
    spec = _spec(src, input_shape)
    dtype, device = model_dtype(src.model)
    plan = analyse(src.model, as_args(make_input(spec, dtype=dtype, device=device))).plan
    return src, spec, plan


def convert(
    source: "str | os.PathLike[str]",
    output: "str | os.PathLike[str] | None",
    *,
    arch: "str | None" = None,
    weights: str = "default",
    input_shape: "str | tuple[int, ...] | None" = None,
    allow_pickle: bool = False,
    save_as: "str | None" = None,
    force: bool = False,
    tolerance: "float | None" = None,
    seed: int = 0,
) -> ConvertReport:
    """Fold every foldable BatchNorm of ``source`` and write the fused model to ``output``.

    The model runs once on a seeded random input while the data flow is recorded (its output is
    the reference), is folded in place (no copy of the model is made), runs again, and the max
    and relative errors are measured.  Nothing is written when the error exceeds ``tolerance``
    (default by dtype: 1e-4 for float32).  ``output=None`` folds and checks without writing.
    """
    import torch

    t0 = time.perf_counter()
    out_path = Path(output) if output is not None else None
    if save_as not in (None, "module", "state-dict"):
        raise UsageError(f"--save-as {save_as!r}: choose module or state-dict")
    if save_as == "module" and out_path is not None and out_path.suffix == ".safetensors":
        raise UsageError(f"--save-as module needs a .pth output: .safetensors holds tensors only ({out_path})")
    if out_path is not None:
        check_output_path(out_path, inputs=[Path(str(source))], force=force)
    src = load_source(source, arch=arch, weights=weights, allow_pickle=allow_pickle)
    model = src.model
    spec = _spec(src, input_shape)
    dtype, device = model_dtype(model)
    tol = default_tolerance(dtype) if tolerance is None else tolerance
    params_before, buffers_before = count_tensors(model)
    t1 = time.perf_counter()
    args = as_args(make_input(spec, dtype=dtype, device=device, seed=seed))
    analysis = analyse(model, args)
    t2 = time.perf_counter()
    apply_plan(model, analysis.plan)
    t3 = time.perf_counter()
    with torch.no_grad():
        fused_out = model(*args)
    error = compare(analysis.output, fused_out)
    del analysis.output, fused_out
    t4 = time.perf_counter()
    params_after, buffers_after = count_tensors(model)
    report = ConvertReport(
        source=str(source), output=str(out_path) if out_path else None, arch=src.arch, weights=src.weights,
        input=spec, dtype=str(dtype).replace("torch.", ""), plan=analysis.plan,
        params_before=params_before, params_after=params_after,
        buffers_before=buffers_before, buffers_after=buffers_after, error=error, tolerance=tol,
        notes=list(src.notes),
    )
    if src.weights == "none":
        report.notes.append("random initialisation (--weights none): no pretrained weights were loaded")
    if error.mismatch or not (error.rel <= tol):
        raise FoldError(
            f"the fused model's output differs from the original's (relative error {error.rel:.3g}, "
            f"tolerance {tol:g}{'; ' + error.mismatch if error.mismatch else ''}); nothing was written. "
            "This is a bug in bnfuse or a model it does not understand: please report it with the model"
        )
    if out_path is not None:
        # mirror the input: a pickled module stays one, except in .safetensors (tensors only)
        form = save_as or ("module" if src.kind == "module" and out_path.suffix != ".safetensors" else "state-dict")
        if form == "state-dict" and not src.arch:
            raise UsageError(
                f"{source} is a pickled module of unknown architecture: a state_dict output ({out_path.name}) "
                "could not be rebuilt; pass --arch, or write a .pth with --save-as module"
            )
        meta = {
            "format": "bnfuse",
            "version": __version__,
            "arch": src.arch,
            "arch_kwargs": src.metadata.get("arch_kwargs", {}),
            "folds": [f.to_list() for f in _all_folds(src, analysis.plan)],
            "input": spec.to_dict(),
            "dtype": report.dtype,
            "source": str(source),
        }
        sd = model.state_dict()
        report.form = form.replace("-", "_")
        report.file_size = write_checkpoint(
            out_path, state_dict=sd, metadata=meta, module=model if form == "module" else None
        )
    t5 = time.perf_counter()
    report.seconds = {"load": t1 - t0, "analyse": t2 - t1, "fold": t3 - t2, "check": t4 - t3, "save": t5 - t4,
                      "total": t5 - t0}
    return report


def _all_folds(src: Source, plan: Plan) -> list[Any]:
    """Folds of this run plus those of the conversion that produced the source, if any."""
    from .graph import Fold

    earlier = [Fold.from_list(r) for r in src.metadata.get("folds", [])]
    return earlier + list(plan.folds)

"""From one recorded forward pass to a plan: each pass of the table finds its items in it.

No static tracing: detection models and data-dependent control flow work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import BnfuseError
from .escape import escapes
from .passes import PASSES
from .plan import Analysis, Plan
from .record import Recorder, tensors_in

if TYPE_CHECKING:
    from torch import nn

    from .record import InputCallback

__all__ = ["analyse"]


def _raise_if_model_fails(
    model: "nn.Module", args: tuple[Any, ...], kwargs: "dict[str, Any] | None", exc: Exception
) -> None:
    """After a failed recording run: when the model fails without recording too, the example
    input does not suit it (the user's to fix), so say so without a traceback."""
    import torch

    from ..errors import UsageError

    try:
        with torch.no_grad():
            model(*args, **(kwargs or {}))
    except Exception:
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors_in((args, kwargs or {}))) or "no tensors"
        raise UsageError(
            f"{type(model).__name__} fails on the example input ({shapes}): {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; give an input it accepts "
            "(--input-shape, or example_input=)"
        ) from exc


def _record(model: "nn.Module", args: tuple[Any, ...], kwargs: "dict[str, Any] | None",
            on_input: "InputCallback | None") -> tuple[Recorder, Any]:
    """Run the model once under recording; its output, and the recorder with the events."""
    import torch

    if model.training:
        raise BnfuseError("the model is in training mode: call model.eval() before analysing it")
    if isinstance(model, torch.jit.ScriptModule):
        raise BnfuseError(
            f"{type(model).__name__} is a TorchScript module: bnfuse follows the data flow of an "
            "eager model; load the model's Python class and its state_dict instead"
        )
    rec = Recorder(model, on_input)
    try:
        with torch.no_grad(), rec.mode:
            output = model(*args, **(kwargs or {}))
    except BnfuseError:
        raise
    except Exception as exc:
        rec.close()
        _raise_if_model_fails(model, args, kwargs, exc)
        raise  # the model runs without recording: a bnfuse bug, keep the traceback
    finally:
        rec.close()
    return rec, output


def analyse(model: "nn.Module", args: tuple[Any, ...], kwargs: "dict[str, Any] | None" = None, *,
            on_input: "InputCallback | None" = None, options: "dict[str, Any] | None" = None) -> Analysis:
    """Run ``model(*args, **kwargs)`` once under recording and return the plan and the output.

    The model must already be in eval mode.  Nothing is changed.  ``on_input(name, module, x)``
    sees the first input of every producer and norm call, outside the recording.  Each pass of
    the table (:data:`bnfuse_cli.engine.passes.PASSES`) that is on finds its items in that one
    recording, in the table's order.  ``options`` are the passes' options by name (``merge``,
    ``clone_shared``, ...; a pass's :class:`~bnfuse_cli.engine.passes.Option` gives the default of
    each one not given); they reach every pass as ``plan.options``.
    """
    rec, output = _record(model, args, kwargs, on_input)
    out_ids = escapes(model, output, rec)
    plan = Plan(options=dict(options or {}), passes=tuple(PASSES))
    for p in PASSES:
        if p.on(plan):
            p.find(model, rec, out_ids, plan)
    return Analysis(plan=plan, output=output)

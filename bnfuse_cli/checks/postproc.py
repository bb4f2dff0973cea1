"""Judging a model before its post-processing: the tensors that feed data-dependent selection.

Detection models end in score thresholds, top-k and NMS.  A rounding-level difference between the
original and the fused model can keep or drop a box there, so their final outputs may differ in
structure although both compute the same scores.  :class:`SelectionProbe` runs a forward pass
under a ``TorchFunctionMode`` that marks the results of data-dependent selection (``topk``,
``sort``, ``nonzero``, ``masked_select``, NMS, a boolean-mask index, ``where(cond)``) and
everything computed from them, and keeps the floating-point tensors that enter a selection
without being marked: the scores and box regressions of every head, before anything was chosen
from them.  Those have the same structure in both models on the same input and are judged like
any output; the final outputs count too where their structure agrees.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["SelectionProbe", "SELECTIONS"]

#: ops whose result depends on the values of their input, not just its shape (op names as torch gives them)
SELECTIONS = frozenset(
    "topk sort argsort nonzero argwhere masked_select unique unique_consecutive nms batched_nms".split())


#: layer ops whose further arguments are weights, biases or statistics (a fold changes them)
_LAYER_OPS = frozenset("conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear batch_norm "
                       "layer_norm group_norm instance_norm".split())


def _name(func: Any) -> str:
    name = getattr(func, "__name__", "") or ""
    return name.split(".")[0].strip("_") if name.startswith("__") else name.split(".")[0]


class SelectionProbe:
    """Use as a context manager around a forward pass; ``kept`` then lists, in order and once each, the
    floating-point tensors not computed from any selection that entered a selection, or an op together
    with a selection's result (box regressions gathered by top-k indices): what post-processing reads."""

    def __init__(self) -> None:
        self.kept: list["torch.Tensor"] = []
        #: id(tensor) -> weak reference: the tensors computed from a selection (identity, not equality)
        self._tainted: "dict[int, weakref.ref[torch.Tensor]]" = {}
        self._mode: Any = None
        self._seen: "dict[int, torch.Tensor]" = {}

    def _is_selection(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        import torch

        if name in SELECTIONS:
            return True
        if name == "where":
            return len(args) + len(kwargs) == 1
        if name == "getitem" and len(args) > 1:  # x[mask]: a boolean index selects by value
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        return False

    def _has(self, t: "torch.Tensor") -> bool:
        ref = self._tainted.get(id(t))
        return ref is not None and ref() is t

    def _on_op(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        from ..engine.record import tensors_in

        import torch

        ins = tensors_in((args, kwargs))
        tainted = any(self._has(t) for t in ins)
        if name in _LAYER_OPS and args:  # a layer's weights and statistics are not values being chosen
            ins = [args[0]] if isinstance(args[0], torch.Tensor) else []
        written = args[0] if (name.endswith("_") or name == "setitem") and args and isinstance(args[0], torch.Tensor) \
            else None
        if tainted or self._is_selection(name, args, kwargs):  # values about to be chosen, or chosen with
            for t in ins:
                if t is written:
                    continue  # overwritten by the op, not read
                if t.is_floating_point() and not self._has(t) and id(t) not in self._seen:
                    self._seen[id(t)] = t  # held, so that its id stays its own
                    self.kept.append(t.detach().clone())
            tainted = True
        if tainted:
            for t in tensors_in(out) + ([written] if written is not None else []):
                self._tainted[id(t)] = weakref.ref(t)  # (written in place: the target now holds chosen values)

    def __enter__(self) -> "SelectionProbe":
        from torch.overrides import TorchFunctionMode

        probe = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                probe._on_op(_name(func), args, kwargs, out)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self._mode = None
        self._tainted, self._seen = {}, {}

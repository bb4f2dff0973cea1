"""Where a tensor leaves the forward pass other than through an op: returned by the model, or
kept on one of its modules.  A producer output that escapes this way must not be folded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .record import Recorder

__all__ = ["escapes"]


def _reachable_tensors_in(obj: Any, *, limit: int = 20000) -> list["torch.Tensor"]:
    """Every tensor inside ``obj``: pytree containers, and the fields of dataclasses and plain objects.

    For what the model returns or keeps on its modules: a dataclass or a custom output class that
    pytree does not know still hands the tensor to the caller, so a leaf that pytree cannot open is
    opened by its attributes.  Modules are not entered; at most ``limit`` objects are visited.
    """
    import dataclasses

    import torch
    from torch import nn
    from torch.utils._pytree import tree_leaves

    found: list["torch.Tensor"] = []
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = [(obj, 0)]
    visited = 0
    while todo and visited < limit:
        o, depth = todo.pop()
        visited += 1
        if isinstance(o, torch.Tensor):
            found.append(o)
            continue
        if depth > 8 or id(o) in seen or isinstance(o, (str, bytes, int, float, bool, nn.Module, type)) or o is None:
            continue
        seen.add(id(o))
        if isinstance(o, (set, frozenset)):  # not a pytree node
            children = list(o)
        elif dataclasses.is_dataclass(o):
            children = [getattr(o, f.name, None) for f in dataclasses.fields(o)]
        else:
            children = tree_leaves(o)
            if len(children) == 1 and children[0] is o:  # a leaf pytree cannot open: a plain object's attributes
                children = list(vars(o).values()) if hasattr(o, "__dict__") and not callable(o) else []
        todo.extend((c, depth + 1) for c in children)
    return found


def escapes(model: "nn.Module", output: Any, rec: "Recorder") -> dict[int, str]:
    """id(tensor record) -> how the tensor leaves the forward pass other than through an op:
    returned by the model, or kept as an attribute of one of its modules (``self.feat = y``)."""
    from torch import nn

    escapes: dict[int, str] = {}

    def mark(t: Any, why: str) -> None:
        info = rec.lookup(t)
        if info is not None:
            escapes.setdefault(id(info), why)

    for t in _reachable_tensors_in(output):
        mark(t, "returned by the model")
    internal = set(vars(nn.Module()))
    for name, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if attr in internal or value is None or isinstance(value, (nn.Module, str, int, float, bool)):
                continue
            where = f"{name}.{attr}" if name else attr
            for t in _reachable_tensors_in(value, limit=2000):
                mark(t, f"kept in the attribute {where}")
    return escapes


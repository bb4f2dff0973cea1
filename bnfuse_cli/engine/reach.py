"""Where a per-channel map's output goes, on the recorded data flow: through layout ops (``flatten``,
``transpose``, ``permute``) and means over other axes (global average pooling: ``x.mean((2, 3))``,
``adaptive_avg_pool2d(x, 1)``, ResMLP's ``x.mean(1)`` over tokens) to the one Linear that reads its
channels as its features, or what stops it on the way.

A per-channel affine map ``a * y + b`` commutes with each of those ops as long as the channel axis
stays whole (a mean over other axes averages each channel alone), so it folds forward into that
Linear exactly (FastViT's ``bn(x).flatten(2).transpose(-2, -1)`` before ``qkv``; a BatchNorm before
``fc(flatten(avgpool(x)))``; ResMLP's final ``Affine`` before its pooled head).  The passes that fold
such a map (a BatchNorm, a scale module) share this walk and the judge's steps for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .record import where
from .steps import Layout, Mean

if TYPE_CHECKING:
    from .record import Call, Recorder

__all__ = ["OPS", "Reach", "follow", "move_axis", "site_steps"]

#: the ops followed, as :attr:`bnfuse_cli.engine.record.Recorder.moved` records them
OPS = ("flatten", "transpose", "permute", "mean", "mean_keepdim")


def move_axis(axis: int, shape: "tuple[int, ...]", op: str, args: "tuple[int, ...]") -> "int | None":
    """Where ``axis`` of a tensor of ``shape`` goes under one op of :data:`OPS`; None when the op mixes
    it with other positions (a flatten with an axis longer than 1, a mean over it)."""
    rank = len(shape)
    if op == "transpose" and len(args) == 2:
        a, b = (d % rank for d in args)
        return b if axis == a else a if axis == b else axis
    if op == "permute" and sorted(d % rank for d in args) == list(range(rank)):
        return [d % rank for d in args].index(axis)
    if op == "flatten" and len(args) <= 2:
        start, end = (args + (0, -1)[len(args):])[:2] if args else (0, -1)
        start, end = start % rank, end % rank
        if start <= axis <= end and start != end:
            others = [shape[d] for d in range(start, end + 1) if d != axis]
            return start if all(s == 1 for s in others) else None
        return axis - (end - start) if axis > end else axis
    if op in ("mean", "mean_keepdim") and args:
        if axis in args:
            return None
        return axis if op == "mean_keepdim" else axis - sum(d < axis for d in args)
    return None


@dataclass
class Reach:
    """Where a map's output goes: the Linear ``reader`` that reads its channels as features through
    ``steps`` ((op, int args), in order); or, with no reader, ``why`` names what stops it (another
    reader, a non-linear op) once at least one step was followed (None: nothing of this kind follows
    the map at all, which is for its pass to say)."""

    reader: "Call | None" = None
    steps: "list[tuple[str, tuple[int, ...]]]" = field(default_factory=list)
    why: "str | None" = None


def _path(steps: "list[tuple[str, tuple[int, ...]]]") -> str:
    return ", ".join(f"{op}({', '.join(map(str, args))})" for op, args in steps)


def follow(rec: "Recorder", y: Any, axis: int, escapes: "dict[int, str]") -> Reach:
    """From the map's output ``y`` (a tensor record, its channels on ``axis``) through ops of :data:`OPS`,
    each result read by the next op alone, to the one Linear that reads the last of them with those
    channels as its features (its last axis)."""
    steps: list[tuple[str, tuple[int, ...]]] = []
    x = y
    while True:
        reads = rec.reads.get(id(x), [])
        if steps and id(x) in escapes:
            return Reach(why=f"after {_path(steps)}, its output is also {escapes[id(x)]}")
        if len(reads) != 1:
            if not steps and (not reads or id(x) not in rec.moved):
                return Reach()  # no path through layout ops: the fold pass's reason stands
            if not reads:
                return Reach(why=f"after {_path(steps)}, its output is read by nothing bnfuse saw")
            others = ", ".join(dict.fromkeys(f"{op} in {where(r)}" for r, op in reads))
            return Reach(why=f"{'after ' + _path(steps) + ', ' if steps else ''}its output is read {len(reads)} times "
                             f"({others}), not by one Linear alone")
        reader, op = reads[0]
        if op == "linear" and reader is not None and reader.input is x:
            if axis == len(x.shape) - 1:
                return Reach(reader, steps)
            return Reach(why=f"after {_path(steps)}, {reader.name} reads axis {len(x.shape) - 1} as its features, "
                             f"not the channels (axis {axis})") if steps else Reach()
        nxt = rec.moved.get(id(x))
        if nxt is None:
            return Reach(why=f"after {_path(steps)}, its output goes to {op} in {where(reader)}, not to a Linear") \
                if steps else Reach()
        out, mop, args = nxt
        moved = move_axis(axis, tuple(x.shape), mop, args)
        if moved is None:
            return Reach(why=f"after {_path(steps)}, {mop}{args} mixes its channels with other positions") \
                if steps else Reach()
        steps.append((mop, args))
        axis, x = moved, out


def site_steps(steps: "tuple[tuple[str, tuple[int, ...]], ...]") -> "tuple[Any, ...]":
    """The judge's steps for ``steps`` (:mod:`bnfuse_cli.engine.steps`)."""
    return tuple(Mean(args, op == "mean_keepdim") if op.startswith("mean") else Layout(op, args) for op, args in steps)

"""Where each BatchNorm folds: into the layer before it (backward) or the layer after it (forward),
or the reason it stays; the finding half of the fold pass.

A BatchNorm folds backward into the layer before it only when, for every call, its input is
exactly that layer's output (or a reshape of it that keeps the channel axis, or a channel-axis cat
of several layers' outputs, each then taking its slice of the statistics), nothing else read that
output (no residual, no other concat, no return), and every call of that layer feeds this
BatchNorm.  Otherwise it may fold forward into the layer after it, when that layer alone reads its
output and does not zero-pad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...patterns import is_norm_like, norm_rule, producer_row, producer_rule
from ...plan import Plan, Skip
from ...record import Call, Recorder, pretty_op, where
from ...guards import channel_count, norm_problem, producer_problem, zero_pads

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Fold", "find_folds"]


#: the direction words of bnfuse before 0.2, as files written then record them
_OLD_DIRECTIONS = {"previous": "backward", "next": "forward"}


@dataclass(frozen=True)
class Fold:
    """One BatchNorm folded into one layer."""

    norm: str
    producer: str
    #: "backward": the BN reads the layer's output and folds into the layer before it; "forward":
    #: the layer reads the BN's output and the BN folds into the layer after it
    direction: str = "backward"
    #: what stays in the BN's place: "identity", or "activation" (timm BatchNormAct)
    replacement: str = "identity"
    #: the BN channels ``[start, stop)`` this producer gives, when a concatenation of several
    #: producers feeds the BN (MixNet's MixedConv2d); None: all of them
    channels: "tuple[int, int] | None" = None

    def to_list(self) -> list[str]:
        row = [self.producer, self.norm, self.direction, self.replacement]
        if self.channels is not None:
            row += [str(self.channels[0]), str(self.channels[1])]
        return row

    @classmethod
    def from_list(cls, row: "list[str]") -> "Fold":
        producer, norm, direction, replacement, *rest = row
        channels = (int(rest[0]), int(rest[1])) if len(rest) == 2 else None
        direction = _OLD_DIRECTIONS.get(direction, direction)
        if direction not in ("backward", "forward"):
            raise ValueError(f"fold direction {direction!r} is neither backward nor forward")
        return cls(norm=norm, producer=producer, direction=direction, replacement=replacement, channels=channels)


@dataclass
class _Segment:
    """A producer call whose output gives the norm's channels ``[start, stop)``."""

    call: Call
    #: the producer's output tensor
    src: Any
    start: int
    stop: int
    #: the op between producer and norm ("flatten", "cat", ...), None when the norm reads it directly
    via: "str | None" = None


def _segments(x: Any, norm: "nn.Module", rec: Recorder) -> "tuple[list[_Segment] | None, str | None]":
    """How the norm's input ``x`` is made of producer outputs, or why it is not.

    Three shapes fold exactly: ``x`` is a producer output; ``x`` is a reshape of one that keeps
    its channel axis as axis 1 of a 2-D ``x``; ``x`` is a cat of producer outputs along axis 1.
    """
    import math

    channels = channel_count(norm)
    pcall = rec.produced.get(id(x))
    if pcall is not None:
        if is_norm_like(pcall.module):
            return None, rec.describe_origin(x)
        return [_Segment(pcall, x, 0, channels)], None
    if id(x) in rec.reshaped:
        src, op = rec.reshaped[id(x)]
        pcall = rec.produced[id(src)]
        row = producer_row(pcall.module)
        if is_norm_like(pcall.module) or row is None:
            return None, rec.describe_origin(x)
        # a row-major reshape keeps "BN axis 1 <-> producer channel axis" exactly when the
        # dims after axis 1 of x (and, for a conv, after its channel axis) all have size 1
        if x.dim() < 2 or math.prod(x.shape[2:]) != 1:
            keeps = False
        elif row.kind == "linear":
            keeps = src.dim() >= 1 and x.shape[1] == src.shape[-1]
        else:
            keeps = src.dim() >= 2 and tuple(x.shape[:2]) == tuple(src.shape[:2]) and math.prod(src.shape[2:]) == 1
        if not keeps or x.dtype != src.dtype:
            return None, (
                f"follows {pretty_op(op)} of {pcall.name}'s output {tuple(src.shape)} to "
                f"{tuple(x.shape)}, which does not keep its channel axis as the BatchNorm's axis 1"
            )
        return [_Segment(pcall, src, 0, channels, pretty_op(op))], None
    if id(x) in rec.cats:
        parts, dim = rec.cats[id(x)]
        if not isinstance(dim, int) or dim % max(x.dim(), 1) != 1:
            return None, rec.describe_origin(x) + f" (a cat along axis {dim}, not the channel axis)"
        segs: list[_Segment] = []
        offset = 0
        for part in parts:
            pcall = rec.produced[id(part)]
            row = producer_row(pcall.module)
            if is_norm_like(pcall.module) or row is None:
                return None, rec.describe_origin(x)
            if part.dim() != x.dim() or (row.kind == "linear" and part.dim() != 2):
                return None, rec.describe_origin(x) + f" ({pcall.name}'s channel axis is not axis 1)"
            segs.append(_Segment(pcall, part, offset, offset + int(part.shape[1]), "cat"))
            offset += int(part.shape[1])
        return segs, None
    return None, rec.describe_origin(x)


def _other_reader(
    reads: list[tuple["Call | None", str]], norm: "nn.Module", via: "str | None"
) -> "tuple[Call | None, str] | None":
    """The first read of a tensor by anything but the norm (or, for a tensor the norm reads
    through a reshape or cat, anything but that one op), or None."""
    if via is None:
        return next(((r, op) for r, op in reads if r is None or r.module is not norm), None)
    if len(reads) <= 1:
        return None
    return next(((r, op) for r, op in reads if op != via), reads[1])


def _try_backward(
    norm: "nn.Module", calls: list[Call], rec: Recorder, out_ids: dict[int, str]
) -> "tuple[list[tuple[nn.Module, tuple[int, int]]], str | None]":
    """Producers this norm folds into, each with the norm channels it gives, or why it cannot
    fold backward."""
    ranges: dict[int, tuple[int, int]] = {}
    producers: list["nn.Module"] = []
    fed: dict[int, _Segment] = {}
    for call in calls:
        x = call.input
        segs, why = _segments(x, norm, rec)
        if segs is None:
            return [], why
        via = segs[0].via
        if via is not None:  # the reshaped or concatenated tensor itself
            other = _other_reader(rec.reads.get(id(x), []), norm, None)
            what = f"the {via} of {', '.join(dict.fromkeys(s.call.name for s in segs))}"
            if other is not None:
                return [], f"{what} is also read by {other[1]} in {where(other[0])}"
            if id(x) in out_ids:
                return [], f"{what} is also {out_ids[id(x)]}"
        for seg in segs:
            pname = seg.call.name
            other = _other_reader(rec.reads.get(id(seg.src), []), norm, via)
            if other is not None:
                return [], f"output of {pname} is also read by {other[1]} in {where(other[0])}"
            if id(seg.src) in out_ids:
                return [], f"output of {pname} is also {out_ids[id(seg.src)]}"
            p = seg.call.module
            if ranges.setdefault(id(p), (seg.start, seg.stop)) != (seg.start, seg.stop):
                return [], f"{pname} gives different channels of this BatchNorm on different calls"
            fed[id(seg.src)] = seg
            if p not in producers:
                producers.append(p)
    channels = channel_count(norm)
    for p in producers:
        pname = rec.names.get(id(p), "?")
        pcalls = rec.calls.get(id(p), [])
        if any(id(c.output) not in fed for c in pcalls):
            return [], f"{pname} is called {len(pcalls)} times and not every output feeds this BatchNorm"
        problem = producer_problem(p, rec)
        if problem:
            return [], problem
        rule, _ = producer_rule(p)
        for c in pcalls:
            out, seg = c.output, fed[id(c.output)]
            if seg.via not in (None, "cat"):
                continue  # a reshape: its channel axis was checked in _segments
            if rule.kind == "linear" and out.dim() != 2:
                return [], (
                    f"the output of {pname} is {out.dim()}-D {tuple(out.shape)}: {type(norm).__name__} "
                    "normalises axis 1, not the Linear's feature axis (the last one)"
                )
            want = seg.stop - seg.start
            if out.dim() < 2 or out.shape[1] != want or (seg.via is None and want != channels):
                got = out.shape[1] if out.dim() > 1 else "?"
                return [], f"{pname} output has {got} channels, the BatchNorm {channels}"
    if max(stop for _, stop in ranges.values()) != channels:
        names = ", ".join(rec.names.get(id(p), "?") for p in producers)
        return [], f"the cat of {names} does not give the BatchNorm's {channels} channels"
    return [(p, ranges[id(p)]) for p in producers], None


def _try_forward(
    norm: "nn.Module", calls: list[Call], rec: Recorder, out_ids: dict[int, str], replacement: str
) -> "tuple[nn.Module | None, str | None]":
    """The layer after this norm that it folds into, or the reason it cannot fold forward.

    The reason is None when no Conv/Linear reads the norm's output at all (no candidate).
    """
    if replacement != "identity":
        return None, None  # drop/activation after the norm: never a forward candidate
    target: "nn.Module | None" = None
    norm_outputs = {id(c.output) for c in calls}
    problems: list[str] = []
    for call in calls:
        y = call.output
        readers = rec.reads.get(id(y), [])
        if not readers:
            return None, None
        r0, op0 = readers[0]
        if r0 is None or id(r0.module) not in rec.interesting or is_norm_like(r0.module) or r0.input is not y:
            # not followed by a Conv/Linear: no forward candidate, and the reason says what follows
            return None, f"its output goes to {op0} in {where(r0)}, not straight into a Conv/Linear"
        if target is not None and r0.module is not target:
            return None, "its outputs feed different layers"
        target = r0.module
        others = [(r, op) for r, op in readers if r is None or r.module is not r0.module]
        if others:
            r, op = others[0]
            problems.append(f"its output also feeds {op} in {where(r)}")
        elif id(y) in out_ids:
            problems.append(f"its output is also {out_ids[id(y)]}")
    if target is None:
        return None, None
    if problems:
        return None, problems[0]
    tname = rec.names.get(id(target), "?")
    if any(id(c.input) not in norm_outputs for c in rec.calls.get(id(target), [])):
        return None, f"{tname} is called on other inputs too"
    problem = producer_problem(target, rec)
    if problem:
        return None, problem
    rule, _ = producer_rule(target)
    if rule is None or not rule.next_ok:
        return None, f"folding forward into {type(target).__name__} {tname} is not supported"
    if rule.kind == "conv" and zero_pads(target):
        return None, (
            f"the conv after it, {tname}, pads with zeros, and zeros of the un-normalised signal are not zeros "
            "after the BatchNorm, so folding forward is not exact"
        )
    for c in calls:
        if rule.kind == "linear" and c.output.dim() != 2:
            return None, (
                f"the Linear after it, {tname}, reads a {c.output.dim()}-D tensor: its feature axis "
                "(the last) is not the BatchNorm's channel axis (axis 1)"
            )
    return target, None


def _unfoldable(module: "nn.Module", rule: Any, reason: "str | None", rec: Recorder) -> "str | None":
    """Why this BatchNorm cannot fold at all, whatever its neighbours (None: it may)."""
    if rule is None:
        return reason or "not foldable"
    problem = norm_problem(module, rec)  # first: a BN read functionally is never called
    if problem:
        return problem
    calls = rec.calls.get(id(module), [])
    if not calls:
        return "never called on the example input (unused, or in a branch not taken)"
    if any(c.training for c in calls):
        return ("it runs in training mode during the forward (the model switches it with .train()), "
                "so it normalises with batch statistics")
    return None


def _plan_norm(name: str, module: "nn.Module", rec: Recorder, out_ids: dict[int, str], plan: Plan,
               used_producers: set[int]) -> None:
    """Fold one BatchNorm into the layer(s) before it, else into the layer after it, else skip it."""
    rule, reason = norm_rule(module)
    why = _unfoldable(module, rule, reason, rec)
    if why is not None:
        plan.skipped.append(Skip(name, why))
        return
    calls = rec.calls[id(module)]
    producers, back_reason = _try_backward(module, calls, rec, out_ids)
    if producers:
        if not any(id(p) in used_producers for p, _ in producers):
            whole = (0, channel_count(module))
            for p, chans in producers:
                used_producers.add(id(p))
                plan.folds.append(Fold(name, rec.names[id(p)], "backward", rule.replacement,
                                       channels=None if chans == whole else chans))
            return
        back_reason = "its producer already absorbs another BatchNorm"
    target, next_reason = _try_forward(module, calls, rec, out_ids, rule.replacement)
    if target is not None:
        plan.folds.append(Fold(name, rec.names[id(target)], "forward", rule.replacement))
        return
    plan.skipped.append(Skip.of(name, back_reason, next_reason))


def find_folds(model: "nn.Module", rec: Recorder, out_ids: "dict[int, str]", plan: Plan) -> None:
    """Every BatchNorm-like layer of ``model``: listed in ``plan.norms``, and folded or left with why."""
    seen: set[int] = set()
    used_producers: set[int] = set()
    for name, module in model.named_modules():
        if not is_norm_like(module) or id(module) in seen:
            continue
        seen.add(id(module))
        plan.norms.append(name)
        _plan_norm(name, module, rec, out_ids, plan, used_producers)

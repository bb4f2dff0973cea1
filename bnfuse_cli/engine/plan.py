"""The plan: what each pass would do and what it would leave, and why, and its JSON form.

A :class:`Plan` is what the passes of :data:`bnfuse_cli.engine.passes.PASSES` decide in
:func:`bnfuse_cli.engine.analyse.analyse` and carry out; fused files store its items as rows.  The
plan holds the table it was made with (``passes``, given by ``analyse``) and knows no pass by its
module: each pass's items are its own types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["Skip", "Plan", "Analysis"]


@dataclass(frozen=True)
class Skip:
    """One BatchNorm left in place, and why (the fold pass's refusal, which later passes of the table
    may take up or explain further)."""

    norm: str
    reason: str

    #: how a reason joins what stops the fold into the layer before the BatchNorm and what stops the one into
    #: the layer after it (the one place the sentence is made and read back)
    AFTER: ClassVar[str] = "; nor can it fold into the layer after it: "

    @classmethod
    def of(cls, norm: str, back: "str | None", forward: "str | None") -> "Skip":
        """A BatchNorm that folds neither way, its reason naming both blockers (either may be missing)."""
        return cls(norm, f"{back}{cls.AFTER}{forward}" if back and forward else back or forward or "not foldable")

    @property
    def parts(self) -> "tuple[str, str | None]":
        """(what stops the fold before, what stops the one after; None when the reason names no fold after)."""
        back, sep, forward = self.reason.partition(self.AFTER)
        return back, (forward if sep else None)


@dataclass
class Plan:
    """What the passes would do and what they would leave, by pass (the rows of
    :data:`bnfuse_cli.engine.passes.PASSES`): ``items[name]`` its planned items, ``left[name]`` what
    it leaves with the reasons.  ``norms`` lists every BatchNorm-like layer found; a BatchNorm
    absorbed by a merge is listed in a merge, not among the fold pass's ``skipped``."""

    norms: list[str] = field(default_factory=list)
    items: "dict[str, list[Any]]" = field(default_factory=dict)
    left: "dict[str, list[Any]]" = field(default_factory=dict)
    #: the items of each pass applied in each round, in order: a merge can make a fold possible (a
    #: BatchNorm after a merged sum), so a fused file is rebuilt round by round
    rounds: "list[dict[str, int]]" = field(default_factory=list)
    #: what the passes were asked (their options, by name: ``clone_shared``); not recorded in files
    options: "dict[str, Any]" = field(default_factory=dict)
    #: the table of passes the plan was made with, in order (:data:`bnfuse_cli.engine.passes.PASSES`)
    passes: "tuple[Any, ...]" = ()
    #: a pass left something this round that this round's rewrites may make possible (a layer scale
    #: after a BatchNorm being folded): the rounds go on
    more: bool = False

    def of(self, name: str) -> list[Any]:
        """The items of the pass called ``name`` (a live list)."""
        return self.items.setdefault(name, [])

    def left_by(self, name: str) -> list[Any]:
        """What the pass called ``name`` leaves, with the reasons (a live list)."""
        return self.left.setdefault(name, [])

    def add_round(self, step: "Plan") -> None:
        """Append one round's items (its refusals replace the earlier ones: they are the model's now)."""
        self.passes, self.options = self.passes or step.passes, self.options or dict(step.options)
        for name, items in step.items.items():
            self.of(name).extend(items)
        counts = {name: len(items) for name, items in step.items.items() if items}
        if counts or not self.rounds:
            self.rounds.append(counts)
        self.left = {name: list(v) for name, v in step.left.items()}

    def round_items(self) -> "list[dict[str, list[Any]]]":
        """The items of each round, by pass (one round holding everything when none was recorded)."""
        if not self.rounds:
            return [{n: list(v) for n, v in self.items.items() if v}]
        out, start = [], {}
        for counts in self.rounds:
            step = {}
            for name, n in counts.items():
                i = start.get(name, 0)
                step[name], start[name] = self.of(name)[i:i + n], i + n
            out.append(step)
        return out

    # the two passes bnfuse has always had, by their old names (the API's ``result.folds``)
    folds = property(lambda self: self.of("fold"), lambda self, v: self.items.__setitem__("fold", list(v)))
    skipped = property(lambda self: self.left_by("fold"), lambda self, v: self.left.__setitem__("fold", list(v)))
    merges = property(lambda self: self.of("merge"), lambda self, v: self.items.__setitem__("merge", list(v)))
    merge_skips = property(lambda self: self.left_by("merge"),
                           lambda self, v: self.left.__setitem__("merge", list(v)))

    def to_dict(self) -> dict[str, Any]:
        """The plan as the JSON reports give it: counts, then each pass's items and refusals."""
        out: dict[str, Any] = {
            "bn_found": len(self.norms),
            "bn_folded": len(self.folded_norms),
            "bn_skipped": len(self.norms) - len(self.folded_norms),
        }
        for p in self.passes:
            out[p.key] = [p.to_json(i) for i in self.of(p.name)]
            out[p.left_key] = [p.left_json(x) for x in self.left_by(p.name)]
        return out

    @property
    def folded_norms(self) -> list[str]:
        """BatchNorms gone from the model: absorbed by any pass's items."""
        return list(dict.fromkeys(n for p in self.passes for i in self.of(p.name) for n in p.absorbed(i)))


@dataclass
class Analysis:
    plan: Plan
    #: the model's output on the example input, taken during the recording run
    output: Any


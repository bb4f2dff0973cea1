"""The plan types: what folds into what, what stays and why, and their JSON form.

A :class:`Plan` is what the passes of :data:`bnfuse_cli.engine.passes.PASSES` decide in
:func:`bnfuse_cli.engine.analyse.analyse` and carry out; fused files store its items as rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Fold", "Skip", "Branch", "Merge", "MergeSkip", "Plan", "Analysis"]


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


@dataclass(frozen=True)
class Skip:
    """One BatchNorm left in place, and why."""

    norm: str
    reason: str


@dataclass(frozen=True)
class Branch:
    """One branch of a sum that merges into one conv: ``conv`` (a conv, its BN folded into it
    first), ``norm`` (a BatchNorm on the shared input) or ``identity`` (the input itself)."""
    # a ``conv`` branch written as two children of the block (``self.bn1(self.conv1(x))``) names
    # its conv as ``module`` and the BatchNorm after it as ``norm``

    kind: str
    #: the module that computes the branch (the block's child), None for ``identity``
    module: "str | None" = None
    #: the BatchNorm the branch absorbs: the BN of a ``norm`` branch, or the separate BN child of a flat
    #: ``conv`` branch (folded into its conv first, as a Fold)
    norm: "str | None" = None
    #: what the sum multiplies the branch by, innermost first: ("mul", a number or a held tensor's
    #: name, one value or one per channel), ("div", a number), ("module", a per-channel scale module)
    scale: "tuple[tuple[str, Any], ...]" = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "module": self.module, "norm": self.norm}
        if self.scale:
            out["scale"] = [[op, v] for op, v in self.scale]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Branch":
        scale = tuple((str(op), v if isinstance(v, str) else float(v)) for op, v in d.get("scale", ()))
        if any(op not in ("mul", "div", "module") or op == "module" and not isinstance(v, str) for op, v in scale):
            raise ValueError(f"unknown branch scale {d.get('scale')!r}")
        return cls(str(d["kind"]), d.get("module"), d.get("norm"), scale)


@dataclass(frozen=True)
class Merge:
    """A sum of parallel branches reading one tensor, merged into one conv placed at ``into``
    (the main branch's module), inside ``block`` (the module whose forward computes the sum;
    ``node`` names the sum in its traced graph)."""

    block: str
    node: str
    into: str
    branches: tuple[Branch, ...]
    #: where the merged conv is placed when not at ``into``: the block itself when its forward was
    #: the sum alone (RepViT's ``RepVggDw``), or the block's child that held only the merged branches
    #: (MobileOne's ``conv_kxk`` list), so the forward reaches it in one lookup
    at: str = ""

    @property
    def norms(self) -> list[str]:
        return [b.norm for b in self.branches if b.norm]

    @property
    def place(self) -> str:
        """The merged conv's name in the fused model."""
        return self.at or self.into

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "node": self.node, "into": self.into,
                "branches": [b.to_dict() for b in self.branches], **({"at": self.at} if self.at else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Merge":
        return cls(str(d["block"]), str(d["node"]), str(d["into"]),
                   tuple(Branch.from_dict(b) for b in d["branches"]), str(d.get("at", "")))


@dataclass(frozen=True)
class MergeSkip:
    """A sum of branches left as it is, and why."""

    block: str
    reason: str


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
    #: what the passes were asked (``clone_shared``); not recorded in files
    options: "dict[str, Any]" = field(default_factory=dict)
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
        from .passes import PASSES

        out: dict[str, Any] = {
            "bn_found": len(self.norms),
            "bn_folded": len(self.folded_norms),
            "bn_skipped": len(self.norms) - len(self.folded_norms),
        }
        for p in PASSES:
            out[p.key] = [p.to_json(i) for i in self.of(p.name)]
            out[p.left_key] = [p.left_json(x) for x in self.left_by(p.name)]
        return out

    @property
    def folded_norms(self) -> list[str]:
        """BatchNorms gone from the model: absorbed by any pass's items."""
        from .passes import PASSES

        return list(dict.fromkeys(n for p in PASSES for i in self.of(p.name) for n in p.absorbed(i)))


@dataclass
class Analysis:
    plan: Plan
    #: the model's output on the example input, taken during the recording run
    output: Any


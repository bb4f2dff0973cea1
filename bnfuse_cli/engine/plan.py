"""The plan types: what folds into what, what stays and why, and their JSON form.

A :class:`Plan` is what :func:`bnfuse_cli.engine.analyse.analyse` decides and
:func:`bnfuse_cli.engine.rewrite.apply_plan` carries out; fused files store its folds as rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Fold", "Skip", "Branch", "Merge", "MergeSkip", "Plan", "Analysis"]


@dataclass(frozen=True)
class Fold:
    """One BatchNorm folded into one layer."""

    norm: str
    producer: str
    #: "previous": the BN reads the layer's output; "next": the layer reads the BN's output
    direction: str = "previous"
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

    kind: str
    #: the module that computes the branch (the block's child), None for ``identity``
    module: "str | None" = None
    #: the BatchNorm the branch absorbs: the BN of a ``norm`` branch (a ``conv`` branch's BN is a Fold)
    norm: "str | None" = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "module": self.module, "norm": self.norm}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Branch":
        return cls(str(d["kind"]), d.get("module"), d.get("norm"))


@dataclass(frozen=True)
class Merge:
    """A sum of parallel branches reading one tensor, merged into one conv placed at ``into``
    (the main branch's module), inside ``block`` (the module whose forward computes the sum;
    ``node`` names the sum in its traced graph)."""

    block: str
    node: str
    into: str
    branches: tuple[Branch, ...]

    @property
    def norms(self) -> list[str]:
        return [b.norm for b in self.branches if b.norm]

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "node": self.node, "into": self.into,
                "branches": [b.to_dict() for b in self.branches]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Merge":
        return cls(str(d["block"]), str(d["node"]), str(d["into"]),
                   tuple(Branch.from_dict(b) for b in d["branches"]))


@dataclass(frozen=True)
class MergeSkip:
    """A sum of branches left as it is, and why."""

    block: str
    reason: str


@dataclass
class Plan:
    """What would fold and merge and what would not.  ``norms`` lists every BatchNorm-like layer
    found; a BatchNorm absorbed by a merge is listed in a merge, not in ``skipped``."""

    norms: list[str] = field(default_factory=list)
    folds: list[Fold] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    merges: list[Merge] = field(default_factory=list)
    merge_skips: list[MergeSkip] = field(default_factory=list)
    #: (folds, merges) applied in each round, in order: a merge can make a fold possible (a
    #: BatchNorm after a merged sum), so a fused file is rebuilt round by round
    rounds: list[tuple[int, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The plan as the JSON reports give it."""
        from dataclasses import asdict

        return {
            "bn_found": len(self.norms),
            "bn_folded": len(self.folded_norms),
            "bn_skipped": len(self.skipped),
            "folds": [asdict(f) for f in self.folds],
            "skipped": [asdict(s) for s in self.skipped],
            "merges": [m.to_dict() for m in self.merges],
            "merge_skips": [asdict(s) for s in self.merge_skips],
        }

    @property
    def folded_norms(self) -> list[str]:
        """BatchNorms gone from the model: folded into a layer, or merged with their branch."""
        merged = [n for m in self.merges for n in m.norms]
        return list(dict.fromkeys([f.norm for f in self.folds] + merged))


@dataclass
class Analysis:
    plan: Plan
    #: the model's output on the example input, taken during the recording run
    output: Any


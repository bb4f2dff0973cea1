"""The plan types: what folds into what, what stays and why, and their JSON form.

A :class:`Plan` is what :func:`bnfuse_cli.engine.analyse.analyse` decides and
:func:`bnfuse_cli.engine.rewrite.apply_plan` carries out; fused files store its folds as rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Fold", "Skip", "Plan", "Analysis"]


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


@dataclass
class Plan:
    """What would fold and what would not.  ``norms`` lists every BatchNorm-like layer found."""

    norms: list[str] = field(default_factory=list)
    folds: list[Fold] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    @property
    def folded_norms(self) -> list[str]:
        return list(dict.fromkeys(f.norm for f in self.folds))


@dataclass
class Analysis:
    plan: Plan
    #: the model's output on the example input, taken during the recording run
    output: Any


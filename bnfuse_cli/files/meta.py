"""What a fused file records about its conversion, read and written here and nowhere else.

A bnfuse output carries one JSON object (under ``bnfuse``: a ``.pth`` dict key, a ``.safetensors``
``__metadata__`` entry): the architecture that rebuilds it, the rounds of folds and merges that
give a freshly built model the fused structure, the input the conversion was checked with, and,
for a random initialisation, its seed.  :class:`FusedMeta` is that object, typed; every reader
(load, verify, the input choice, a second conversion) goes through :meth:`FusedMeta.parse`, which
refuses a malformed file whole rather than skipping rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..engine.plan import Fold, Merge
from ..errors import CheckpointError

__all__ = ["Step", "FusedMeta", "steps_of"]

#: the value of ``format`` in every file bnfuse writes
FORMAT = "bnfuse"


@dataclass(frozen=True)
class Step:
    """One round of a conversion: the folds applied, then the merges (a merge can leave a
    BatchNorm after the merged conv that the next round folds)."""

    folds: tuple[Fold, ...] = ()
    merges: tuple[Merge, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"folds": [f.to_list() for f in self.folds], "merges": [m.to_dict() for m in self.merges]}


def steps_of(plan: Any) -> list[Step]:
    """A :class:`~bnfuse_cli.engine.plan.Plan`'s rounds as a fused file records them."""
    rounds = plan.rounds or [(len(plan.folds), len(plan.merges))]
    out, i, j = [], 0, 0
    for nf, nm in rounds:
        out.append(Step(tuple(plan.folds[i:i + nf]), tuple(plan.merges[j:j + nm])))
        i, j = i + nf, j + nm
    return out


@dataclass
class FusedMeta:
    """A fused file's record of its conversion."""

    arch: "str | None"
    steps: list[Step] = field(default_factory=list)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    #: the example input the conversion was checked with (``InputSpec.to_dict()``), if recorded
    input: "dict[str, Any] | None" = None
    dtype: "str | None" = None
    source: "str | None" = None
    version: "str | None" = None
    #: the seed of a random initialisation (a model name converted with ``--weights none``), else None
    seed: "int | None" = None

    @property
    def folds(self) -> list[Fold]:
        """Every fold of every round, in order."""
        return [f for s in self.steps for f in s.folds]

    @property
    def merges(self) -> list[Merge]:
        """Every merge of every round, in order."""
        return [m for s in self.steps for m in s.merges]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            # every fold and merge, flat, for readers of older bnfuse versions; ``steps`` is authoritative
            "folds": [f.to_list() for f in self.folds],
            "merges": [m.to_dict() for m in self.merges],
            "steps": [s.to_dict() for s in self.steps],
            "input": self.input,
            "dtype": self.dtype,
            "source": self.source,
            **({"weights": "none", "seed": self.seed} if self.seed is not None else {}),
        }

    @classmethod
    def parse(cls, raw: "dict[str, Any] | None", where: str) -> "FusedMeta | None":
        """The record in ``raw`` (a file's bnfuse metadata), None when the file has none (not a bnfuse
        output).  A malformed record is a :class:`CheckpointError` naming ``where``: a file whose
        structure cannot be rebuilt exactly is refused, never half-used."""
        if not raw or not isinstance(raw, dict) or not any(k in raw for k in ("steps", "folds", "arch")):
            return None
        try:
            steps = raw.get("steps")
            if steps is None:  # files of bnfuse before merging: one round of folds
                steps = [{"folds": raw.get("folds", []), "merges": []}]
            parsed = [Step(tuple(Fold.from_list([str(x) for x in row]) for row in s.get("folds", [])),
                           tuple(Merge.from_dict(d) for d in s.get("merges", []))) for s in steps]
            seed = raw.get("seed") if raw.get("weights") == "none" else None
            if seed is not None and not isinstance(seed, int):
                raise TypeError(f"seed {seed!r} is not an integer")
            arch = raw.get("arch")
            return cls(
                arch=None if arch is None else str(arch), steps=parsed, arch_kwargs=dict(raw.get("arch_kwargs") or {}),
                input=raw.get("input") or None, dtype=raw.get("dtype"), source=raw.get("source"),
                version=raw.get("version"), seed=seed,
            )
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"{where}: its bnfuse metadata is malformed ({type(exc).__name__}: {exc}), so the fused structure "
                "cannot be rebuilt; convert the original again"
            ) from exc

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

from ..engine.passes import PASSES
from ..errors import CheckpointError

__all__ = ["Step", "FusedMeta", "steps_of", "SEEDS", "seed_problem"]

#: the value of ``format`` in every file bnfuse writes
FORMAT = "bnfuse"
#: the seeds bnfuse takes: 64-bit signed integers.  torch's generators take -2**63 to 2**64 - 1, and bnfuse
#: also draws from the seeds after it (seed + 1, seed + 2, ... for more inputs), which stay in torch's range
SEEDS = (-(2 ** 63), 2 ** 63 - 1)


def seed_problem(seed: object) -> "str | None":
    """Why ``seed`` cannot seed bnfuse's random draws (None when it can), naming the range."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        return f"{seed!r} is not an integer"
    if not SEEDS[0] <= seed <= SEEDS[1]:
        return (f"{seed} is outside the seeds bnfuse takes, {SEEDS[0]} to {SEEDS[1]} (64-bit integers, the range "
                "torch's random generators accept with room for the seeds drawn after it)")
    return None


@dataclass(frozen=True)
class Step:
    """One round of a conversion: the items each pass applied, by pass name, in the table's order
    (a merge can leave a BatchNorm after the merged conv that the next round folds)."""

    items: "dict[str, tuple[Any, ...]]" = field(default_factory=dict)

    def of(self, name: str) -> tuple[Any, ...]:
        return tuple(self.items.get(name, ()))

    @property
    def folds(self) -> tuple[Any, ...]:
        return self.of("fold")

    @property
    def merges(self) -> tuple[Any, ...]:
        return self.of("merge")

    def to_dict(self) -> dict[str, Any]:
        return {p.key: [p.to_row(i) for i in self.of(p.name)] for p in PASSES}

    @classmethod
    def from_dict(cls, raw: "dict[str, Any]") -> "Step":
        """A recorded round; a row no pass of this bnfuse knows is refused (KeyError), never skipped."""
        known = {p.key for p in PASSES}
        unknown = sorted(k for k, v in raw.items() if k not in known and v)
        if unknown:
            raise KeyError(f"rows of a pass this bnfuse does not have: {', '.join(unknown)}")
        return cls({p.name: tuple(p.from_row(r) for r in raw.get(p.key, [])) for p in PASSES if raw.get(p.key)})


def steps_of(plan: Any) -> list[Step]:
    """A :class:`~bnfuse_cli.engine.plan.Plan`'s rounds as a fused file records them."""
    return [Step({name: tuple(items) for name, items in step.items() if items}) for step in plan.round_items()]


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

    def all_of(self, name: str) -> list[Any]:
        """Every item of the pass ``name`` in every round, in order."""
        return [i for s in self.steps for i in s.of(name)]

    @property
    def folds(self) -> list[Any]:
        return self.all_of("fold")

    @property
    def merges(self) -> list[Any]:
        return self.all_of("merge")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            # every item, flat, for readers of older bnfuse versions; ``steps`` is authoritative
            **{p.key: [p.to_row(i) for i in self.all_of(p.name)] for p in PASSES},
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
            parsed = [Step.from_dict(s) for s in steps]
            seed = raw.get("seed") if raw.get("weights") == "none" else None
            if seed is not None and seed_problem(seed):
                raise ValueError(f"its seed {seed_problem(seed)}")
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

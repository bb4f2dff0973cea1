"""The verdict: both checks together, with what they rest on and why a negative one failed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .outputs import Comparison, OutputCheck, Tolerance
from .sites import SiteCheck

__all__ = ["Verdict"]


@dataclass
class Verdict:
    """The judgement and what it rests on: errors, thresholds, the original's own error (the
    noise floor), every fold site, and the precision flags in effect."""

    tolerance: Tolerance
    outputs: dict[str, OutputCheck]
    sites: list[SiteCheck] = field(default_factory=list)
    precision: dict[str, Any] = field(default_factory=dict)
    #: what the runtime precision check was based on (for example "float64 reference on cuda")
    basis: str = ""

    @property
    def failed_sites(self) -> list[SiteCheck]:
        return [s for s in self.sites if not s.ok]

    @property
    def worst_site(self) -> "SiteCheck | None":
        checked = [s for s in self.sites if s.skipped is None]
        return max(checked, key=lambda s: s.ratio, default=None)

    @property
    def ok(self) -> bool:
        counted = [c for c in self.outputs.values() if not c.waived]
        return bool(counted) and all(c.ok for c in counted) and not self.failed_sites

    def _output_reasons(self) -> list[str]:
        out = [r for label, c in self.outputs.items() if (r := c.reason(label)) is not None]
        return out if self.outputs else out + ["nothing was compared"]

    @property
    def reasons(self) -> list[str]:
        """Why the verdict is negative, one sentence each (empty when it passed)."""
        return self._output_reasons() + [f"{s.kind} site {s.layer} ({', '.join(s.norms)}): {s.why()}"
                                         for s in self.failed_sites]

    def summary(self, names: int = 3, more: str = "-v or --json lists them all") -> list[str]:
        """Why the verdict is negative, in a few lines whatever the number of failures: each failing
        output, then how many fold sites fail, the worst, and the first ``names`` by name (the full
        list is :attr:`reasons`; ``more`` says where the reader finds it)."""
        failed = self.failed_sites
        if len(failed) <= 1:
            return self.reasons
        out = self._output_reasons()
        worst = max(failed, key=lambda s: s.badness)
        shown = ", ".join(s.layer for s in failed[:names]) + (
            f" (+{len(failed) - names} more{'; ' + more if more else ''})" if len(failed) > names else "")
        checked = sum(s.skipped is None for s in self.sites)
        worst_text = f"{worst.layer}: {worst.flow}" if worst.flow else (
            f"{worst.layer}, is {worst.rel_error:.3g} (relative) away from the original layer and BatchNorm, above "
            f"{worst.tolerance:g}")
        what = "check" if any(s.flow for s in failed) else "float64 check"  # (the data flow is not float64's)
        out.append(f"{len(failed)} of {checked} fold sites fail their {what}: {shown}; the worst, {worst_text}")
        return out

    @property
    def error(self) -> Comparison:
        """The first counted output check's error (the main one)."""
        return next((c for c in self.outputs.values() if not c.waived), next(iter(self.outputs.values()))).error

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst_site
        return {
            "ok": self.ok,
            "basis": self.basis,
            "tolerance": self.tolerance.to_dict(),
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "sites": {
                "checked": sum(s.skipped is None for s in self.sites),
                "unchecked": [s.to_dict() for s in self.sites if s.skipped is not None],
                "failed": [s.to_dict() for s in self.failed_sites],
                "worst": None if worst is None else worst.to_dict(),
            },
            "precision": self.precision,
            "reasons": self.reasons,
        }


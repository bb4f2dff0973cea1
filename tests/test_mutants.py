"""scripts/mutants.py (``make mutants``) writes each bug into the package by an exact pattern; a refactor that
moves the line leaves that mutant unable to run.  Checked here, in the default suite, so it is found when the
line moves, not at the next ``make mutants``."""

from __future__ import annotations

import importlib.util
import sys

from conftest import ROOT


def test_every_mutant_finds_its_line_exactly_once() -> None:
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
    mutants = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = mutants  # its dataclasses look their module up
    try:
        spec.loader.exec_module(mutants)
    finally:
        del sys.modules["mutants"]
    lost = [m.name for m in mutants.MUTANTS if (ROOT / m.path).read_text().count(m.pattern) != 1]
    assert not lost, f"mutants whose pattern is not found exactly once: {lost}"
    tests = {t.split("::", 1)[0] for m in mutants.MUTANTS for t in m.tests}
    assert all((ROOT / t).exists() for t in tests), sorted(t for t in tests if not (ROOT / t).exists())

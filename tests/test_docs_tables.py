"""The tables of README.md, docs/passes.md and docs/commands.md are made from the package's own tables (the passes' Option rows,
``PASSES``, ``FORMATS``) by scripts/docs_tables.py (``make docs``): a table that drifts from them fails here."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import ROOT


def _script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_tables"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["docs_tables"]
    return module


def test_every_table_made_from_the_package_is_as_the_package_makes_it() -> None:
    assert _script().differing() == [], "run `make docs` (scripts/docs_tables.py) and commit the tables"


def test_a_changed_option_shows_in_the_readme_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: an option's help changed in its row no longer matches the README."""
    from bnfuse_cli.engine.passes import by_name

    script = _script()
    option = by_name("horizontal").option
    monkeypatch.setattr(type(by_name("horizontal")), "option", type(option)(option.name, "Something else.", option.default))
    assert script.differing() == ["README.md: pass-flags", "docs/commands.md: pass-flags"]


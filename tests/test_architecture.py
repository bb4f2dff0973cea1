"""The package's layout is its architecture, and these tests keep it so.

Floors, from the ground up: ``errors``/``version`` -> ``precision``/``inputs`` -> ``engine/`` ->
``files/`` and ``checks/`` -> ``workflows/`` -> ``render`` -> ``cli`` -> the package entry points.
A module may import from a lower floor or from its own room, never from above or from a
neighbouring room on its floor (``files`` and ``checks`` do not know each other).  Every import
counts, at module level or inside a function.  Rooms stay small: files under about 400 lines,
functions under about 60.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bnfuse_cli"

FLOORS = {
    "errors": 0, "version": 0,
    "precision": 1, "inputs": 1,
    "engine": 2,
    "files": 3, "checks": 3,
    "workflows": 4,
    "render": 5,
    "cli": 6,
    "__init__": 7, "__main__": 7,
}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[tuple[str, Path]]:
    return sorted((".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts), p) for p in PACKAGE.rglob("*.py"))


def _room(module: str) -> str:
    """``bnfuse_cli.engine.record`` -> ``engine``; ``bnfuse_cli.cli`` -> ``cli``; the package -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of a bnfuse_cli module, relative ones resolved."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, name) for line, name in found if name == "bnfuse_cli" or name.startswith("bnfuse_cli.")]


def _violations() -> list[str]:
    bad = []
    for module, path in _modules():
        here = _room(module)
        for line, target in _imports(module, path):
            there = _room(target)
            if target == "bnfuse_cli" and module != "bnfuse_cli":
                bad.append(f"{path.name}:{line} imports the package itself ({target})")
            elif there != here and FLOORS[there] >= FLOORS[here]:
                bad.append(f"{module}:{line} ({here}, floor {FLOORS[here]}) imports {target} "
                           f"({there}, floor {FLOORS[there]})")
    return bad


def test_every_room_has_a_floor() -> None:
    rooms = {_room(m) for m, _ in _modules()}
    assert rooms <= set(FLOORS), rooms - set(FLOORS)


def test_imports_only_go_down() -> None:
    assert _violations() == []


def test_the_check_can_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An import that runs back up (engine -> workflows) and one across a floor (files -> checks) are caught."""
    fake = tmp_path / "bnfuse_cli"
    (fake / "engine").mkdir(parents=True)
    (fake / "files").mkdir()
    (fake / "engine" / "x.py").write_text("def f():\n    from ..workflows.fuse import fuse\n")
    (fake / "files" / "y.py").write_text("from ..checks import Verdict\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    bad = _violations()
    assert len(bad) == 2 and "bnfuse_cli.workflows.fuse" in bad[0] + bad[1] and "bnfuse_cli.checks" in bad[0] + bad[1]


def test_nothing_below_the_cli_uses_typer_or_rich() -> None:
    offenders = []
    for module, path in _modules():
        if FLOORS[_room(module)] >= FLOORS["render"]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{module}: {n}" for n in names if n.split(".")[0] in ("typer", "rich", "click")]
    assert offenders == []


def _function_lengths(path: Path) -> list[tuple[str, int]]:
    """(name, lines from the first statement after the docstring to the end) of every function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            out.append((node.name, node.end_lineno - body[0].lineno + 1))
    return out


def test_rooms_and_functions_stay_small() -> None:
    big_files = [f"{m}: {n} lines" for m, p in _modules() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    long_functions = [f"{m}.{name}: {n} lines" for m, p in _modules() for name, n in _function_lengths(p)
                      if n > MAX_FUNCTION_LINES]
    assert big_files == [] and long_functions == []


def test_every_module_says_its_job() -> None:
    missing = [m for m, p in _modules() if not ast.get_docstring(ast.parse(p.read_text()))
               and p.name != "__main__.py"]
    assert missing == []

"""The package's layout is its architecture, and these tests keep it so.

The import rules are contracts in ``pyproject.toml`` (``[tool.importlinter]``), checked by
import-linter, a tool made for this: floors whose imports only go down (``errors``/``version`` ->
``inputs``/``precision`` -> ``engine`` -> ``files`` and ``checks``, which do not know each other ->
``workflows`` -> ``render`` -> ``cli``), passes that do not import each other, the engine's shared
rooms that do not know the passes, Typer and Rich in the CLI alone, and no circle of imports inside
any package.  Every import counts, at module level or inside a function.  Rooms stay small: files
under about 400 lines, functions under about 60; and nothing outside ``engine/passes/`` is named
after a pass.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bnfuse_cli"
#: a room over about 400 lines is a prompt to look whether it holds one concept (the size is never a reason
#: to split one); over this, the test fails
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> list[tuple[str, Path]]:
    return sorted((".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts), p) for p in PACKAGE.rglob("*.py"))


def _lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root``, with the contracts of ``root/pyproject.toml``."""
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
                           "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_import_contracts_hold() -> None:
    proc = _lint(ROOT)
    assert proc.returncode == 0 and "0 broken" in proc.stdout, proc.stdout + proc.stderr


def test_the_contracts_can_fail(tmp_path: Path) -> None:
    """An import that runs back up (engine -> workflows, inside a function), one pass importing another, and
    a circle inside the engine each break their contract."""
    shutil.copytree(PACKAGE, tmp_path / "bnfuse_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    engine = tmp_path / "bnfuse_cli" / "engine"
    (engine / "x.py").write_text('"""x."""\n\ndef f():\n    from ..workflows.fuse import fuse\n')
    with open(engine / "passes" / "chain.py", "a") as fh:
        fh.write("from .layout import LAYOUT  # noqa\n")
    with open(engine / "patterns.py", "a") as fh:
        fh.write("from .record import where  # noqa\n")
    proc = _lint(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "bnfuse_cli.engine.x -> bnfuse_cli.workflows.fuse" in out
    assert "bnfuse_cli.engine.passes.chain -> bnfuse_cli.engine.passes.layout" in out
    assert "No cycles are allowed in bnfuse_cli.engine." in out and "3 broken" in out


def test_no_module_outside_the_passes_is_named_after_a_pass() -> None:
    from bnfuse_cli.engine.passes import PASSES

    names = {p.name for p in PASSES}
    outside = [m for m, p in _modules() if ".engine.passes" not in m and (p.stem in names or any(
        p.stem.startswith(f"{n}_") for n in names))]
    assert outside == []


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

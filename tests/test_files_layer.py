"""The files layer (``bnfuse_cli/files``): its imports only go down, it keeps no module-level mutable
state, and its read-back still checks contents where torch does not say where records lie."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnfuse_cli.errors import CheckpointError, OutputError  # noqa: E402
from bnfuse_cli.files import readback  # noqa: E402
from bnfuse_cli.files.table import read_checkpoint  # noqa: E402
from bnfuse_cli.files.write import write_checkpoint  # noqa: E402

FILES = ROOT / "bnfuse_cli" / "files"
#: what the files layer may import: below it, the engine's plan types, and the libraries that read and run files
ALLOWED_INSIDE = ("bnfuse_cli.errors", "bnfuse_cli.engine", "bnfuse_cli.files")
ALLOWED_OUTSIDE = {"torch", "torchvision", "safetensors", "timm", "onnx", "onnx_ir", "onnxruntime", "numpy"}


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports (at any depth of the file), relative imports made absolute."""
    package = "bnfuse_cli.files"  # every module of the layer, its __init__ too, lives in this package
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]  # level 1: this package, 2: bnfuse_cli
                found.append(f"{base}.{node.module}" if node.module else base)
            else:
                found.append(node.module or "")
    return found


def test_the_walk_sees_imports() -> None:
    """Control: the walk resolves relative imports, so the layering check below can fail."""
    load = _imports(FILES / "load.py")
    assert "bnfuse_cli.engine.passes" in load and "bnfuse_cli.files.read" in load and "bnfuse_cli.errors" in load
    assert "safetensors" in _imports(FILES / "readback.py")


def test_files_layer_imports_only_go_down() -> None:
    wrong = []
    for path in sorted(FILES.glob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "bnfuse_cli":
                ok = name.startswith(ALLOWED_INSIDE)
            else:
                ok = top in sys.stdlib_module_names or top in ALLOWED_OUTSIDE
            if not ok:
                wrong.append(f"{path.name} imports {name}")
    assert not wrong, wrong


#: methods that change a list, dict or set in place
_MUTATORS = {"append", "extend", "insert", "remove", "pop", "popitem", "clear", "update", "setdefault", "add",
             "discard", "sort", "reverse"}


def _module_state_writes(path: Path) -> list[str]:
    """Where a function of ``path`` changes a module-level name: ``global``, an item or attribute
    assigned on it, or a mutating method called on it."""
    tree = ast.parse(path.read_text())
    top = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
           for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        local = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        for node in ast.walk(fn):
            if isinstance(node, ast.Global):
                found += [f"{path.name}:{node.lineno} global {n}" for n in node.names]
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in targets:
                if isinstance(t, (ast.Subscript, ast.Attribute)) and isinstance(t.value, ast.Name) \
                        and t.value.id in top and t.value.id not in local:
                    found.append(f"{path.name}:{node.lineno} assigns into {t.value.id}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in top
                    and node.func.value.id not in local):
                found.append(f"{path.name}:{node.lineno} {node.func.value.id}.{node.func.attr}()")
    return sorted(found)


def test_files_layer_keeps_no_module_level_mutable_state() -> None:
    """A write's options and its record of placed outputs travel as arguments (``force``, ``placed``),
    never through module globals that a second caller would inherit."""
    found = [w for path in sorted(FILES.glob("*.py")) for w in _module_state_writes(path)]
    assert found == []


def test_the_state_check_sees_a_module_global_being_changed(tmp_path: Path) -> None:
    """The check above can fail: the globals this layer used to keep are found."""
    bad = tmp_path / "bad.py"
    bad.write_text("_WRITTEN = []\n_FORCE = {}\nN = 0\n"
                   "def put(p):\n    _WRITTEN.append(p)\n    _FORCE[p] = True\n"
                   "def bump():\n    global N\n    N += 1\n"
                   "def fine(_WRITTEN):\n    _WRITTEN.append(1)\n")
    assert _module_state_writes(bad) == ["bad.py:5 _WRITTEN.append()", "bad.py:6 assigns into _FORCE",
                                         "bad.py:8 global N"]


def test_safetensors_refusal_without_an_explanation_keeps_safetensors_words(tmp_path: Path) -> None:
    """A header safetensors refuses for a reason bnfuse has no sentence for (a negative dimension): the
    file is still refused, with the path and safetensors' own words, never a raw exception."""
    from safetensors.torch import save

    good = save({"w": torch.randn(2, 3)})
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    header["w"]["shape"] = [-2, 3]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "neg.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + good[8 + n:])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "not a valid .safetensors file" in msg and "\n" not in msg, msg


def test_pth_check_without_record_offsets_still_checks_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch's zip reader does not say where each record lies, storages cannot be placed: the read-back
    falls back to the (size, CRC-32) multisets, so writes go through and a damaged tensor is refused."""
    monkeypatch.setattr(readback, "_record_offsets", lambda path, names: {})
    g = torch.Generator().manual_seed(1)
    sd = {"big": torch.randn(300, generator=g), "small": torch.randn(7, generator=g)}
    out = tmp_path / "out.pth"
    write_checkpoint(out, state_dict=sd, metadata={"arch": "x"})
    assert all(torch.equal(read_checkpoint(out).state_dict[k], v) for k, v in sd.items())

    def other_values(tmp: Path) -> None:
        torch.save({"bnfuse": {"arch": "x"}, "state_dict": {"big": sd["big"] + 1, "small": sd["small"]}}, tmp)

    with pytest.raises(OutputError, match=r"read-back check.*\['big'\]"):
        write_checkpoint(out, state_dict=sd, metadata={"arch": "x"}, force=True, _after_write=other_values)

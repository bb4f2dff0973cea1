"""``import bnfuse_cli`` and ``bnfuse --help`` must not import torch (it takes seconds), checked in
fresh interpreters: the test process itself has long imported torch."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap

from conftest import BNFUSE, ROOT

#: heavy packages that only a real conversion needs
HEAVY = ("torch", "torchvision", "safetensors", "numpy", "timm")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"}
    return dict(env, COLUMNS="200", **extra)


def _py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=120)


def _heavy(modules: "list[str] | set[str]") -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def _imported(stderr: str) -> list[str]:
    """Module names from ``PYTHONPROFILEIMPORTTIME`` output (``import time: self | cumulative | name``)."""
    return [line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")][1:]


def test_import_bnfuse_cli_does_not_import_torch() -> None:
    r = _py(
        """
        import sys
        import bnfuse_cli
        from bnfuse_cli import BnfuseError, UsageError, __version__, errors
        print(sorted(m for m in sys.modules if m.split(".")[0] in %r))
        """ % (HEAVY,)
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"import bnfuse_cli imported: {r.stdout.strip()}"


def test_the_checks_would_see_torch() -> None:
    """Control for the helpers below (importing torch for real in a child would cost seconds)."""
    profile = "import time: self [us] | cumulative | imported package\n" \
              "import time:       634 |      41660 |   typer\n" \
              "import time:      1000 |    2000000 | torch\n" \
              "import time:        10 |         10 |     torch._C\n"
    assert _imported(profile) == ["typer", "torch", "torch._C"]
    assert _heavy(_imported(profile)) == ["torch", "torch._C"]
    assert _heavy({"rich", "torchaudio_like", "numpy.linalg"}) == ["numpy.linalg"]


def test_real_entry_point_help_does_not_import_torch() -> None:
    r = subprocess.run([str(BNFUSE), "--help"], capture_output=True, text=True, cwd=ROOT,
                       env=_env(PYTHONPROFILEIMPORTTIME="1"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "convert" in r.stdout and "inspect" in r.stdout
    imported = _imported(r.stderr)
    assert "bnfuse_cli.cli" in imported, "import profile not captured: the check would prove nothing"
    assert _heavy(imported) == [], f"bnfuse --help imported {_heavy(imported)[:10]}"


def test_every_command_help_does_not_import_torch() -> None:
    r = _py(
        """
        import sys
        import typer
        from bnfuse_cli.cli import app
        commands = sorted(typer.main.get_command(app).commands)
        for args in [["--help"], ["--version"]] + [[c, "--help"] for c in commands]:
            sys.argv = ["bnfuse", *args]
            try:
                app()
            except SystemExit as exc:
                assert exc.code in (0, None), (args, exc.code)
        print("COMMANDS", commands)
        print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in %r))
        """ % (HEAVY,)
    )
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("COMMANDS", "HEAVY")))
    assert "'convert'" in lines["COMMANDS"] and "'inspect'" in lines["COMMANDS"]
    assert lines["HEAVY"] == "[]", f"a --help imported {lines['HEAVY']}"


def test_python_dash_m_bnfuse_cli_help() -> None:
    r = subprocess.run([sys.executable, "-m", "bnfuse_cli", "--help"], capture_output=True, text=True, cwd=ROOT,
                       env=_env(PYTHONPROFILEIMPORTTIME="1"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "convert" in r.stdout
    assert _heavy(_imported(r.stderr)) == []


def test_version() -> None:
    import bnfuse_cli

    r = subprocess.run([str(BNFUSE), "--version"], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"bnfuse {bnfuse_cli.__version__}"


def test_help_is_fast() -> None:
    """Well under half a second.  Measured as the child's CPU time (user + system), best of three,
    so that a busy CI machine does not make it flaky; importing torch alone costs seconds."""
    cpu = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run([str(BNFUSE), "--help"], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert r.returncode == 0
        cpu.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    assert min(cpu) < 0.5, f"bnfuse --help used {min(cpu):.2f} s of CPU at best ({', '.join(f'{t:.2f}' for t in cpu)})"

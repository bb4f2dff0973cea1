"""The tables of the README and docs/ that are made from the package's own tables, so they cannot drift:
the pass flags (each pass's ``Option`` row; README.md and docs/commands.md), the table of passes (``PASSES``;
docs/passes.md) and the formats (``FORMATS``; README.md).

Each table stands in its page between two marker lines::

    <!-- table NAME: made by scripts/docs_tables.py -->
    ...
    <!-- end of table NAME -->

    python scripts/docs_tables.py           # rewrite the tables in place
    python scripts/docs_tables.py --check   # exit 1 and name each table that differs (tests/test_docs_tables.py)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bnfuse_cli.engine.passes import PASSES  # noqa: E402
from bnfuse_cli.files.table import FORMATS  # noqa: E402


def _default(default: "bool | None") -> str:
    if default is None:  # where names do not reach the user: the program formats and bench's fused side
        programs = ", ".join(s for f in FORMATS if f.program for s in f.written)
        kept = ", ".join(s for f in FORMATS if not f.program for s in f.written)
        return f"on for {programs} and bench's fused side; off for {kept}"
    return "on" if default else "off"


def _flag(option: object) -> str:
    flag = option.flag  # type: ignore[attr-defined]
    return f"`{flag}/--no-{flag[2:]}`" if option.default is not False else f"`{flag}`"  # type: ignore[attr-defined]


def pass_flags() -> list[str]:
    """The README's pass flags: one row per pass with an option, its help as ``--help`` shows it."""
    rows = ["| flag | default | what it does |", "| --- | --- | --- |"]
    rows += [f"| {_flag(p.option)} | {_default(p.option.default)} | {p.option.help} |" for p in PASSES if p.option]
    return rows


def passes() -> list[str]:
    """docs/passes.md: every pass in the order of ``PASSES``, its keys, its option and default."""
    rows = ["| name | JSON key | left key | option (library / CLI) | default |", "| --- | --- | --- | --- | --- |"]
    for p in PASSES:
        option = f"`{p.option.name}` / {_flag(p.option)}" if p.option else "always runs"
        rows.append(f"| `{p.name}` | `{p.key}` | `{p.left_key}` | {option} | "
                    f"{_default(p.option.default) if p.option else 'on'} |")
    return rows


def formats() -> list[str]:
    """The README's formats: one row per format of ``FORMATS``."""
    rows = ["| format | read as a source | written as | bnfuse's record in it | runs in |", "| --- | --- | --- | --- | --- |"]
    for f in FORMATS:
        read = " ".join(f"`{s}`" for s in f.suffixes) if f.read else "as `verify`'s FUSED only"
        written = " ".join(f"`{s}`" for s in f.written) or "not written"
        rows.append(f"| {f.what} | {read} | {written} | {f.record} | `{f.runtime}` |")
    return rows


#: (page, table name) -> what makes it
TABLES: "dict[tuple[str, str], Callable[[], list[str]]]" = {
    ("README.md", "pass-flags"): pass_flags,
    ("README.md", "formats"): formats,
    ("docs/passes.md", "passes"): passes,
    ("docs/commands.md", "pass-flags"): pass_flags,
}


def _block(name: str) -> "re.Pattern[str]":
    return re.compile(rf"(<!-- table {re.escape(name)}: made by scripts/docs_tables.py -->\n)(.*?)"
                      rf"(<!-- end of table {re.escape(name)} -->)", re.S)


def differing(write: bool = False) -> list[str]:
    """The tables whose page differs from what the package's tables make (each rewritten when ``write``);
    a page without its markers is an error."""
    out = []
    for (page, name), make in TABLES.items():
        path = ROOT / page
        text = path.read_text()
        found = _block(name).search(text)
        if found is None:
            raise SystemExit(f"{page} has no markers for the table {name}")
        made = "\n".join(make()) + "\n"
        if found.group(2) != made:
            out.append(f"{page}: {name}")
            if write:
                path.write_text(text[:found.start(2)] + made + text[found.end(2):])
    return out


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 when a table differs")
    args = parser.parse_args(argv)
    changed = differing(write=not args.check)
    for c in changed:
        print(("differs: " if args.check else "rewrote: ") + c)
    return 1 if changed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

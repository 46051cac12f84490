"""The README's map of course_lib, generated from each module's first docstring line.

``python scripts/modulemap.py --check`` exits 1 (printing the difference) when the README's map has drifted from
the code; ``--write`` rewrites the block between the markers. tests/test_structure.py runs the check.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "course_lib"
README = ROOT / "README.md"
BEGIN, END = "<!-- modulemap:begin -->", "<!-- modulemap:end -->"


def first_line(path: Path) -> str:
    """The first line of a module's docstring; a module without one is an error (the map would be blank)."""
    doc = ast.get_docstring(ast.parse(path.read_text()))
    if not doc:
        raise ValueError(f"{path.relative_to(ROOT)} has no docstring: its first line is its entry in the map")
    return doc.strip().splitlines()[0]


def _entries(folder: Path, depth: int) -> list[tuple[str, str]]:
    """(indented name, first line) for a package's modules, then its subpackages (each followed by its own)."""
    rows = [("  " * depth + p.name, first_line(p)) for p in sorted(folder.glob("*.py")) if p.name != "__init__.py"]
    for sub in sorted(d for d in folder.iterdir() if (d / "__init__.py").is_file()):
        rows.append(("  " * depth + sub.name + "/", first_line(sub / "__init__.py")))
        rows += _entries(sub, depth + 1)
    return rows


def module_map() -> str:
    """The map as a fenced block: the package's line, then one line per module."""
    rows = _entries(PKG, 1)
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"course_lib/  {first_line(PKG / '__init__.py')}"]
    lines += [f"{name:<{width}}{line}".rstrip() for name, line in rows]
    return "\n".join(["```text", *lines, "```"])


def _split(text: str) -> tuple[str, str, str]:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"the README must hold one {BEGIN} line and one {END} line after it")
    head, rest = text.split(BEGIN + "\n", 1)
    block, tail = rest.split(END, 1)
    return head, block, tail


def check(readme: Path = README) -> str:
    """The difference between the README's map and the generated one ('' when they agree)."""
    _, block, _ = _split(readme.read_text())
    want = module_map() + "\n"
    return "".join(difflib.unified_diff(block.splitlines(True), want.splitlines(True), "README.md", "generated"))


def write(readme: Path = README) -> None:
    """Rewrite the block between the markers with the generated map; the rest of the file is left as it is."""
    head, _, tail = _split(readme.read_text())
    readme.write_text(f"{head}{BEGIN}\n{module_map()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 when the README's map has drifted")
    mode.add_argument("--write", action="store_true", help="rewrite the README's map")
    args = p.parse_args(argv)
    if args.write:
        write()
        return 0
    drift = check()
    print(drift or "the README's module map is up to date")
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())

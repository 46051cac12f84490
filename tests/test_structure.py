"""The house: imports flow one way, at the top of each module, and the README's module map is the code's."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import course_lib

PKG = Path(course_lib.__file__).parent

# Where a function may import course_lib: names looked up on first use, and a suite chosen by name.
LAZY_BY_DESIGN = {
    ("__init__.py", "__getattr__"),  # `import course_lib` stays quick: the compression APIs load on first use
    ("bench/__init__.py", "run_bench"),  # a suite is a module named on the command line
    ("cli/serve.py", "run"),  # the HTTP stack is the `serve` extra: only this command needs it
    ("serving/__init__.py", "start_server"),  # serving.server imports the `serve` extra: the simulation works without
}
TEMPORARY: set[tuple[str, str]] = set()


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PKG).as_posix()


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("").parts
    return ".".join(("course_lib", *(rel[:-1] if rel[-1] == "__init__" else rel)))


def _resolve(node: ast.Import | ast.ImportFrom, package: list[str]) -> set[str]:
    """The dotted modules one import statement names, relative ones resolved against ``package``."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if node.level == 0:
        return {node.module}
    base = package[: len(package) - node.level + 1]
    if node.module:
        return {".".join((*base, node.module))}
    return {".".join((*base, a.name)) for a in node.names}  # from . import x: x is a module of that package


def _package(path: Path) -> list[str]:
    name = _module_name(path).split(".")
    return name if path.name == "__init__.py" else name[:-1]


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """course_lib modules (dotted, e.g. 'course_lib.timing') and outside packages imported by one file."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    return {m for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom)) for m in _resolve(n, _package(path))}


def _ours(module: str) -> bool:
    return module == "course_lib" or module.startswith(("course_lib.", "."))


def local_imports_of_course_lib(source: str, package: list[str]) -> list[tuple[str, int, str]]:
    """(function, line, code) for each import of course_lib inside a function of a module of ``package``:
    an import statement, or an ``import_module`` call with a relative or course_lib name (or a computed one)."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                hit = any(_ours(m) for m in _resolve(node, package))
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                    "import_module" and node.args:
                name = node.args[0]
                hit = not (isinstance(name, ast.Constant) and isinstance(name.value, str)) or _ours(name.value)
            else:
                continue
            if hit:
                found.append((fn.name, node.lineno, ast.unparse(node)))
    return found


def _local_imports(path: Path) -> list[tuple[str, int, str]]:
    return local_imports_of_course_lib(path.read_text(), _package(path))


def _arrows(path: Path) -> set[str]:
    """The modules one file imports: at the top, and inside functions too (a local import hides an arrow, not
    removes it), except in the temporary allow-lists."""
    arrows = _imports(path, top_level_only=True)
    rel = _rel(path)
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and (rel, fn.name) not in TEMPORARY:
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    arrows |= _resolve(node, _package(path))
    return arrows


def test_course_lib_imports_have_no_cycle():
    """The import graph of course_lib (bench, cli and exercises included; imports inside functions too) is acyclic."""
    files = _modules()
    names = {_module_name(f) for f in files}
    graph = {_module_name(f): {m for m in _arrows(f) if m in names} - {_module_name(f)} for f in files}
    # A package's __init__ runs before its modules, so "course_lib" itself is everybody's implicit parent:
    # only edges between modules count.
    graph = {k: v - {"course_lib"} for k, v in graph.items() if k != "course_lib"}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_course_lib_is_imported_at_the_top_of_every_module():
    """A function-local import of course_lib hides an arrow (and can hide a circle): only the allow-lists have one."""
    stray = []
    for path in _modules():
        rel = _rel(path)
        stray += [f"{rel}:{line} in {fn}(): {what}" for fn, line, what in _local_imports(path)
                  if (rel, fn) not in LAZY_BY_DESIGN | TEMPORARY]
    assert not stray, "import these at the top of the module:\n" + "\n".join(stray)


def test_the_local_import_check_sees_what_it_must():
    """The check itself: an import statement and an import_module call inside a function, not an outside one."""
    probe = ("import importlib\n\ndef f():\n    from .models import load_model\n    return load_model\n\n"
             "def g():\n    return importlib.import_module('.pruning', __package__)\n\n"
             "def h():\n    import json\n    from course_lib.cli import train\n    return json, train\n\n"
             "def i():\n    import torch_pruning\n    return torch_pruning\n")
    found = local_imports_of_course_lib(probe, ["course_lib"])
    assert [(fn, line) for fn, line, _ in found] == [("f", 4), ("g", 8), ("h", 12)]


def test_allow_lists_name_real_places():
    """An entry for a function that no longer imports anything is stale: it must go."""
    for rel, fn in LAZY_BY_DESIGN | TEMPORARY:
        assert fn in {f for f, _, _ in _local_imports(PKG / rel)}, (rel, fn)


def test_timing_is_a_torch_only_leaf():
    """timing.py (anywhere in it, function bodies included) imports torch, the standard library, _checks, device."""
    found = _imports(PKG / "timing.py", top_level_only=False)
    ours = {m for m in found if m.startswith("course_lib")}
    assert ours <= {"course_lib._checks", "course_lib.device"}, ours
    others = {m.split(".")[0] for m in found - ours}
    assert others <= {"torch", "__future__"} | set(sys.stdlib_module_names), others


def test_roofline_arithmetic_measures_nothing():
    """roofline.py does arithmetic: it imports no timing, no machine measurement and no model."""
    found = _imports(PKG / "roofline.py", top_level_only=False)
    assert {m for m in found if m.startswith("course_lib")} <= {"course_lib._checks"}
    assert "torch" not in found and "course_lib.machine" not in found


def test_training_is_below_its_trainers():
    """training.py (the loop, the schedule, the checkpoint folders) imports no trainer and no model loader."""
    ours = {m for m in _imports(PKG / "training.py", top_level_only=False) if m.startswith("course_lib")}
    assert ours <= {"course_lib._checks", "course_lib.device"}, ours


def test_every_subcommand_is_a_cli_module():
    """__main__ only dispatches: each subcommand is a module of course_lib/cli with HELP, add_arguments, run."""
    from course_lib.__main__ import COMMANDS

    for name, module in COMMANDS.items():
        assert module.__name__.startswith("course_lib.cli."), name
        assert isinstance(module.HELP, str) and callable(module.add_arguments) and callable(module.run), name


# --- the README's module map ---------------------------------------------------------------------------------

def test_readme_module_map_is_the_code_s():
    """The map between the README's modulemap markers is generated from each module's first docstring line."""
    from scripts.modulemap import README, check

    drift = check(README)
    assert not drift, drift + "\nrun: python scripts/modulemap.py --write"


def test_module_map_names_every_module_and_fails_on_drift(tmp_path):
    from scripts.modulemap import BEGIN, END, README, check, module_map, write

    text = module_map()
    for path in _modules():
        assert f" {path.name} " in text or path.name == "__init__.py", _rel(path)
    stale = tmp_path / "README.md"
    lines = README.read_text().splitlines(keepends=True)
    first_entry = lines.index(BEGIN + "\n") + 3  # below the marker, the fence and the package's own line
    stale.write_text("".join(lines[:first_entry] + lines[first_entry + 1:]))  # one module gone from the map
    assert check(stale)
    write(stale)
    assert not check(stale) and stale.read_text().count(BEGIN) == 1 and stale.read_text().count(END) == 1

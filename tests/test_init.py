"""The package's top-level API: every name in __all__ resolves, the one-call APIs are the modules' own."""

from __future__ import annotations

import subprocess
import sys

import pytest

import course_lib
from course_lib import distillation, pruning, quantization, speculative


def test_all_names_resolve():
    for name in course_lib.__all__:
        assert getattr(course_lib, name) is not None, name


def test_one_call_apis_are_the_modules_own():
    assert course_lib.quantize_ is quantization.quantize_ and course_lib.QuantConfig is quantization.QuantConfig
    assert course_lib.prune_ is pruning.prune_ and course_lib.PruneConfig is pruning.PruneConfig
    assert course_lib.distill is distillation.distill
    assert course_lib.speculative_generate is speculative.speculative_generate


def test_dir_lists_lazy_names():
    assert {"quantize_", "PruneConfig", "distill", "speculative_generate"} <= set(dir(course_lib))


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'quantise_'"):
        course_lib.quantise_  # noqa: B018


def test_import_does_not_pull_in_torch_pruning():
    code = "import sys, course_lib; print('torch_pruning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- the layering: imports flow one way (issue 14 item 4) ---------------------------------------------------

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

PKG = Path(course_lib.__file__).parent


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """course_lib modules (dotted, e.g. 'course_lib.timing') and outside packages imported by one file."""
    tree = ast.parse(path.read_text())
    parts = ("course_lib", *path.relative_to(PKG).with_suffix("").parts)
    package = parts[:-1] if path.name != "__init__.py" else parts[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add(node.module)
                continue
            base = package[: len(package) - node.level + 1]
            if node.module:
                found.add(".".join((*base, node.module)))
            else:  # from . import x: x is a module of that package
                found |= {".".join((*base, a.name)) for a in node.names}
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("").parts
    return ".".join(("course_lib", *(rel[:-1] if rel[-1] == "__init__" else rel)))


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


def test_course_lib_imports_have_no_cycle():
    """The module-level import graph of course_lib (bench and exercises included) is acyclic."""
    files = sorted(PKG.rglob("*.py"))
    names = {_module_name(f) for f in files}
    graph = {_module_name(f): {m for m in _imports(f, top_level_only=True) if m in names} - {_module_name(f)}
             for f in files}
    # A package's __init__ runs before its modules, so "course_lib" itself is everybody's implicit parent:
    # only edges between modules count.
    graph = {k: v - {"course_lib"} for k, v in graph.items() if k != "course_lib"}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])

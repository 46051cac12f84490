"""Widget panels stay alive after Run All: no later cell rebinds a name a panel's callback draws into.

Notebook 05's panel went dead after Run All because a profiler cell further down did ``out = m(...)``: the
callback's ``with out:`` then met a model output, not the ``Output`` widget, and moving a slider only logged an
error in the console. The browser test (tests/test_browser.py) proves the panels redraw; this check finds the
same mistake in a second, without a browser.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _code_cells(path: Path) -> list[ast.Module]:
    cells = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
            cells.append(ast.parse(src))
    return cells


def _widget_aliases(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name == "ipywidgets"}
    return names


def _bound_names(node: ast.stmt) -> set[str]:
    """Names a top-level statement (re)binds in the notebook's namespace."""
    targets: list[ast.AST] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
    elif isinstance(node, (ast.For, ast.AsyncFor)):
        targets = [node.target]
    elif isinstance(node, (ast.With, ast.AsyncWith)):
        targets = [i.optional_vars for i in node.items if i.optional_vars is not None]
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    # Statements nested in a top-level with/for/if body bind at top level too.
    for child in getattr(node, "body", []) + getattr(node, "orelse", []):
        if isinstance(child, ast.stmt):
            names |= _bound_names(child)
    return names


def _widgets_made(tree: ast.Module, aliases: set[str]) -> dict[str, int]:
    """name -> line, for top-level ``name = W.Something(...)`` with W an ipywidgets alias."""
    made = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in aliases:
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        made[t.id] = node.lineno
    return made


def widget_rebinds(path: Path) -> list[str]:
    cells = _code_cells(path)
    aliases: set[str] = set()
    problems, widgets = [], {}  # name -> cell index of the widget
    for index, tree in enumerate(cells):
        aliases |= _widget_aliases(tree)
        for node in tree.body:
            for name in _bound_names(node) & set(widgets):
                if widgets[name] != index:
                    problems.append(f"code cell {index} rebinds {name!r}, the widget made in code cell "
                                    f"{widgets[name]}: its panel goes dead after Run All")
        for name in _widgets_made(tree, aliases):
            widgets[name] = index
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_cell_rebinds_a_panel_widget(path):
    assert not widget_rebinds(path), widget_rebinds(path)


def test_the_check_catches_notebook_05s_bug(tmp_path):
    nb = {"cells": [{"cell_type": "code", "source": ["import ipywidgets as W\n", "out = W.Output()\n"]},
                    {"cell_type": "code", "source": ["with torch.inference_mode():\n", "    out = m(ids)\n"]}]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    assert widget_rebinds(path) == ["code cell 1 rebinds 'out', the widget made in code cell 0: its panel goes "
                                    "dead after Run All"]

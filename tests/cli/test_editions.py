"""Student and instructor editions: built by nbgrader from the source notebooks, without reference solutions."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from course_lib.cli.editions import (
    find_exercises,
    instructor_edition,
    is_reference_cell,
    reference_cells,
    reference_names,
    write_editions,
)

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def editions(tmp_path_factory):
    out = tmp_path_factory.mktemp("editions")
    return write_editions(ROOT / "notebooks", out), out


def _read(path):
    return nbformat.read(path, as_version=4)


def _reference_lines(nb):
    """The lines only a reference solution writes (not blank, not a comment, not an import, not require)."""
    lines = set()
    for i in reference_cells(nb):
        if nb.cells[i].cell_type == "code":
            for line in nb.cells[i].source.splitlines():
                s = line.split("#")[0].strip()
                if len(s) > 12 and not s.startswith(("import ", "from ", "require(")):
                    lines.add(s)
    return lines


def test_every_notebook_has_an_edition_and_graded_checks(editions):
    written, _ = editions
    assert sorted(written) == [p.stem for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        exercises = find_exercises(_read(path))
        assert exercises, f"{path.name}: no check cell found"
        student = _read(written[path.stem]["student"])
        graded = {c.metadata["nbgrader"]["grade_id"]: c for c in student.cells
                  if c.metadata.get("nbgrader", {}).get("grade")}
        assert list(graded) == [e.grade_id for e in exercises]
        for ex in exercises:
            cell = graded[ex.grade_id]
            assert cell.metadata["nbgrader"]["points"] == 1 and cell.metadata["nbgrader"]["locked"]
            assert "graded(" not in cell.source and "HIDDEN TESTS" not in cell.source  # hidden from learners


def test_student_edition_has_no_reference_solution_by_name_or_content(editions):
    written, _ = editions
    for path in NOTEBOOKS:
        source = _read(path)
        n_refs = sum(is_reference_cell(c) for c in source.cells)
        assert n_refs == len(find_exercises(source)), path.name
        secret = _reference_lines(source)
        assert secret, path.name
        student = _read(written[path.stem]["student"])
        text = "\n".join(c.source for c in student.cells)
        assert "solution_" not in text, path.name  # no reference cell defines or calls its solution_* names
        assert not any(reference_names(c) for c in student.cells)
        leaked = [line for line in secret if line in text]
        assert not leaked, f"{path.name}: reference lines in the student edition: {leaked}"
        assert not any(c.outputs for c in student.cells if c.cell_type == "code")
        # everything else is the source: its other cells, in order
        kept = [c.source for i, c in enumerate(source.cells) if i not in set(reference_cells(source))]
        mine = [c.source for c in student.cells if not c.metadata.get("nbgrader")]
        assert mine == kept, path.name


def test_instructor_edition_keeps_everything(editions):
    written, _ = editions
    for path in NOTEBOOKS:
        source, instructor = _read(path), _read(written[path.stem]["instructor"])
        assert [c.source for c in instructor.cells if not c.metadata.get("nbgrader", {}).get("grade")] == \
            [c.source for c in source.cells]
        assert all("graded(lambda: ch" in c.source for c in instructor.cells
                   if c.metadata.get("nbgrader", {}).get("grade"))


def _names(tree, ctx):
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)}


def test_no_kept_cell_needs_a_name_only_a_reference_cell_defines():
    for path in NOTEBOOKS:
        nb = _read(path)
        refs = set(reference_cells(nb))
        code = {i: ast.parse(c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
        only_ref = set().union(*(_names(code[i], ast.Store) for i in refs if i in code))
        only_ref -= set().union(*(_names(t, ast.Store) for i, t in code.items() if i not in refs))
        only_ref -= {n.name for i, t in code.items() if i not in refs for n in ast.walk(t)
                     if isinstance(n, (ast.FunctionDef, ast.Import, ast.ImportFrom))
                     and hasattr(n, "name")}
        for i, tree in code.items():
            if i not in refs:
                assert not (_names(tree, ast.Load) & only_ref), f"{path.name} cell {i} needs {only_ref}"


def test_editions_refuse_a_non_empty_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="--overwrite"):
        write_editions(ROOT / "notebooks", tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_instructor_edition_marks_reference_cells_for_nbgrader():
    nb = _read(ROOT / "notebooks" / "07_distillation.ipynb")
    out = instructor_edition(nb)
    solution = [c for c in out.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert solution and all(reference_names(c) for c in solution)
    assert not any(c.outputs for c in out.cells if c.cell_type == "code")


@pytest.mark.slow
def test_student_edition_runs_under_nbval_with_the_stubs_as_they_are(editions):
    written, _ = editions
    student = written["02_core_concepts"]["student"]
    env = dict(os.environ, COURSE_QUICK="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", str(student), "-q", "-p",
                          "no:cacheprovider"], cwd=student.parent, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]


def test_commands_report_bad_arguments_in_one_line(tmp_path, capsys):
    from course_lib.__main__ import main

    assert main(["editions", "--out", str(tmp_path / "ed"), "--source", str(tmp_path)]) == 2
    assert "holds no .ipynb notebooks" in capsys.readouterr().err
    (tmp_path / "gradebook.csv").write_text("mine")
    assert main(["grade", str(tmp_path), "--out", str(tmp_path / "gradebook.csv")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "gradebook.csv").read_text() == "mine"

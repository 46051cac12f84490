"""Grading: submissions built from real exercise cells (ch05's group quantization, ch07's KD loss), each run in a
fresh kernel; nbgrader's own autograde scores the same notebook."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from course_lib.cli.editions import find_exercises, reference_cells, write_editions
from course_lib.cli.grade import GradeConfig, grade_submissions, write_gradebook

ROOT = Path(__file__).resolve().parents[2]
SETUP = "import torch\nfrom course_lib.exercises import ch05, ch07, require"
WRONG = {  # two classic mistakes: an int4 scale divided by 2^b, a KD loss without T^2
    "my_group_quantize": "(2 ** bits - 1)", "my_kd_loss": "alpha * T * T * kl",
}


def _exercise_cells(name: str, grade_id: str) -> list:
    """The stub, check, heading and reference cells of one exercise, as the chapter has them."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    ex = next(e for e in find_exercises(nb) if e.grade_id == grade_id)
    refs = [i for i in reference_cells(nb) if i > ex.cell_index]
    return nb.cells[ex.cell_index - 1 : refs[1] + 1]


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A two-exercise notebook from real cells, its editions, and the reference solutions as learner code."""
    tmp = tmp_path_factory.mktemp("course")
    src = tmp / "notebooks"
    src.mkdir()
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                          "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(SETUP), *_exercise_cells("05_quantization.ipynb", "ch05_group_quantize"),
                *_exercise_cells("07_distillation.ipynb", "ch07_kd_loss")]
    nbformat.write(nb, src / "exercises.ipynb")
    written = write_editions(src, tmp / "class")["exercises"]
    instructor = nbformat.read(written["instructor"], as_version=4)
    reference = {}  # stub name -> the reference cell, pasted as the learner's answer
    for i in reference_cells(instructor):
        cell = instructor.cells[i]
        if cell.cell_type == "code":
            code = cell.source.replace("solution_", "my_")
            for stub in WRONG:
                if f"def {stub}(" in code:
                    reference[stub] = code
    return src, written["student"], reference, tmp


def _submit(folder: Path, learner: str, student: Path, answers: dict[str, str]) -> None:
    nb = nbformat.read(student, as_version=4)
    for cell in nb.cells:
        for stub, code in answers.items():
            if f"def {stub}(" in cell.source and "NotImplementedError" in cell.source:
                cell.source = code
    (folder / learner).mkdir(parents=True)
    nbformat.write(nb, folder / learner / "exercises.ipynb")


def test_gradebook_scores_stubs_references_mistakes_and_crashes(course, tmp_path):
    src, student, reference, _ = course
    subs = tmp_path / "submitted"
    _submit(subs, "stubs", student, {})
    _submit(subs, "reference", student, reference)
    wrong = {"my_group_quantize": reference["my_group_quantize"].replace("(2 ** bits - 1)", "2 ** bits"),
             "my_kd_loss": reference["my_kd_loss"].replace("alpha * T * T * kl", "alpha * kl")}
    assert all(wrong[k] != reference[k] for k in wrong)
    _submit(subs, "wrong", student, wrong)
    _submit(subs, "crash", student, {
        "my_group_quantize": "def my_group_quantize(w, bits, group_size):\n    return 1 / 0\n\n"
                             "def my_group_dequantize(q, scale, zero, group_size):\n    return q",
        "my_kd_loss": "raise RuntimeError('half-written cell')"})
    scores = grade_submissions(subs, src)
    got = {(s.learner, s.exercise): s for s in scores}
    assert {k: v.points for k, v in got.items()} == {
        ("crash", "ch05_group_quantize"): 0, ("crash", "ch07_kd_loss"): 0,
        ("reference", "ch05_group_quantize"): 1, ("reference", "ch07_kd_loss"): 1,
        ("stubs", "ch05_group_quantize"): 0, ("stubs", "ch07_kd_loss"): 0,
        ("wrong", "ch05_group_quantize"): 0, ("wrong", "ch07_kd_loss"): 0}
    assert "Not done yet" in got[("stubs", "ch07_kd_loss")].feedback
    assert "2^bits - 1" in got[("wrong", "ch05_group_quantize")].feedback  # the check's own diagnosis
    assert "T^2" in got[("wrong", "ch07_kd_loss")].feedback
    assert "ZeroDivisionError" in got[("crash", "ch05_group_quantize")].feedback
    assert "NameError" in got[("crash", "ch07_kd_loss")].feedback  # the cell raised: my_kd_loss never defined
    assert got[("reference", "ch07_kd_loss")].feedback.startswith("✅")
    out_csv, out_md = write_gradebook(scores, tmp_path / "gradebook.csv")
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 8 and {r["learner"] for r in rows} == {"stubs", "reference", "wrong", "crash"}
    md = out_md.read_text()
    assert "| reference | 1 | 1 | 2 / 2 |" in md and "| stubs | 0 | 0 | 0 / 2 |" in md and "T^2" in md


def test_endless_loops_score_zero_with_their_reason_and_grading_goes_on(tmp_path):
    src = tmp_path / "notebooks"
    src.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from course_lib.exercises import ch09\nmy_V, my_V2 = 1e13, 1.0"),
                nbformat.v4.new_code_cell("ch09.check_fixed_snippet(my_V, my_V2)")]
    nbformat.write(nb, src / "tiny.ipynb")
    subs = tmp_path / "subs"
    for learner, first in (("loops", "while True:\n    pass"), ("fine", "pass")):
        (subs / learner).mkdir(parents=True)
        mine = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(first), *nb.cells])
        nbformat.write(mine, subs / learner / "tiny.ipynb")
    # a cell past its limit ends that notebook's run: the graded cells from there on score 0 with the reason
    (subs / "loops_in_check").mkdir()
    mine = nbformat.v4.new_notebook(cells=[*nb.cells[:1], nbformat.v4.new_code_cell(
        "def forever():\n    while True:\n        pass\nch09.check_fixed_snippet = lambda *a: forever()"), nb.cells[1]])
    nbformat.write(mine, subs / "loops_in_check" / "tiny.ipynb")
    by = {s.learner: s for s in grade_submissions(subs, src, GradeConfig(cell_timeout_s=12))}
    assert by["loops"].points == 0 and "cell 0 ran past the limit of 12 s per cell" in by["loops"].feedback
    assert by["loops_in_check"].points == 0
    assert "cell 2 ran past the limit of 12 s per cell" in by["loops_in_check"].feedback
    assert by["fine"].points == 0 and "10^11" in by["fine"].feedback  # graded after the ones that looped
    shutil.rmtree(subs / "loops_in_check")
    # a notebook past its limit: the child and its kernel are killed
    by = {s.learner: s for s in grade_submissions(subs, src, GradeConfig(cell_timeout_s=600,
                                                                         notebook_timeout_s=15))}
    assert by["loops"].points == 0 and "did not finish within 15 s" in by["loops"].feedback
    assert "❌" in by["fine"].feedback or "did not finish" in by["fine"].feedback


def test_grade_refuses_a_flat_folder(tmp_path):
    (tmp_path / "x.ipynb").write_text("{}")
    with pytest.raises(ValueError, match="learner"):
        grade_submissions(tmp_path, ROOT / "notebooks")
    with pytest.raises(ValueError, match="notebook_timeout_s"):
        GradeConfig(notebook_timeout_s=0)


@pytest.mark.slow
def test_nbgrader_autograde_scores_the_same_submissions(course):
    from nbgrader.api import Gradebook

    _, student, reference, tmp = course
    course_dir = tmp / "class"
    for learner, answers in (("alice", reference), ("bob", {})):
        _submit(course_dir / "submitted" / learner, "exercises", student, answers)
    env = dict(os.environ, COURSE_QUICK="1", PYTHONPATH=str(ROOT),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    run = subprocess.run([sys.executable, "-m", "nbgrader", "autograde", "exercises"], cwd=course_dir, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with Gradebook(f"sqlite:///{course_dir / 'gradebook.db'}") as gb:
        assert gb.find_submission("exercises", "alice").score == 2
        assert gb.find_submission("exercises", "bob").score == 0

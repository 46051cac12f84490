"""Student and instructor editions of the notebooks, in nbgrader's format (``python -m course_lib editions``).

The notebooks in ``notebooks/`` stay the single source. Nothing in them is marked for a grader: the markers are
derived here from what every chapter already has:

- a **reference cell** defines ``solution_*`` names and proves them with ``require(...)`` (or is tagged
  ``solution``); the markdown cell right above it starts with "Reference solution";
- a **check cell** calls ``chNN.check_*(...)`` on the learner's ``my_*`` answer (outside a reference cell).

The instructor edition is the source notebook with nbgrader metadata: reference cells (and their headings) become
nbgrader solution cells, so ``nbgrader generate_assignment`` replaces them with a pointer; after each check cell
comes a locked, graded cell whose hidden test calls :func:`course_lib.exercises.graded` on the same check. The
student edition is what ``nbgrader generate_assignment`` makes of it: no reference solution, hidden tests
stripped, outputs cleared, everything else as in the source.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbconvert.preprocessors import Preprocessor
from nbformat import NotebookNode

log = logging.getLogger(__name__)

COURSE_ID = "llm-inference-speed"
POINTS = 1  # per exercise: every check is worth the same
CELL_TIMEOUT_S = 300  # nbgrader autograde's limit per cell (its default, 30 s, is shorter than some setup cells)
POINTER_CODE = ("# Reference solution: in the instructor edition; your instructor shares it after the deadline.\n"
                "# Write yours in the `my_...` cell above: the check under it says what is still wrong.")
POINTER_TEXT = (  # nbgrader's stub for markdown answers; the course has none, but the config names one
    "**Reference solution:** in the instructor edition; your instructor shares it after the deadline. "
                "Until then, the check above tells you what is still wrong.")
HEADING_TAG = "reference-heading"  # the "Reference solution" markdown above a reference cell
_REFERENCE_HEADING = re.compile(r"^[#*\s]*Reference solution", re.IGNORECASE)
_CHECK_MODULE = re.compile(r"^ch\d\d$")


@dataclass(frozen=True)
class Exercise:
    """One graded check: where the learner's check cell is, and the check call it makes."""

    grade_id: str  # "ch07_kd_loss": the chapter's module and the check's name without "check_"
    call: str  # the check call as the notebook writes it, e.g. "ch07.check_kd_loss(my_kd_loss)"
    cell_index: int  # the learner's check cell in the source notebook


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        for sub in ast.walk(node) if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) else ():
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                names.add(sub.id)
    return names


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except SyntaxError:  # an IPython magic or a learner's half-written line: not a cell this module reads
        return None


def reference_names(cell: NotebookNode) -> set[str]:
    """The ``solution_*`` names a code cell defines at its top level."""
    tree = _parse(cell.source) if cell.cell_type == "code" else None
    return {n for n in _top_level_names(tree) if n.startswith("solution_")} if tree else set()


def is_reference_cell(cell: NotebookNode) -> bool:
    """A reference-solution cell: defines ``solution_*`` and proves it with ``require(...)``, or is tagged so."""
    if cell.cell_type != "code":
        return False
    if "solution" in cell.metadata.get("tags", []):
        return True
    return bool(reference_names(cell)) and "require(" in cell.source


def reference_cells(nb: NotebookNode) -> list[int]:
    """Indices of the reference cells and of the "Reference solution" headings right above them."""
    out = []
    for i, cell in enumerate(nb.cells):
        if is_reference_cell(cell):
            if i > 0 and nb.cells[i - 1].cell_type == "markdown" and _REFERENCE_HEADING.match(nb.cells[i - 1].source):
                out.append(i - 1)
            out.append(i)
    return out


def _check_call(cell: NotebookNode) -> ast.Call | None:
    """The last top-level ``chNN.check_*(...)`` call of a code cell."""
    tree = _parse(cell.source)
    found = None
    for node in tree.body if tree else ():
        value = node.value if isinstance(node, (ast.Expr, ast.Assign)) else None
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                and isinstance(value.func.value, ast.Name) and _CHECK_MODULE.match(value.func.value.id)
                and value.func.attr.startswith("check_")):
            found = value
    return found


def find_exercises(nb: NotebookNode) -> list[Exercise]:
    """The graded checks of a notebook: each learner's check cell (not a reference cell), in order."""
    exercises: list[Exercise] = []
    seen: set[str] = set()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or is_reference_cell(cell) or _is_grade_cell(cell):
            continue
        call = _check_call(cell)
        if call is None:
            continue
        base = f"{call.func.value.id}_{call.func.attr.removeprefix('check_')}"
        grade_id, n = base, 2
        while grade_id in seen:  # the same check twice in one notebook: both count
            grade_id, n = f"{base}_{n}", n + 1
        seen.add(grade_id)
        exercises.append(Exercise(grade_id, ast.get_source_segment(cell.source, call), i))
    return exercises


def _is_grade_cell(cell: NotebookNode) -> bool:
    return bool(cell.metadata.get("nbgrader", {}).get("grade"))


def grade_cell(ex: Exercise, points: int = POINTS) -> NotebookNode:
    """The locked, graded cell that follows a check cell: a comment for the learner, a hidden test for the grader."""
    source = (f"# Graded check ({points} point{'s' if points != 1 else ''}): the grader runs `{ex.call}` here, "
              "in a fresh kernel.\n"
              "### BEGIN HIDDEN TESTS\n"
              "from course_lib.exercises import graded\n"
              f"graded(lambda: {ex.call})\n"
              "### END HIDDEN TESTS")
    cell = nbformat.v4.new_code_cell(source)
    cell.id = f"graded-{ex.grade_id}".replace("_", "-")
    cell.metadata["nbgrader"] = {"grade": True, "solution": False, "locked": True, "points": points,
                                 "grade_id": ex.grade_id, "schema_version": 3}
    cell.metadata["deletable"] = False
    cell.metadata["editable"] = False
    return cell


def instructor_edition(nb: NotebookNode) -> NotebookNode:
    """The source notebook with nbgrader's metadata: reference cells as solution cells, a graded cell per check."""
    out = copy.deepcopy(nb)
    for i in reference_cells(out):
        cell = out.cells[i]
        if cell.cell_type == "markdown":  # nbgrader has no ungraded markdown answer: StudentPointers
            cell.metadata["tags"] = [*cell.metadata.get("tags", []), HEADING_TAG]
        else:
            cell.metadata["nbgrader"] = {"grade": False, "solution": True, "locked": False,
                                         "grade_id": f"reference-{cell.id}", "schema_version": 3}
    for ex in reversed(find_exercises(out)):  # from the end, so that earlier indices stay valid
        out.cells.insert(ex.cell_index + 1, grade_cell(ex))
    for cell in out.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return out


class StudentPointers(Preprocessor):
    """nbgrader preprocessor for the student edition: removes the "Reference solution" headings (tagged
    ``reference-heading``) and shows the reference cells, which ClearSolutions turns into :data:`POINTER_CODE`."""

    enabled = True  # nbconvert runs a preprocessor only when enabled

    def preprocess(self, nb: NotebookNode, resources: dict) -> tuple[NotebookNode, dict]:
        nb.cells = [c for c in nb.cells if HEADING_TAG not in c.metadata.get("tags", [])]
        for cell in nb.cells:
            if cell.metadata.get("nbgrader", {}).get("grade_id", "").startswith("reference-"):
                cell.metadata.get("jupyter", {}).pop("source_hidden", None)  # the pointer is not collapsed
        return nb, resources


def student_preprocessors() -> list[type]:
    """nbgrader generate_assignment's preprocessors, with :class:`StudentPointers` first."""
    from nbgrader.converters import GenerateAssignment

    return [StudentPointers, *GenerateAssignment.class_traits()["preprocessors"].default()]


def nbgrader_config_text() -> str:
    """The ``nbgrader_config.py`` written beside the editions (the settings :func:`write_editions` uses)."""
    return (
        "# nbgrader's settings for this course, written by `python -m course_lib editions`.\n"
        "import os\n\n"
        "from course_lib.cli.editions import student_preprocessors\n\n"
        "c = get_config()  # noqa: F821 (nbgrader defines it)\n"
        f"c.CourseDirectory.course_id = {COURSE_ID!r}\n"
        "c.Exchange.root = 'exchange'  # nbgrader's release/collect folder, here (the default needs root)\n"
        "# generate_assignment drops the 'Reference solution' headings and replaces each reference cell with this "
        "pointer\n"
        "c.GenerateAssignment.preprocessors = student_preprocessors()\n"
        f"c.ClearSolutions.code_stub = {{'python': {POINTER_CODE!r}}}\n"
        f"c.ClearSolutions.text_stub = {POINTER_TEXT!r}\n"
        f"c.Execute.timeout = {CELL_TIMEOUT_S}  # seconds per cell for autograde\n"
        "# autograde runs each submission in quick mode (the kernel inherits nbgrader's environment)\n"
        "os.environ.setdefault('COURSE_QUICK', '1')\n"
    )


def _nbgrader_config(root: Path):
    from traitlets.config import Config

    cfg = Config()
    cfg.CourseDirectory.root = str(root)
    cfg.CourseDirectory.course_id = COURSE_ID
    cfg.Exchange.root = str(root / "exchange")  # not the system-wide default, which needs root to write
    cfg.GenerateAssignment.preprocessors = student_preprocessors()
    cfg.ClearSolutions.code_stub = {"python": POINTER_CODE}
    cfg.ClearSolutions.text_stub = POINTER_TEXT
    return cfg


@contextlib.contextmanager
def venv_on_path() -> Iterator[None]:
    """Put this interpreter's bin folder first on PATH: nbgrader runs its ``alembic`` script from there, and
    ``make`` calls ``.venv/bin/python`` without activating the virtual environment."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def write_editions(source: Path, out: Path, overwrite: bool = False) -> dict[str, dict[str, Path]]:
    """Write an nbgrader course folder: ``source/NN/NN.ipynb`` (instructor) and ``release/NN/NN.ipynb`` (student).

    Each notebook is its own assignment, named after the file. The student edition is made by nbgrader's own
    ``generate_assignment``. Returns ``{assignment: {"instructor": path, "student": path}}``.
    """
    source, out = Path(source), Path(out)
    notebooks = sorted(p for p in source.glob("*.ipynb"))
    if not notebooks:
        raise ValueError(f"source {source} holds no .ipynb notebooks; give the course's notebooks/ folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the editions")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; choose a new folder, or pass --overwrite to rebuild the "
                         "editions there (its source/ and release/ notebooks are replaced, submissions are kept)")
    from nbgrader.apps import NbGraderAPI

    (out / "exchange").mkdir(parents=True, exist_ok=True)  # nbgrader's release/collect folder (unused offline)
    (out / "nbgrader_config.py").write_text(nbgrader_config_text())
    api = NbGraderAPI(config=_nbgrader_config(out.resolve()))
    written: dict[str, dict[str, Path]] = {}
    for path in notebooks:
        name = path.stem
        folder = out / "source" / name
        if folder.exists():
            shutil.rmtree(folder)  # only our own generated folder, and only under --overwrite (checked above)
        folder.mkdir(parents=True)
        nbformat.write(instructor_edition(nbformat.read(path, as_version=4)), folder / path.name)
        with venv_on_path():
            result = api.generate_assignment(name, force=True, create=True)
        if not result["success"]:
            raise RuntimeError(f"nbgrader generate_assignment {name} failed:\n{result.get('error', '')}\n"
                               f"{result.get('log', '')}")
        written[name] = {"instructor": folder / path.name, "student": out / "release" / name / path.name}
        log.info("%s: %d graded checks", name, len(find_exercises(nbformat.read(path, as_version=4))))
    return written


# --- the command: python -m course_lib editions ---------------------------------

HELP = "student and instructor editions of the notebooks (an nbgrader course folder)"
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"  # the single source, in a checkout


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="folder for the editions: source/ (instructor), release/ (student)")
    p.add_argument("--source", default=str(NOTEBOOKS), help="the source notebooks (default: this checkout's)")
    p.add_argument("--overwrite", action="store_true", help="rebuild the editions in a non-empty --out folder")


def run(args) -> int:
    written = write_editions(Path(args.source), Path(args.out), overwrite=args.overwrite)
    print(f"{len(written)} notebooks: instructor edition in {Path(args.out) / 'source'}, student edition in "
          f"{Path(args.out) / 'release'} (nbgrader course folder {args.out})")
    return 0

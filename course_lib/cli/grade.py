"""A gradebook for a folder of submitted notebooks (``python -m course_lib grade SUBMISSIONS --out gradebook.csv``).

For instructors who do not run nbgrader's own ``autograde``; the scores are the same, because the graded cells
are the instructor edition's (:mod:`course_lib.cli.editions`) and a cell is scored by nbgrader's
``determine_grade``: an error scores 0, anything else full points. Each submission runs in a fresh kernel in a
child process (never in this one), in quick mode, with a limit per cell (the run stops there: the graded cells from
there on score 0) and a limit per notebook (the child and its kernel are killed: every exercise of that
notebook scores 0), each with its reason in the gradebook.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from ..bench.report import check_new_file
from .editions import NOTEBOOKS, instructor_edition


@dataclass(frozen=True)
class GradeConfig:
    """Limits of one grading run."""

    notebook_timeout_s: float = 900.0  # the slowest chapter takes ~200 s in quick mode on 2 busy cores
    cell_timeout_s: float = 300.0
    quick: bool = True

    def __post_init__(self) -> None:
        for name in ("notebook_timeout_s", "cell_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")


@dataclass(frozen=True)
class Score:
    """One row of the gradebook."""

    learner: str
    notebook: str
    exercise: str
    points: float
    max_points: float
    feedback: str


def _grade_cells(nb: NotebookNode) -> list[NotebookNode]:
    return [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]


def graded_notebook(submission: NotebookNode, instructor: NotebookNode) -> NotebookNode:
    """The submission with the instructor edition's graded cells (hidden tests back in), as nbgrader's autograde
    does; a graded cell the learner deleted is appended at the end. Outputs are cleared."""
    nb = copy.deepcopy(submission)
    wanted = {c.metadata["nbgrader"]["grade_id"]: c for c in _grade_cells(instructor)}
    present = set()
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in wanted:
            cell.cell_type, cell.source = "code", wanted[gid].source
            cell.metadata["nbgrader"] = copy.deepcopy(wanted[gid].metadata["nbgrader"])
            present.add(gid)
        elif cell.metadata.get("nbgrader", {}).get("grade"):  # a graded cell the instructor edition lacks
            cell.metadata["nbgrader"]["grade"] = False
    nb.cells += [copy.deepcopy(c) for gid, c in wanted.items() if gid not in present]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child runs in its own session: its group is ours to end
    except (ProcessLookupError, PermissionError):
        pass


def execute(nb: NotebookNode, workdir: Path, cfg: GradeConfig) -> tuple[NotebookNode | None, str]:
    """Run ``nb`` in a child process and a fresh kernel; (executed notebook, "") or (None, why it has none)."""
    src, dst, pid_file = workdir / "in.ipynb", workdir / "out.ipynb", workdir / "kernel.pid"
    nbformat.write(nb, src)
    env = dict(os.environ, COURSE_QUICK="1" if cfg.quick else "0")
    # the kernel imports the same course_lib as this process (a checkout may differ from the installed one)
    lib_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (lib_root, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "course_lib.cli.grade", str(src), str(dst), str(cfg.cell_timeout_s), str(pid_file)]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=cfg.notebook_timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc.pid)
        if pid_file.exists():  # the kernel has a session of its own: end it too
            _kill(int(pid_file.read_text()))
        proc.communicate()
        return None, (f"not graded: the notebook did not finish within {cfg.notebook_timeout_s:g} s "
                      "(a cell that never ends?)")
    if pid_file.exists():
        _kill(int(pid_file.read_text()))  # normally gone already; a kernel must never outlive its grading
    if proc.returncode != 0 or not dst.exists():
        tail = " ".join(output.strip().splitlines()[-3:])[-300:]
        return None, f"not graded: the notebook could not be run ({tail})"
    return nbformat.read(dst, as_version=4), ""


def _feedback(cell: NotebookNode) -> str:
    for out in cell.outputs:
        if out.output_type == "error":
            prefix = "" if out.ename == "AssertionError" else f"{out.ename}: "
            return f"{prefix}{out.evalue}".strip()
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream").strip()


def score_notebook(executed: NotebookNode) -> list[tuple[str, float, float, str]]:
    """(exercise, points, max points, feedback) of each graded cell, scored as nbgrader scores it; a graded cell
    that never ran (a cell before it ran past its limit) scores 0."""
    from nbgrader.utils import determine_grade

    run = executed.metadata.get("course_grade", {})
    stopped = run if "timed_out_cell" in run else None
    rows = []
    for i, cell in enumerate(executed.cells):
        if not cell.metadata.get("nbgrader", {}).get("grade"):
            continue
        gid = cell.metadata["nbgrader"]["grade_id"]
        max_points = float(cell.metadata["nbgrader"]["points"])
        if stopped and (stopped["timed_out_cell"] is None or i >= stopped["timed_out_cell"]):
            rows.append((gid, 0.0, max_points, f"not graded: cell {stopped['timed_out_cell']} ran past the limit "
                         f"of {stopped['cell_timeout_s']:g} s per cell (an endless loop?); the run stopped there"))
            continue
        points, max_points = determine_grade(cell)
        rows.append((gid, float(points or 0.0), max_points, _feedback(cell)))
    return rows


def find_submissions(submissions: Path) -> list[tuple[str, Path]]:
    """(learner, notebook) pairs: ``SUBMISSIONS/<learner>/**/<NN_name>.ipynb`` (nbgrader's ``submitted/`` too)."""
    submissions = Path(submissions)
    if not submissions.is_dir():
        raise ValueError(f"SUBMISSIONS {submissions} is not a folder; give the folder that holds one folder per "
                         "learner (LEARNER/NN_name.ipynb)")
    found = []
    for path in sorted(submissions.rglob("*.ipynb")):
        rel = path.relative_to(submissions)
        if ".ipynb_checkpoints" in rel.parts:
            continue
        if len(rel.parts) < 2:
            raise ValueError(f"{path} is not inside a learner's folder; lay submissions out as "
                             "SUBMISSIONS/<learner>/<notebook>.ipynb")
        found.append((rel.parts[0], path))
    if not found:
        raise ValueError(f"SUBMISSIONS {submissions} holds no .ipynb notebooks")
    return found


def grade_submissions(submissions: Path, source: Path, cfg: GradeConfig = GradeConfig()) -> list[Score]:
    """Grade every submitted notebook against the instructor edition of the source notebook of the same name."""
    sources = {p.name: p for p in Path(source).rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts}
    if not sources:
        raise ValueError(f"--source {source} holds no notebooks; give the course's notebooks/ folder")
    scores: list[Score] = []
    for learner, path in find_submissions(submissions):
        if path.name not in sources:
            scores.append(Score(learner, path.stem, "-", 0.0, 0.0, f"not graded: no source notebook {path.name}"))
            continue
        instructor = instructor_edition(nbformat.read(sources[path.name], as_version=4))
        try:
            submission = nbformat.read(path, as_version=4)
        except Exception as e:  # a broken file is that learner's problem, not the whole run's
            executed, why = None, f"not graded: the file is not a notebook ({type(e).__name__}: {e})"
        else:
            with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
                executed, why = execute(graded_notebook(submission, instructor), Path(tmp), cfg)
        if executed is None:
            scores += [Score(learner, path.stem, c.metadata["nbgrader"]["grade_id"], 0.0,
                             float(c.metadata["nbgrader"]["points"]), why) for c in _grade_cells(instructor)]
        else:
            scores += [Score(learner, path.stem, *row) for row in score_notebook(executed)]
    return scores


def write_gradebook(scores: list[Score], out_csv: Path) -> tuple[Path, Path]:
    """Write the CSV (one row per learner x exercise) and a Markdown table beside it (``.md``)."""
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["learner", "notebook", "exercise", "points", "max_points", "feedback"])
        for s in scores:
            w.writerow([s.learner, s.notebook, s.exercise, f"{s.points:g}", f"{s.max_points:g}", s.feedback])
    learners = sorted({s.learner for s in scores})
    columns = list(dict.fromkeys((s.notebook, s.exercise) for s in scores))
    cell = {(s.learner, s.notebook, s.exercise): s for s in scores}
    lines = ["| learner | " + " | ".join(f"{nb}: {ex}" for nb, ex in columns) + " | total |",
             "|---|" + "---:|" * (len(columns) + 1)]
    for learner in learners:
        mine = [cell.get((learner, nb, ex)) for nb, ex in columns]
        got = sum(s.points for s in mine if s)
        top = sum(s.max_points for s in mine if s)
        lines.append(f"| {learner} | " + " | ".join(f"{s.points:g}" if s else "-" for s in mine)
                     + f" | {got:g} / {top:g} |")
    lines += ["", "## Feedback on what did not pass", ""]
    lines += [f"- **{s.learner}**, {s.notebook}, {s.exercise}: {s.feedback.replace(chr(10), ' ')}"
              for s in scores if s.points < s.max_points] or ["- every check passed"]
    out_md = out_csv.with_suffix(".md")
    out_md.write_text("\n".join(lines) + "\n")
    return out_csv, out_md


def _run_one(src: str, dst: str, cell_timeout_s: str, pid_file: str) -> int:
    """The child process: execute one notebook in a fresh kernel. Errors are recorded and the run goes on; a cell
    past its limit ends the run (the kernel is shut down), its index kept in the notebook's metadata."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError

    nb = nbformat.read(src, as_version=4)
    # no interrupt-and-go-on: an interrupt that lands late breaks the next cell, and the grade with it
    client = NotebookClient(nb, timeout=int(float(cell_timeout_s)), allow_errors=True, interrupt_on_timeout=False,
                            kernel_name="python3", resources={"metadata": {"path": str(Path(src).parent)}})
    client.on_notebook_start = lambda notebook: Path(pid_file).write_text(json.dumps(client.km.provisioner.pid))
    running = {}
    client.on_cell_start = lambda cell, cell_index: running.update(index=cell_index)
    nb.metadata["course_grade"] = {"cell_timeout_s": float(cell_timeout_s)}
    try:
        client.execute()
    except CellTimeoutError:
        nb.metadata["course_grade"]["timed_out_cell"] = running.get("index")
    nbformat.write(nb, dst)
    return 0


if __name__ == "__main__":
    sys.exit(_run_one(*sys.argv[1:5]))


# --- the command: python -m course_lib grade ------------------------------------

HELP = "grade submitted notebooks into a CSV and Markdown gradebook"


def add_arguments(p) -> None:
    p.add_argument("submissions", help="folder with one folder per learner: LEARNER/NN_name.ipynb")
    p.add_argument("--out", default="gradebook.csv", help="the CSV to write (the Markdown goes beside it)")
    p.add_argument("--source", default=str(NOTEBOOKS), help="the source notebooks (default: this checkout's)")
    p.add_argument("--notebook-timeout", type=float, default=900.0, help="seconds per notebook")
    p.add_argument("--cell-timeout", type=float, default=300.0, help="seconds per cell")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args) -> int:
    check_new_file(Path(args.out), "--out", args.overwrite)
    cfg = GradeConfig(notebook_timeout_s=args.notebook_timeout, cell_timeout_s=args.cell_timeout)
    scores = grade_submissions(Path(args.submissions), Path(args.source), cfg)
    out_csv, out_md = write_gradebook(scores, Path(args.out))
    print(f"{len({s.learner for s in scores})} learners, {len(scores)} graded checks: {out_csv}, {out_md}")
    return 0

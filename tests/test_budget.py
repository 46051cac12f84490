"""The memory and time budget (scripts/notebook_budget.py): the measurement, the report, and the pytest plugin.

The course's own notebooks are checked against the budget during the nbval pass of ``make test`` (the plugin adds a
``memory-budget`` item per notebook), so CI runs every notebook once. These tests check that the measuring itself
is right, on small notebooks that allocate a known amount of memory: a check that could never fail would be worse
than none.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts import notebook_budget as nbb  # noqa: E402

ALLOC_MB = 300


def _notebook(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def notebooks(tmp_path):
    """One notebook that holds ALLOC_MB of touched memory for a moment, one tiny one, one that raises."""
    big = _notebook(tmp_path / "big.ipynb", "import numpy as np",
                    f"a = np.ones({ALLOC_MB} * 2**20 // 8)  # touched, so it is resident\ns = float(a.sum())",
                    "del a")
    small = _notebook(tmp_path / "small.ipynb", "x = sum(range(1000))", "print(x)")
    broken = _notebook(tmp_path / "broken.ipynb", "y = 1", "1 / 0", "print('never')")
    return big, small, broken


def test_high_water_mark_sees_a_freed_spike():
    if not Path(f"/proc/{os.getpid()}/status").exists():
        pytest.skip("VmHWM needs Linux /proc; elsewhere only the sampled RSS is measured")
    before = nbb.high_water_mb(os.getpid())
    spike = np.ones(int(before + 100) * 2**20 // 8)  # more than this process ever held: the mark has to move
    spike.sum()
    del spike
    after = nbb.high_water_mb(os.getpid())
    assert after >= before + 80, f"the peak did not register: {before:.0f} -> {after:.0f} MB"
    assert nbb.tree_rss_mb(os.getpid()) < after, "the current RSS should be below the peak after freeing"


def test_report_marks_over_budget_and_failed_notebooks(tmp_path):
    rows = [nbb.BudgetRow("notebooks/01_a.ipynb", 900.0, 12.0, 10, True),
            nbb.BudgetRow("notebooks/02_b.ipynb", 2500.0, 30.0, 10, True),
            nbb.BudgetRow("notebooks/03_c.ipynb", 100.0, 1.0, 3, False, error="ZeroDivisionError: division by zero")]
    md = nbb.write_reports(rows, 2048, True, tmp_path / "b.json", tmp_path / "b.md", {"cpu_count": 2})
    assert "| 01_a.ipynb | 900 | 12.0 | yes |" in md
    assert "| 02_b.ipynb | 2500 | 30.0 | OVER |" in md
    assert "FAILED: ZeroDivisionError" in md
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["limit_mb"] == 2048 and [r["peak_mb"] for r in record["rows"]] == [900.0, 2500.0, 100.0]
    assert (tmp_path / "b.md").read_text() == md


def test_bad_limit_is_refused(monkeypatch):
    monkeypatch.setenv(nbb.LIMIT_ENV, "two gigabytes")
    with pytest.raises(ValueError, match="COURSE_BUDGET_MB=2048"):
        nbb._limit_from_env()


@pytest.mark.slow
def test_script_measures_each_notebook_in_its_own_kernel(notebooks, tmp_path):
    big, small, broken = notebooks
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "notebook_budget.py"), str(big), str(small),
                        str(broken), "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, f"a failing notebook must fail the script:\n{r.stdout}\n{r.stderr}"
    rows = {Path(row["notebook"]).name: row for row in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert rows["big.ipynb"]["ok"] and rows["small.ipynb"]["ok"]
    # The big notebook's kernel held ALLOC_MB more than the small one's (both pay the same interpreter start-up).
    delta = rows["big.ipynb"]["peak_mb"] - rows["small.ipynb"]["peak_mb"]
    assert ALLOC_MB * 0.9 <= delta <= ALLOC_MB * 1.5, f"expected about {ALLOC_MB} MB more, measured {delta:.0f}"
    assert rows["big.ipynb"]["peak_cell"] == 1, "the biggest rise belongs to the cell that allocated"
    assert not rows["broken.ipynb"]["ok"] and "ZeroDivisionError" in rows["broken.ipynb"]["error"]
    assert "| big.ipynb |" in (tmp_path / "b.md").read_text()


@pytest.mark.slow
def test_plugin_adds_a_budget_item_that_fails_over_the_limit(notebooks, tmp_path):
    big, small, _ = notebooks
    # A limit between the two notebooks' peaks: the big one must fail its budget item, the small one pass.
    env = dict(os.environ, **{nbb.LIMIT_ENV: "250", nbb.REPORT_DIR_ENV: str(tmp_path / "reports")})
    r = subprocess.run([sys.executable, "-m", "pytest", "-c", os.devnull, "--rootdir", str(tmp_path), "-p",
                        "no:cacheprovider", "-p", "scripts.notebook_budget", "--nbval-lax", "-v", str(big),
                        str(small)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert re.search(r"big\W+ipynb::memory-budget FAILED", out), out[-3000:]
    assert re.search(r"small\W+ipynb::memory-budget PASSED", out), out[-3000:]
    assert "over the 250 MB budget" in out
    assert r.returncode == 1
    record = json.loads((tmp_path / "reports" / "notebook_budget.json").read_text())
    assert [Path(row["notebook"]).name for row in record["rows"]] == ["big.ipynb", "small.ipynb"]


def test_bare_figure_text_is_caught():
    bare = {"output_type": "display_data", "data": {"text/plain": "<Figure size 700x450 with 1 Axes>"}}
    drawn = {"output_type": "display_data",
             "data": {"text/plain": "<Figure size 700x450 with 1 Axes>", "image/png": "iVBORw0KGgo="}}
    printed = {"output_type": "stream", "name": "stdout", "text": "a figure: <Figure size 640x480 with 2 Axes>\n"}
    result = {"output_type": "execute_result", "data": {"text/plain": ["<Figure size 1100x420 with 0 Axes>"]}}
    assert nbb.bare_figures([bare]) == ["<Figure size 700x450 with 1 Axes>"]
    assert nbb.bare_figures([drawn, printed]) == []
    assert nbb.bare_figures([result]) == ["<Figure size 1100x420 with 0 Axes>"]


@pytest.mark.slow
def test_plugin_fails_a_cell_that_shows_a_figure_as_text(tmp_path):
    """The notebook-09 bug: a Figure built without pyplot, displayed before the inline backend is loaded."""
    bare = _notebook(tmp_path / "bare.ipynb", "import matplotlib.pyplot as plt\nfrom matplotlib.figure import Figure",
                     "fig = Figure(figsize=(7, 4.5)); fig.add_subplot().plot([1, 2])\ndisplay(fig)")
    shown = _notebook(tmp_path / "shown.ipynb", "from matplotlib.figure import Figure\n"
                      "from course_lib.plotting import show", "fig = Figure(figsize=(7, 4.5))\n"
                      "fig.add_subplot().plot([1, 2])\nshow(fig)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{nbb.REPORT_DIR_ENV: str(tmp_path / "reports")})
    r = subprocess.run([sys.executable, "-m", "pytest", "-c", os.devnull, "--rootdir", str(tmp_path), "-p",
                        "no:cacheprovider", "-p", "scripts.notebook_budget", "--nbval-lax", "-v", str(bare),
                        str(shown)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert re.search(r"bare\W+ipynb::Cell 1 FAILED", out), out[-3000:]
    assert "figure printed as text instead of a picture" in out, out[-3000:]
    assert re.search(r"shown\W+ipynb::Cell 1 PASSED", out), out[-3000:]
    assert r.returncode == 1


def test_full_mode_budget_is_3_gb_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv(nbb.LIMIT_ENV, raising=False)
    assert nbb._limit_from_env() == 2048 and nbb._limit_from_env(full=True) == 3072
    monkeypatch.setenv(nbb.LIMIT_ENV, "4096")
    assert nbb._limit_from_env() == nbb._limit_from_env(full=True) == 4096


@pytest.mark.slow
def test_full_mode_runs_the_kernel_with_quick_mode_off_and_names_the_slowest_cell(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_QUICK", "1")  # a quick-mode shell: --full must still turn it off in the kernel
    nb = _notebook(tmp_path / "full.ipynb", "import os, time\nassert os.environ['COURSE_QUICK'] == '0'",
                   "t = time.process_time()\nwhile time.process_time() - t < 1.5:\n    pass", "x = 1")
    row = nbb.run_notebook(nb, quick=False)
    assert row.ok, row.error
    assert row.slowest_cells[0][0] == 1 and row.slowest_cells[0][1] >= 1.5
    assert row.cpu_s >= 1.5, "the kernel burnt 1.5 s of CPU in cell 1"
    assert not nbb.run_notebook(nb, quick=True).ok, "in quick mode the kernel sees COURSE_QUICK=1"

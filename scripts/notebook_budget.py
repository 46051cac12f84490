"""Peak memory and wall time of every notebook: does the course fit in Binder's 2 GB?

Binder gives a learner about 2 GB of memory and a share of a CPU. This script runs each notebook (quick mode by
default, the size Binder opens them in) in a kernel of its own, records the kernel's peak resident memory and the
wall time, writes JSON and a Markdown table, and exits 1 when a notebook fails or goes over the limit.

    python scripts/notebook_budget.py                       # every notebooks/*.ipynb, quick mode
    python scripts/notebook_budget.py --full notebooks/05_*.ipynb notebooks/09_*.ipynb   # full mode, limit 3 GB

Full mode (``--full``, ``COURSE_QUICK=0``) is what ``make lab`` opens: its budget is 3 GB and, on an idle 2-core
machine, under 10 minutes per notebook. Its reports go to ``reports/notebook_budget_full.{json,md}`` so that the
quick ones stay. Each row also names the slowest cells (index and seconds): where to look when a notebook is slow.

How the peak is measured: the kernel's own high-water mark (``VmHWM`` in ``/proc/<pid>/status``, kept by the
Linux kernel itself, so no short spike is missed), read after every cell, and a 0.2 s sample of the resident
memory of the kernel and everything it started, summed (for the rare cell that starts worker processes). The
larger of the two is reported. The JupyterLab server itself (about 100-150 MB) comes on top on Binder.

The same measurement runs inside the test suite as a pytest plugin (``-p scripts.notebook_budget``, see the
Makefile): every notebook nbval executes gets one more test item, ``<notebook>::memory-budget``, that fails when
the kernel went over the limit. CI runs each notebook once, and the budget is checked on that same run. The
plugin also fails a cell whose output is a figure's text (``<Figure size 700x450 with 1 Axes>``) in place of the
figure: the plot a learner never sees.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
LIMIT_ENV = "COURSE_BUDGET_MB"
REPORT_DIR_ENV = "COURSE_BUDGET_REPORT_DIR"  # where the pytest plugin writes its report (default: reports/)
DEFAULT_LIMIT_MB = 2048.0  # Binder's usual memory limit per user
FULL_LIMIT_MB = 3072.0  # full mode (make lab on a learner's own machine): 3 GB
MB = 1024 * 1024


@dataclass(frozen=True)
class BudgetRow:
    """One notebook's measurement."""

    notebook: str
    peak_mb: float  # max of the kernel's high-water mark and the sampled process-tree sum
    wall_s: float
    cells: int
    ok: bool  # ran without an error
    error: str = ""
    peak_cell: int | None = None  # index of the cell that raised the kernel's high-water mark the most
    slowest_cells: tuple = ()  # ((index, seconds), ...): the three slowest cells, slowest first
    cpu_s: float | None = None  # CPU seconds of the kernel and its children: wall / cpu_s shows a busy machine

    def within(self, limit_mb: float) -> bool:
        return self.ok and self.peak_mb <= limit_mb


def high_water_mb(pid: int) -> float:
    """Peak resident memory of one process so far (Linux ``VmHWM``); its current RSS where that is unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        return psutil.Process(pid).memory_info().rss / MB
    except psutil.Error:
        return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its finished children so far."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system + t.children_user + t.children_system


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, now."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / MB


class PeakSampler:
    """Samples the summed RSS of a process tree in a background thread; ``peak_mb`` is the largest sum seen."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.pid, self.interval_s, self.peak_mb = pid, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, tree_rss_mb(self.pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _kernel_pid(km) -> int | None:
    """The pid of a jupyter_client KernelManager's kernel process."""
    prov = getattr(km, "provisioner", None)
    pid = getattr(prov, "pid", None) or getattr(getattr(prov, "process", None), "pid", None)
    return pid or getattr(getattr(km, "kernel", None), "pid", None)


def run_notebook(path: Path, quick: bool = True, timeout_s: float = 1800, executed: Path | None = None) -> BudgetRow:
    """Execute one notebook in a fresh kernel (cwd = its folder) and measure it. Nothing is written back; with
    ``executed`` (a folder) the executed copy, outputs included, is written there to read its verdicts."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    os.environ["COURSE_QUICK"] = "1" if quick else "0"  # the kernel inherits this process's environment
    client = NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    rise, peak_cell, error, cell_s = 0.0, None, "", []
    t0 = time.perf_counter()
    with client.setup_kernel():
        pid = _kernel_pid(client.km)
        if pid is None:
            raise RuntimeError("cannot find the kernel's process id; is jupyter_client >= 8 installed?")
        hwm = high_water_mb(pid)  # the idle kernel: each cell's rise is measured from here
        with PeakSampler(pid) as sampler:
            for index, cell in enumerate(nb.cells):
                print(f"cell {index} started at {time.perf_counter() - t0:.1f} s, kernel CPU {cpu_seconds(pid):.1f} s",
                      file=sys.stderr, flush=True)
                started = time.perf_counter()
                try:
                    client.execute_cell(cell, index)
                except CellExecutionError as e:
                    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()  # drop the colours
                    error = lines[-1][:300] if lines else type(e).__name__
                finally:
                    cell_s.append((index, round(time.perf_counter() - started, 1)))
                    # Which cell raised the high-water mark the most: where to look when a notebook is over.
                    now = high_water_mb(pid)
                    if now - hwm > rise:
                        rise, peak_cell = now - hwm, index
                    hwm = max(hwm, now)
                if error:
                    break
            cpu = cpu_seconds(pid)  # read while the kernel is alive
    wall = time.perf_counter() - t0
    if executed is not None:
        Path(executed).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(executed) / Path(path).name)
    return BudgetRow(notebook=_display(path), peak_mb=round(max(hwm, sampler.peak_mb), 1), wall_s=round(wall, 1),
                     cells=len(nb.cells), ok=not error, error=error, peak_cell=peak_cell,
                     slowest_cells=tuple(sorted(cell_s, key=lambda c: -c[1])[:3]), cpu_s=round(cpu, 1))


# What IPython shows for a matplotlib Figure when no formatter turns it into a picture (a Figure built without
# pyplot, before the inline backend was loaded): the learner sees this line instead of the plot.
BARE_FIGURE = re.compile(r"<(?:matplotlib\.figure\.)?Figure size \d+(?:\.\d+)?x\d+(?:\.\d+)? with \d+ Axes>")


def bare_figures(outputs: list[dict]) -> list[str]:
    """The outputs of one cell that are a Figure's text in place of its picture (display_data / execute_result)."""
    bad = []
    for out in outputs:
        data = out.get("data") or {}
        text = data.get("text/plain", "")
        text = "".join(text) if isinstance(text, list) else text
        has_picture = any(k.startswith("image/") or k in ("text/html", "application/pdf") for k in data)
        if BARE_FIGURE.fullmatch(text.strip()) and not has_picture:
            bad.append(text.strip())
    return bad


def _display(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def machine() -> dict:
    """Where the figures were measured (they change with the machine)."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
            "date": _dt.datetime.now().isoformat(timespec="seconds")}
    if hasattr(os, "getloadavg"):  # how busy the machine was when the table was written: timings inflate with it
        info["load_avg_1m"], info["load_avg_15m"] = (round(x, 1) for x in os.getloadavg()[::2])
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def write_reports(rows: list[BudgetRow], limit_mb: float, quick: bool, json_path: Path | None,
                  md_path: Path | None, machine_info: dict | None = None) -> str:
    """Write the JSON record and the Markdown table; return the Markdown."""
    machine_info = machine_info or machine()
    lines = [f"Peak memory and wall time per notebook ({'quick' if quick else 'full'} mode), limit {limit_mb:.0f} MB.",
             f"Measured on {machine_info.get('platform')}, {machine_info.get('cpu_count')} CPU cores, "
             f"Python {machine_info.get('python')}, torch {machine_info.get('torch', '?')}, "
             f"{machine_info.get('date', '')[:10]}"
             + (f", load average {machine_info['load_avg_15m']} over the last 15 minutes"
                if "load_avg_15m" in machine_info else "") + ".", "",
             "| notebook | peak memory (MB) | wall time (s) | within budget |", "|---|---:|---:|---|"]
    for r in rows:
        verdict = "yes" if r.within(limit_mb) else ("FAILED: " + r.error if not r.ok else "OVER")
        lines.append(f"| {Path(r.notebook).name} | {r.peak_mb:.0f} | {r.wall_s:.1f} | {verdict} |")
    md = "\n".join(lines) + "\n"
    record = {"limit_mb": limit_mb, "quick": quick, "machine": machine_info, "rows": [asdict(r) for r in rows]}
    for path, text in ((json_path, json.dumps(record, indent=2)), (md_path, md)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    return md


def _limit_from_env(full: bool = False) -> float:
    """The budget in MB: ``COURSE_BUDGET_MB`` when set, else 2 GB in quick mode (Binder) and 3 GB in full mode."""
    raw = os.environ.get(LIMIT_ENV, "")
    try:
        return float(raw) if raw else (FULL_LIMIT_MB if full else DEFAULT_LIMIT_MB)
    except ValueError as e:
        raise ValueError(f"{LIMIT_ENV}={raw!r} is not a number of MB; use e.g. {LIMIT_ENV}=2048") from e


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    p.add_argument("--full", action="store_true",
                   help="full mode (COURSE_QUICK=0, what make lab opens) instead of quick mode; limit 3 GB")
    p.add_argument("--limit-mb", type=float, default=None,
                   help=f"memory budget per notebook (default: ${LIMIT_ENV}, else {DEFAULT_LIMIT_MB:.0f} quick, "
                        f"{FULL_LIMIT_MB:.0f} full)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per cell")
    p.add_argument("--notebook-timeout", type=float, default=1800, help="seconds per notebook, kernel start included")
    p.add_argument("--json", type=Path, help="default: reports/notebook_budget.json (_full.json with --full)")
    p.add_argument("--markdown", type=Path, help="default: reports/notebook_budget.md (_full.md with --full)")
    p.add_argument("--executed", type=Path, help="also write each executed notebook (with its outputs) here")
    p.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: measure one notebook, print JSON
    args = p.parse_args(argv)
    if args.limit_mb is None:
        args.limit_mb = _limit_from_env(args.full)
    stem = "notebook_budget_full" if args.full else "notebook_budget"
    args.json = args.json or ROOT / "reports" / f"{stem}.json"
    args.markdown = args.markdown or ROOT / "reports" / f"{stem}.md"
    if args.limit_mb <= 0:
        p.error("--limit-mb must be positive, e.g. --limit-mb 2048")

    if args.one:
        print(json.dumps(asdict(run_notebook(args.one, quick=not args.full, timeout_s=args.timeout,
                                             executed=args.executed))))
        return 0

    paths = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    if not paths:
        p.error("no notebooks found; pass paths or add notebooks/NN_*.ipynb")
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the script also runs where only the notebooks' own dependencies are installed
        def tqdm(x, **_):
            return x
    rows = []
    for path in tqdm(paths, desc="notebooks", unit="nb"):
        # A process per notebook: each kernel starts from nothing, and one notebook's leftovers never count
        # against the next.
        cmd = [sys.executable, __file__, "--one", str(path), "--timeout", str(args.timeout)]
        cmd += ["--full"] if args.full else []
        cmd += ["--executed", str(args.executed)] if args.executed else []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=args.notebook_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner and its kernel: a hung notebook must not stay behind
            out, err = proc.communicate()
            last = [ln for ln in err.splitlines() if ln.startswith("cell ")][-1:] or ["no cell started"]
            rows.append(BudgetRow(_display(path), 0.0, args.notebook_timeout, 0, False,
                                  error=f"timed out after {args.notebook_timeout:.0f} s ({last[0]})"))
            continue
        if proc.returncode != 0 or not out.strip():
            rows.append(BudgetRow(_display(path), 0.0, 0.0, 0, False, error=err.strip()[-300:]))
        else:
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(BudgetRow(**{**row, "slowest_cells": tuple(map(tuple, row.get("slowest_cells", ())))}))
    md = write_reports(rows, args.limit_mb, not args.full, args.json, args.markdown)
    print(md)
    bad = [r for r in rows if not r.within(args.limit_mb)]
    for r in bad:
        print(f"{r.notebook}: {'failed: ' + r.error if not r.ok else f'{r.peak_mb:.0f} MB > {args.limit_mb:.0f} MB'}",
              file=sys.stderr)
    return 1 if bad else 0


# --- pytest plugin: the same check on the notebooks nbval is already running ---------------------------------
# Loaded with `pytest -p scripts.notebook_budget`. nbval starts one kernel per notebook file and keeps it for all
# of that file's cells; the plugin adds one item after the last cell that reads the kernel's high-water mark,
# so the budget costs no second run of the notebooks.

try:
    import pytest
except ImportError:  # the script alone needs no pytest
    pytest = None

if pytest is not None:
    _ROWS: list[BudgetRow] = []
    _STARTS: dict[str, float] = {}
    _CELLS: dict[str, int] = {}

    def _is_nbval_file(node) -> bool:
        return type(node).__name__ == "IPyNbFile" and hasattr(node, "kernel")

    class NotebookBudgetItem(pytest.Item):
        """``<notebook>::memory-budget``: the kernel that ran this notebook's cells stayed under the limit."""

        def runtest(self) -> None:
            nbfile = self.parent
            kernel = getattr(nbfile, "kernel", None)
            pid = _kernel_pid(getattr(kernel, "km", None)) if kernel is not None else None
            if pid is None:
                pytest.skip("nbval's kernel is not running (did an earlier cell stop the notebook?)")
            limit = _limit_from_env()
            peak = max(high_water_mb(pid), tree_rss_mb(pid))
            wall = time.perf_counter() - _STARTS.get(nbfile.nodeid, time.perf_counter())
            row = BudgetRow(_display(Path(str(nbfile.path))), round(peak, 1), round(wall, 1),
                            _CELLS.get(nbfile.nodeid, 0), True)
            _ROWS.append(row)
            if peak > limit:
                raise AssertionError(f"{row.notebook}: the kernel peaked at {peak:.0f} MB, over the {limit:.0f} MB "
                                     f"budget (Binder's memory per user); shrink the quick-mode sizes "
                                     f"(course_lib.nb.pick) or free tensors you no longer need")

        def repr_failure(self, excinfo, style=None):
            if isinstance(excinfo.value, AssertionError):  # the message says it all; pytest's traceback would not
                return str(excinfo.value)
            return super().repr_failure(excinfo, style=style)

        def reportinfo(self):
            return self.path, None, f"{self.parent.name}::memory-budget"

    def pytest_collection_modifyitems(session, config, items):
        out, last_parent = [], None
        for item in items:
            parent = item.parent
            if _is_nbval_file(parent):
                _CELLS[parent.nodeid] = _CELLS.get(parent.nodeid, 0) + 1
            if last_parent is not None and parent is not last_parent and _is_nbval_file(last_parent):
                out.append(NotebookBudgetItem.from_parent(last_parent, name="memory-budget"))
            out.append(item)
            last_parent = parent
        if last_parent is not None and _is_nbval_file(last_parent):
            out.append(NotebookBudgetItem.from_parent(last_parent, name="memory-budget"))
        items[:] = out

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(item):
        """Every executed notebook cell: a Figure must show as a picture, never as ``<Figure size ...>`` text."""
        result = yield
        if type(item).__name__ == "IPyNbCell":
            bad = bare_figures(getattr(item, "test_outputs", None) or [])
            if bad:
                raise AssertionError(
                    f"{item.name}: a figure printed as text instead of a picture ({bad[0]}): a Figure built without "
                    "pyplot has no notebook formatter; show it with course_lib.plotting.show(fig)")
        return result

    def pytest_runtest_setup(item):
        if _is_nbval_file(item.parent):
            _STARTS.setdefault(item.parent.nodeid, time.perf_counter())

    def pytest_sessionfinish(session, exitstatus):
        if _ROWS:
            quick = os.environ.get("COURSE_QUICK", "0").strip().lower() in ("1", "true", "yes", "on")
            out = Path(os.environ.get(REPORT_DIR_ENV) or ROOT / "reports")
            write_reports(_ROWS, _limit_from_env(), quick, out / "notebook_budget.json", out / "notebook_budget.md")

    def pytest_terminal_summary(terminalreporter):
        if _ROWS:
            terminalreporter.write_sep("-", f"notebook memory budget, limit {_limit_from_env():.0f} MB")
            for r in _ROWS:
                terminalreporter.write_line(f"{Path(r.notebook).name:<40} {r.peak_mb:7.0f} MB {r.wall_s:7.1f} s")


if __name__ == "__main__":
    sys.exit(main())

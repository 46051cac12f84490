"""CI runs the GPU check's dry mode: the same device plumbing and table, on the CPU, in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_mode_runs_the_plumbing_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COURSE_DEVICE": "cpu"}
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py"), "--dry", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dry"] and report["device"].startswith("cpu")
    assert "pytest -m gpu" in report["tests"]["command"]
    assert set(report["notebooks"]) == {p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    measured = {(r["shape"], r["format"]) for r in report["table"] if r["status"] == "measured"}
    assert measured == {("smollm2-135m", f) for f in ("bf16", "int8", "int4")}, report["table"]
    rows = {(r["format"], r["loop"]): r for r in report["table"] if r["shape"] == "smollm2-135m"}
    assert all(rows[(f, "compiled")]["tok_s"] > 0 for f in ("bf16", "int8", "int4"))
    assert rows[("int4", "compiled")]["weight_mb"] < rows[("bf16", "compiled")]["weight_mb"]
    assert "n/a on cpu" in rows[("bf16", "compiled + CUDA graphs")]["status"]
    assert "measured bandwidth" in res.stdout and "% of BW" in res.stdout

"""``python -m course_lib bench``: every headline number, reproducible, as JSON.

Each suite lives in its own module ``course_lib/bench/<suite>.py`` (``-`` in a suite's name is ``_`` in its
module's: ``serve-real`` is ``serve_real.py``) and exposes
``run(quick: bool) -> dict`` returning ``{"machine": {...}, "rows": [...]}``.
Suites whose module is not there yet are reported as missing, not faked.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path

import torch

from .._checks import check_flag
from ..device import course_device
from .report import check_outputs, update_readme, write_report

log = logging.getLogger(__name__)

SUITES = ("decode", "quant", "prune", "distill", "serve", "engines", "serve-real")


def machine_info() -> dict:
    """What the numbers were measured on."""
    dev = course_device()  # the device every suite puts its models on
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
        "torch": torch.__version__,
    }


def suite_module(suite: str) -> str:
    """The module of a suite: ``course_lib.bench.serve_real`` for ``serve-real``."""
    return f"{__name__}.{suite.replace('-', '_')}"


def available_suites() -> list[str]:
    """Suites whose module exists in this install."""
    return [s for s in SUITES if importlib.util.find_spec(suite_module(s)) is not None]


def run_bench(suites: list[str] | None = None, quick: bool = False, json_path: str | None = None,
              report_dir: str | None = None, readme: str | None = None, overwrite: bool = False) -> dict:
    """Run the chosen suites (default: all that exist), write JSON / a report / the README block; return the result.

    Every output is checked before the first suite starts: colliding paths, and existing files unless
    ``overwrite`` (the README's bench block is rewritten in place, as ``readme`` asks).
    """
    check_flag("quick", quick)
    if isinstance(suites, str):  # run_bench("decode") means that one suite, not the letters d, e, c, ...
        suites = [suites]
    chosen = suites or available_suites()
    unknown = [s for s in chosen if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    missing = [s for s in chosen if s not in available_suites()]
    if missing:
        raise ValueError(f"suite(s) {missing} are not implemented yet; available: {available_suites()}")

    check_outputs(json_path, report_dir, readme, overwrite)  # before the run, not after minutes of benchmarking
    result = {"machine": machine_info(), "quick": quick, "rows": []}
    for name in chosen:
        log.info("running suite %s (quick=%s)", name, quick)
        out = importlib.import_module(suite_module(name)).run(quick=quick)
        result["machine"].update(out.get("machine", {}))
        result["rows"].extend(out["rows"])
    try:
        _write_outputs(result, json_path, report_dir, readme, overwrite)
    except OSError as e:  # checked up front, but a disk can still fill up: the run's numbers are never lost
        fd, keep = tempfile.mkstemp(prefix="course_bench_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
        raise ValueError(f"writing the outputs failed after the run ({e}); its results are kept in {keep}") from e
    return result


def _write_outputs(result: dict, json_path, report_dir, readme, overwrite: bool) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    if report_dir:
        write_report(result, Path(report_dir), overwrite=overwrite)
    if readme:
        update_readme(Path(readme), result, Path(report_dir) if report_dir else None)

"""``python -m course_lib assets``: redraw the figures of ``assets/`` from the code that draws them.

``make assets`` runs it, so a picture never drifts from its code; a test checks that what is committed is what
this command draws.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib.pyplot as plt

from ..bench.report import plot_decode_roofline, plot_pareto
from ..models import speed_lab_config
from ..plotting import plot_taxonomy
from ..roofline import VENDOR_PRESETS, decode_cost, plot_roofline, prefill_cost

HELP = "redraw the course's figures into assets/ (make assets)"

# Which notebook takes up each method of the taxonomy (notebook 02 draws the same map).
TAXONOMY_CHAPTERS = {"KV cache": "03", "better attention kernels": "03", "batching": "03/10", "compilation": "03",
                     "speculative decoding": "07", "GPU / TPU": "04", "lower-precision dtypes": "04",
                     "memory bandwidth": "04/08", "quantization 量化": "05", "pruning 剪枝": "06",
                     "distillation 蒸馏": "07"}
# The recorded benchmark run the README shows (python -m course_lib bench ... --report docs/results).
RESULTS_MD = "docs/results/results.md"
_PNG = {"dpi": 100, "metadata": {"Software": None}}  # no version stamp: the same drawing gives the same bytes


def read_results_markdown(path) -> dict:
    """A bench report's ``results.md`` back into ``{"machine": {...}, "rows": [...]}`` (numbers as floats).

    The report rounds to 4 significant digits, which is plenty for a plot.
    """
    text = Path(path).read_text()
    machine = {}
    if m := re.search(r"bandwidth_gbs: ([0-9.]+)", text):
        machine["bandwidth_gbs"] = float(m.group(1))
    rows, cols = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            cols = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cols is None:
            cols = cells
        elif not all(set(c) <= set("-:") for c in cells):
            row = {}
            for k, v in zip(cols, cells):
                if v:
                    try:
                        row[k] = float(v)
                    except ValueError:
                        row[k] = v
            rows.append(row)
    return {"machine": machine, "rows": rows}


def _roofline_sketch():
    """Where decode and prefill of real model shapes sit on a GPU's roofline (predicted from the shapes)."""
    hw = next(h for name, h in VENDOR_PRESETS.items() if name.startswith("NVIDIA H100"))
    points = []
    for model in ("smollm2-135m", "llama-3.2-1b"):
        cfg = speed_lab_config(model)
        for label, cost in ((f"{model} decode, batch 1", decode_cost(cfg, 1, 512)),
                            (f"{model} decode, batch 64", decode_cost(cfg, 64, 512)),
                            (f"{model} prefill, 512 tokens", prefill_cost(cfg, 1, 512))):
            attainable = min(cost.intensity * hw.bandwidth_gbs, hw.peak("bf16"))
            points.append({"label": f"{label} (predicted)", "intensity": cost.intensity, "gflops": attainable})
    return plot_roofline(hw, points, "bf16")


def write_assets(out_dir="assets", results_md=None) -> list:
    """Draw every figure of ``assets/`` into ``out_dir``; return the paths written.

    ``taxonomy.png`` (notebook 02), ``roofline_sketch.png`` (notebook 08's picture, predicted for an H100), and
    the README's results plots ``pareto.png`` / ``decode_roofline.png`` redrawn from the recorded run in
    ``results_md`` (default: docs/results/results.md beside this package, when it is there).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"taxonomy": plot_taxonomy(TAXONOMY_CHAPTERS), "roofline_sketch": _roofline_sketch()}
    results = Path(results_md) if results_md else Path(__file__).resolve().parents[2] / RESULTS_MD
    if results.is_file():
        recorded = read_results_markdown(results)
        figures["pareto"] = plot_pareto(recorded["rows"])
        figures["decode_roofline"] = plot_decode_roofline(recorded["rows"], recorded["machine"].get("bandwidth_gbs"))
    written = []
    for name, fig in figures.items():
        if fig is None:  # the recorded run has no rows with this plot's columns
            continue
        path = out / f"{name}.png"
        fig.savefig(path, **_PNG)
        plt.close(fig)
        written.append(path)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="assets", help="folder to write the PNGs into (default: assets)")
    p.add_argument("--results", default=None, help=f"a bench results.md to redraw (default: {RESULTS_MD})")


def run(args: argparse.Namespace) -> int:
    plt.switch_backend("Agg")  # a command: no window
    for path in write_assets(args.out, args.results):
        print(f"{path}  {path.stat().st_size / 1024:.0f} KB")
    return 0

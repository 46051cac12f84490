"""Figures for the first chapters. Each function returns a matplotlib Figure."""

from __future__ import annotations

import re
from collections.abc import Sequence

import matplotlib.pyplot as plt

# The article's taxonomy (its section 2 Mermaid chart): three families of methods.
TAXONOMY = {
    "Algorithm optimization\n算法优化": ["KV cache", "better attention kernels", "batching", "compilation",
                                     "speculative decoding"],
    "Hardware acceleration\n硬件加速": ["GPU / TPU", "lower-precision dtypes", "memory bandwidth"],
    "Model compression\n模型压缩": ["quantization 量化", "pruning 剪枝", "distillation 蒸馏"],
}


# Fonts with Chinese characters, in order of preference (Binder installs fonts-noto-cjk from binder/apt.txt).
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Serif CJK SC", "Source Han Sans SC",
             "Source Han Sans CN", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "AR PL UMing CN",
             "SimHei", "Microsoft YaHei", "PingFang SC", "Hiragino Sans GB", "Heiti SC", "Arial Unicode MS")
_CJK_TEXT = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef]+")


def cjk_font() -> str | None:
    """The name of an installed font that draws Chinese characters, or None where there is none."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in names), None)


def _without_cjk(text: str) -> str:
    """The English part of a bilingual label: 'pruning 剪枝' -> 'pruning'."""
    return "\n".join(" ".join(_CJK_TEXT.sub(" ", line).split()) for line in text.split("\n")).strip()


def plot_taxonomy(chapters: dict[str, str] | None = None):
    """The three families of speed-ups as a diagram; ``chapters`` maps a method to its notebook.

    The labels carry the article's Chinese terms where a CJK font is installed; elsewhere they are drawn in
    English alone, rather than as empty boxes under a wall of "Glyph ... missing from font" warnings.
    """
    chapters = chapters or {}
    cjk = cjk_font()
    # A font list falls back glyph by glyph: Latin from the default font, Chinese from the CJK one.
    font = {"fontfamily": [*plt.rcParams["font.family"], cjk]} if cjk else {}
    label = (lambda t: t) if cjk else _without_cjk
    fig, ax = plt.subplots(figsize=(11, 4.2))
    ax.axis("off")
    colors = ["#4c72b0", "#dd8452", "#55a868"]
    ax.text(0.5, 0.97, "faster LLM inference", ha="center", va="top", fontsize=13, weight="bold",
            bbox=dict(boxstyle="round", fc="#eeeeee"))
    for i, (family, methods) in enumerate(TAXONOMY.items()):
        x = (i + 0.5) / len(TAXONOMY)
        ax.annotate("", xy=(x, 0.78), xytext=(0.5, 0.88), arrowprops=dict(arrowstyle="->", color="gray"))
        ax.text(x, 0.74, label(family), ha="center", va="top", fontsize=11, color="white", weight="bold",
                bbox=dict(boxstyle="round", fc=colors[i]), **font)
        for j, m in enumerate(methods):
            text = label(m) + (f"  → {chapters[m]}" if m in chapters else "")
            ax.text(x, 0.52 - j * 0.1, text, ha="center", va="top", fontsize=9.5,
                    bbox=dict(boxstyle="round", fc="white", ec=colors[i]), **font)
    return fig


def plot_token_timeline(token_times: Sequence[float], title: str = ""):
    """When each token appeared: the first gap is TTFT (prefill), later gaps are decode steps."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    ms = [t * 1e3 for t in token_times]
    a.step(range(1, len(ms) + 1), ms, where="post")
    a.set_xlabel("tokens generated")
    a.set_ylabel("ms since request")
    a.set_title("time to each token")
    gaps = [ms[0]] + [y - x for x, y in zip(ms, ms[1:])]
    b.bar(range(1, len(gaps) + 1), gaps, color=["#dd8452"] + ["#4c72b0"] * (len(gaps) - 1))
    b.set_xlabel("token index")
    b.set_ylabel("ms for this token")
    b.set_title("orange: first token (prefill), blue: decode steps")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_rounding_error(w, w_hat, title: str = ""):
    """Two histograms side by side: the weights, and what rounding them to ``w_hat`` changed (notebook 05's panel).

    The figure title sits above the two subplot titles (constrained layout), never on top of them.
    """
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.1), layout="constrained")
    a1.hist(w.detach().flatten().float().numpy(), bins=120, color="tab:blue")
    a1.set_title("weights")
    a2.hist((w - w_hat).detach().flatten().float().numpy(), bins=120, color="tab:red")
    a2.set_title("rounding error")
    if title:
        fig.suptitle(title)
    return fig


def show(fig) -> None:
    """Show a Figure in a notebook as a PNG, whatever the backend.

    A Figure built without pyplot (``matplotlib.figure.Figure``, as the report's plots are, so they need no GUI)
    has no notebook formatter until the inline backend happens to be loaded: ``display(fig)`` then prints
    ``<Figure size 700x450 with 1 Axes>`` instead of the plot. A PNG always shows.
    """
    import io

    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    display(Image(data=buf.getvalue(), format="png"))
    plt.close(fig)  # a pyplot figure would otherwise show a second time at the end of the cell (no-op otherwise)


def show_in(out, fig) -> None:
    """Show a finished figure inside an ipywidgets ``Output`` and close it.

    Why not ``plt.show()`` in a widget callback: the inline backend then shows the figure *as pyplot draws it*,
    so a browser can catch a half-drawn plot, and the figure stays open and is shown again at the end of the
    cell. Build the figure under ``plt.ioff()``, then hand it over whole with this function.
    """
    from IPython.display import display

    with out:
        out.clear_output(wait=True)
        display(fig)
    plt.close(fig)


# --- assets/: the figures the course shows, regenerated from this code --------------------------------------
# `make assets` (python -m course_lib.plotting) rewrites them, so a picture never drifts from the code that draws it.

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
    from pathlib import Path

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
    from .models import speed_lab_config
    from .roofline import VENDOR_PRESETS, decode_cost, plot_roofline, prefill_cost

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
    from pathlib import Path

    from .bench.report import plot_decode_roofline, plot_pareto

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"taxonomy": plot_taxonomy(TAXONOMY_CHAPTERS), "roofline_sketch": _roofline_sketch()}
    results = Path(results_md) if results_md else Path(__file__).resolve().parents[1] / RESULTS_MD
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


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m course_lib.plotting",
                                description="Redraw the course's figures into assets/ (make assets).")
    p.add_argument("command", choices=["assets"])
    p.add_argument("--out", default="assets", help="folder to write the PNGs into (default: assets)")
    p.add_argument("--results", default=None, help=f"a bench results.md to redraw (default: {RESULTS_MD})")
    args = p.parse_args(argv)
    for path in write_assets(args.out, args.results):
        print(f"{path}  {path.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")  # a command: no window
    raise SystemExit(main())

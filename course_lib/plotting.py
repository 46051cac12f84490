"""Figures the notebooks show. Each function returns a matplotlib Figure."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import matplotlib.pyplot as plt
from IPython.display import Image, display
from matplotlib import font_manager

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


def plot_ladder(rungs: Sequence[dict]):
    """Chapter 04's ladder (:func:`course_lib.bench.engines.ladder`): each rung that ran as a bar of tokens/s, with
    its roofline (read bandwidth / bytes per token) and llama.cpp on the same kind of weights as markers."""
    ran = [r for r in rungs if r.get("tok/s")]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = [r["rung"] for r in ran]
    ax.barh(names, [r["tok/s"] for r in ran], color="tab:blue", label="course_lib")
    ax.scatter([r.get("roofline (tok/s)") or 0 for r in ran], names, marker="|", s=300, color="black",
               label="roofline (read bandwidth / bytes)")
    ax.scatter([r.get("llama.cpp (tok/s)") or 0 for r in ran], names, marker="D", color="tab:orange",
               label="llama.cpp, same kind of weights")
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens / s (batch 1)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def show(fig) -> None:
    """Show a Figure in a notebook as a PNG, whatever the backend.

    A Figure built without pyplot (``matplotlib.figure.Figure``, as the report's plots are, so they need no GUI)
    has no notebook formatter until the inline backend happens to be loaded: ``display(fig)`` then prints
    ``<Figure size 700x450 with 1 Axes>`` instead of the plot. A PNG always shows.
    """
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
    with out:
        out.clear_output(wait=True)
        display(fig)
    plt.close(fig)

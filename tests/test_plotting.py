"""course_lib.plotting: the figures the notebooks show."""

from __future__ import annotations

import io
import re
import warnings

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from course_lib import plotting  # noqa: E402

CJK = re.compile(r"[\u2e80-\u9fff]")
CHAPTERS = {"KV cache": "03", "quantization 量化": "05", "pruning 剪枝": "06", "distillation 蒸馏": "07"}


def _draw(fig) -> list[str]:
    """Render the figure to PNG; return the glyph warnings matplotlib gave while drawing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_taxonomy_without_a_cjk_font_draws_english_without_a_warning_wall(monkeypatch):
    # As on a machine (or a Binder image) with no Chinese font installed.
    monkeypatch.setattr(plotting, "cjk_font", lambda: None, raising=False)
    fig = plotting.plot_taxonomy(CHAPTERS)
    texts = _texts(fig)
    missing = _draw(fig)
    assert not missing, f"{len(missing)} glyph warnings, e.g. {missing[0]}"
    assert not [t for t in texts if CJK.search(t)], "labels a font cannot draw must be left out, not drawn as boxes"
    assert "quantization  → 05" in texts and "Model compression" in texts, texts


def test_taxonomy_on_this_machine_gives_no_glyph_warnings():
    assert not _draw(plotting.plot_taxonomy(CHAPTERS))


def test_taxonomy_keeps_the_chinese_terms_where_a_font_has_them():
    font = plotting.cjk_font()
    if font is None:
        pytest.skip("no CJK font installed here (Debian: apt-get install fonts-noto-cjk)")
    fig = plotting.plot_taxonomy(CHAPTERS)
    texts = _texts(fig)
    assert not _draw(fig)
    assert "quantization 量化  → 05" in texts


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_rounding_error_panel_title_clears_the_subplot_titles():
    """Notebook 05's panel: the figure title (bits, SQNR, MSE) sat on top of 'weights' and 'rounding error'."""
    import torch

    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    w_hat = (w * 7).round() / 7
    fig = plotting.plot_rounding_error(w, w_hat, "4 bits, asym per_group: SQNR 20.3 dB, MSE 1.23e-03")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    subtitles = [ax.title.get_window_extent(renderer) for ax in fig.axes]
    assert [ax.get_title() for ax in fig.axes] == ["weights", "rounding error"]
    assert not [s for s in subtitles if _overlaps(title, s)], "the figure title overlaps a subplot title"
    assert all(s.y1 <= title.y0 for s in subtitles), "the figure title should sit above the subplot titles"
    plt.close(fig)


def test_ladder_plot_draws_the_rungs_that_ran_with_their_roofline_and_rival():
    rungs = [{"rung": "1 HF generate", "tok/s": 20.0, "roofline (tok/s)": 80.0, "llama.cpp (tok/s)": 50.0},
             {"rung": "3 compiled step", "tok/s": None, "note": "skipped in --quick"},
             {"rung": "4 streaming kernels", "tok/s": 60.0, "roofline (tok/s)": 80.0, "llama.cpp (tok/s)": None}]
    fig = plotting.plot_ladder(rungs)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1 HF generate", "4 streaming kernels"]
    assert [p.get_width() for p in ax.patches] == [20.0, 60.0]
    roof, rival = (c.get_offsets()[:, 0].tolist() for c in ax.collections)
    assert roof == [80.0, 80.0] and rival == [50.0, 0.0]  # a rival that did not run sits at 0
    assert not _draw(fig)

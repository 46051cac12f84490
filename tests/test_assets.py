"""assets/: the figures the course shows, redrawn by one command (``make assets``) so they never drift."""

from __future__ import annotations

import struct
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from course_lib.cli import assets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
MAX_BYTES = 200 * 1024


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_assets_are_redrawn_by_one_command(tmp_path):
    first = assets.write_assets(tmp_path / "a")
    second = assets.write_assets(tmp_path / "b")
    names = sorted(p.name for p in first)
    assert names == sorted(p.name for p in second)
    assert {"taxonomy.png", "roofline_sketch.png", "pareto.png", "decode_roofline.png"} <= set(names)
    for a in first:
        assert a.read_bytes() == (tmp_path / "b" / a.name).read_bytes(), f"{a.name} differs between two runs"
        assert a.stat().st_size < MAX_BYTES, f"{a.name} is {a.stat().st_size / 1024:.0f} KB"
    # What is committed is what the command draws: every file, at the same size in pixels (the bytes can
    # differ across machines with other fonts or freetype builds). Run `make assets` after changing a figure.
    committed = sorted(p.name for p in ASSETS.glob("*.png"))
    assert committed == names, f"assets/ holds {committed}, make assets draws {names}: run make assets"
    for a in first:
        assert _png_size(ASSETS / a.name) == _png_size(a), f"assets/{a.name} is stale: run make assets"
        assert (ASSETS / a.name).stat().st_size < MAX_BYTES


def test_results_markdown_reads_back_into_rows(tmp_path):
    md = tmp_path / "results.md"
    md.write_text("Measured on device: cpu, bandwidth_gbs: 24.38, threads: 2 (quick mode).\n\n### quant\n\n"
                  "| suite | method | bytes | decode_tok_s | ppl | note |\n|---|---|---|---|---|---|\n"
                  "| quant | fp32 | 1260336896 | 9.982 | 54.7 |  |\n"
                  "| quant | int8-wo | 3.158e+08 | 22.07 | 54.64 | x |\n")
    got = assets.read_results_markdown(md)
    assert got["machine"] == {"bandwidth_gbs": 24.38}
    assert got["rows"] == [
        {"suite": "quant", "method": "fp32", "bytes": 1260336896.0, "decode_tok_s": 9.982, "ppl": 54.7},
        {"suite": "quant", "method": "int8-wo", "bytes": 3.158e8, "decode_tok_s": 22.07, "ppl": 54.64, "note": "x"}]

"""The quant suite's timing harness: every format built once, timed interleaved, errors kept per row."""

from __future__ import annotations

from course_lib.bench import quant

from .conftest import make_tiny


def test_speed_all_interleaves_and_reports_each_format():
    make = lambda: make_tiny("llama", hidden=128, intermediate=256, vocab=1024)  # noqa: E731 - prompt ids < 1000
    out = quant._speed_all(["fp32", "int8-wo", "int4-wo", "no-such-format"], make, quick=True, bandwidth=10.0)
    for m in ("fp32", "int8-wo", "int4-wo"):
        assert out[m]["decode_tok_s"] > 0 and out[m]["prefill_ms"] > 0
        assert out[m]["timing_rounds"] == 3
        assert out[m]["roofline_frac"] == out[m]["bandwidth_gbs"] / 10.0
    # Real storage: int8 about a quarter of fp32, int4 less than int8.
    assert out["int4-wo"]["bytes"] < out["int8-wo"]["bytes"] < 0.35 * out["fp32"]["bytes"]
    assert "KeyError" in out["no-such-format"]["error"] and "decode_tok_s" not in out["no-such-format"]

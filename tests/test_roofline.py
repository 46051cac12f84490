"""The roofline: machine measurements, bytes and FLOPs per token, predictions."""

from __future__ import annotations

import pytest

from course_lib.models import speed_lab_config
from course_lib.roofline import (
    ARTICLE_EXAMPLE,
    VENDOR_PRESETS,
    Hardware,
    ModelDims,
    article_formula,
    decode_cost,
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


# --- mixture of experts ------------------------------------------------------------------------------------

def test_expected_experts_matches_a_simulation_of_uniform_routing():
    import torch

    from course_lib.roofline import expected_experts

    g = torch.Generator().manual_seed(0)
    for experts, top_k, tokens in ((64, 8, 1), (64, 8, 4), (8, 2, 3), (128, 8, 16)):
        trials = 2000
        # each token picks top_k distinct experts uniformly: the top_k of random scores
        picks = torch.rand(trials, tokens, experts, generator=g).topk(top_k, dim=-1).indices
        hit = torch.zeros(trials, experts, dtype=torch.bool)
        hit.scatter_(1, picks.reshape(trials, -1), True)
        simulated = hit.sum(1).float().mean().item()
        assert simulated == pytest.approx(expected_experts(experts, top_k, tokens), rel=0.02), (experts, top_k, tokens)
    assert expected_experts(64, 8, 1) == pytest.approx(8)  # one token: exactly its k experts
    assert expected_experts(64, 8, 0) == 0
    assert expected_experts(8, 2, 1000) == pytest.approx(8)  # a big batch touches them all
    assert expected_experts(8, 8, 1) == pytest.approx(8)  # k = E: a dense layer


@pytest.mark.parametrize("args, match", [((8, 9, 1), "top_k"), ((0, 1, 1), "experts"), ((8, 2, -1), "tokens"),
                                         ((8, 2.0, 1), "top_k"), ((8, 2, True), "tokens")])
def test_expected_experts_refuses_impossible_arguments(args, match):
    from course_lib.roofline import expected_experts

    with pytest.raises(ValueError, match=match):
        expected_experts(*args)


def test_moe_decode_bytes_follow_the_active_experts_at_batch_1_and_all_of_them_at_large_batch():
    from course_lib.roofline import MoEDims, expected_experts, moe_decode_cost

    cfg = speed_lab_config("olmoe-1b-7b")
    m = MoEDims.from_config(cfg)
    assert (m.experts, m.top_k, m.expert_intermediate, m.kv_heads) == (64, 8, 1024, 16)
    d, L, V = 2048, 16, 50304
    attn, expert, router = 4 * d * d, 3 * d * 1024, 64 * d
    one = moe_decode_cost(cfg, batch=1, context=0)
    assert one.weight_bytes == (L * (attn + router + 8 * expert + 2 * d) + V * d + d) * 2  # by hand, bf16
    assert one.weight_bytes == m.active_decode_params * 2
    big = moe_decode_cost(cfg, batch=256, context=0)
    assert big.weight_bytes == pytest.approx(m.all_decode_params * 2, rel=1e-6)
    b16 = moe_decode_cost(cfg, batch=16, context=0)
    assert b16.weight_bytes == pytest.approx(m.decode_params(expected_experts(64, 8, 16)) * 2)
    assert one.weight_bytes < b16.weight_bytes < big.weight_bytes
    # FLOPs follow the active weights per token, whatever the batch reads
    assert b16.flops == pytest.approx(16 * one.flops)
    # a measured expert count replaces the expectation
    assert moe_decode_cost(cfg, batch=16, experts_read=64).weight_bytes == m.all_decode_params * 2
    with pytest.raises(ValueError, match="experts_read"):
        moe_decode_cost(cfg, batch=16, experts_read=65)


def test_an_moe_with_every_expert_active_costs_what_the_same_dense_model_costs():
    from course_lib.roofline import MoEDims, moe_decode_cost

    moe = MoEDims(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=100, experts=4, top_k=4,
                  expert_intermediate=32)
    dense = ModelDims(hidden=64, intermediate=4 * 32, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=100)
    router = 2 * 4 * 64  # the only weights the dense model lacks
    for batch, context in ((1, 0), (8, 50)):
        a, b = moe_decode_cost(moe, batch, context), decode_cost(dense, batch, context)
        assert a.weight_bytes == b.weight_bytes + router * 2
        assert a.kv_bytes == b.kv_bytes and a.act_bytes == b.act_bytes
        assert a.flops == b.flops + batch * 2 * router


def test_moe_dims_refuse_a_dense_config():
    from course_lib.roofline import MoEDims

    with pytest.raises(ValueError, match="no experts"):
        MoEDims.from_config(speed_lab_config("smollm2-135m"))

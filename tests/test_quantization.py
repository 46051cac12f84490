"""Tests for course_lib.quantization: primitives, packed layers, quantize_, GPTQ."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from course_lib import quantization as Q
from course_lib.metrics import model_size_bytes
from course_lib.quantization import (
    FLOAT,
    INT4_CPU,
    INT8PACK,
    INT_MM,
    QUANT_FILE,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8Embedding,
    Int8WeightOnlyLinear,
    QuantConfig,
    dequantize,
    fake_quantize,
    fake_quantize_model_,
    gptq,
    gptq_quantize_weight,
    kernel_choice,
    kernels,
    load_quantized,
    mse,
    pack_int4,
    qrange,
    quantize,
    quantize_,
    save_quantized,
    sqnr_db,
    unpack_int4,
)
from course_lib.quantization import calibration as walk
from tests.conftest import assert_readable_by_others, make_tiny


@pytest.fixture(autouse=True)
def fresh_kernel_choices():
    # the choice is cached per process by shape: a test that breaks a kernel must not leave its choice behind
    kernel_choice.clear_kernel_choices()
    yield
    kernel_choice.clear_kernel_choices()


@pytest.fixture
def w():
    torch.manual_seed(0)
    return torch.randn(64, 256)


# --- primitives ---------------------------------------------------------------------


def test_qrange():
    assert qrange(8, True) == (-127, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-7, 7)
    assert qrange(2, False) == (0, 3)
    for bad in (1, 9, 4.0):
        with pytest.raises(ValueError, match="bits"):
            qrange(bad, True)


def test_hand_derived_symmetric_per_tensor_matches(w):
    scale = w.abs().max() / 127  # what the notebook derives by hand
    q = torch.clamp(torch.round(w / scale), -127, 127)
    qt = quantize(w, 8, symmetric=True, granularity="per_tensor")
    assert torch.equal(qt.q.float(), q)
    assert torch.allclose(dequantize(qt), q * scale)


def test_hand_derived_asymmetric_per_channel_matches(w):
    lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    zp = torch.round(-lo / scale)
    q = torch.clamp(torch.round(w / scale) + zp, 0, 15)
    qt = quantize(w, 4, symmetric=False, granularity="per_channel")
    assert torch.equal(qt.q.float(), q)
    assert torch.allclose(dequantize(qt), (q - zp) * scale)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran,gs", [("per_tensor", None), ("per_channel", None), ("per_group", 32)])
def test_error_is_at_most_half_a_step(w, bits, symmetric, gran, gs):
    qt = quantize(w, bits, symmetric, gran, gs)
    qmin, qmax = qrange(bits, symmetric)
    assert qt.q.min() >= qmin and qt.q.max() <= qmax
    err = (dequantize(qt) - w).abs()
    step = qt.scale if gran == "per_tensor" else qt.scale
    if gran == "per_group":
        err = err.reshape(64, -1, gs)
    assert torch.all(err <= step / 2 + 1e-6)


def test_symmetric_keeps_zero_exact(w):
    x = w.clone()
    x[:, :10] = 0
    for sym in (True, False):
        assert torch.all(fake_quantize(x, 4, sym, "per_channel")[:, :10] == 0)


def test_sqnr_grows_about_6db_per_bit(w):
    s = [sqnr_db(w, fake_quantize(w, b, True, "per_channel")) for b in (4, 5, 6, 7, 8)]
    gains = [b - a for a, b in zip(s, s[1:])]
    assert all(5.0 < g < 7.0 for g in gains), gains
    assert sqnr_db(w, w) == math.inf
    assert mse(w, w) == 0


def test_finer_granularity_handles_outliers(w):
    x = w.clone()
    x[3, 7] = 80.0  # one outlier weight
    s = {g: sqnr_db(x, fake_quantize(x, 4, True, g, 32 if g == "per_group" else None))
         for g in ("per_tensor", "per_channel", "per_group")}
    assert s["per_tensor"] < s["per_channel"] < s["per_group"]


def test_fake_quantize_model_lowers_quality_with_bits():
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = make_tiny("llama")(ids).logits
    s = {}
    for bits in (8, 4, 2):
        m = make_tiny("llama")
        assert fake_quantize_model_(m, bits, False, "per_group", 32) == 14  # the head stays float
        s[bits] = sqnr_db(ref, m(ids).logits)
    assert s[8] > s[4] > s[2]
    with pytest.raises(ValueError, match="no nn.Linear"):
        fake_quantize_model_(nn.Sequential(nn.ReLU()), 8)


def test_bad_primitive_input(w):
    with pytest.raises(ValueError, match="granularity"):
        quantize(w, 8, True, "per_row")
    with pytest.raises(ValueError, match="divides in_features"):
        quantize(w, 4, False, "per_group", 100)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(4, 4, 4), 8, True, "per_channel")


def test_pack_unpack_roundtrip():
    q = torch.randint(0, 16, (48, 64), dtype=torch.uint8)
    p = pack_int4(q)
    assert p.shape == (48, 32) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p), q)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(4, 3, dtype=torch.uint8))


def test_cpu_int4_layout_is_a_permutation_we_can_invert():
    n, k = 48, 128
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    where = kernels.cpu_int4_layout(n, k)
    assert torch.equal(torch.sort(where).values, torch.arange(n * k))
    nib = torch.stack([packed & 0xF, packed >> 4], -1).reshape(-1)
    back = torch.empty(n * k, dtype=torch.uint8)
    back[where] = nib
    assert torch.equal(back.reshape(n, k).int(), q)


# --- packed layers --------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_int8_layer_matches_float_and_reference(bias):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=bias)
    x = torch.randn(2, 3, 128)
    fast = Int8WeightOnlyLinear.from_linear(lin, kernel=INT8PACK)  # that kernel, in the dtype measured fastest
    ref = Int8WeightOnlyLinear.from_linear(lin, kernel="reference")
    assert fast.kernel == INT8PACK and ref.kernel == "reference"
    assert fast.weight_int8.dtype == torch.int8
    y = fast(x)
    assert y.shape == (2, 3, 48) and y.dtype == x.dtype
    assert sqnr_db(lin(x), y) > 35
    assert sqnr_db(ref(x), y) > 40


def test_int8_unaligned_width_uses_reference_and_stays_correct(caplog):
    # A pruned MLP can be 538 wide; the aten int8 kernel crashes on K % 8 != 0 with several rows.
    torch.manual_seed(0)
    lin = nn.Linear(538, 64)
    with caplog.at_level("INFO", logger="course_lib.quantization"):
        layer = Int8WeightOnlyLinear.from_linear(lin)
    assert layer.kernel == "reference" and "% 16" in caplog.text
    x = torch.randn(7, 538)
    y = layer(x)
    assert torch.isfinite(y).all()
    assert sqnr_db(lin(x), y) > 35


def test_kernel_probe_rejects_a_kernel_that_returns_garbage(monkeypatch):
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, w, s: real(x, w, s) * float("nan"))
    layer = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32))
    assert layer.kernel == "reference"
    rejected = layer.choice.rejected
    assert {f"{INT8PACK} bfloat16", f"{INT8PACK} float32"} <= set(rejected) and "non-finite" in rejected[
        f"{INT8PACK} bfloat16"]
    kernel_choice.clear_kernel_choices()
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, w, s: real(x, w, s) * 1.5)  # finite but wrong
    layer = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32))
    assert layer.kernel == "reference" and "differs from the reference" in layer.choice.rejected[f"{INT8PACK} bfloat16"]


def test_int4_layer_kernel_and_reference_agree():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    x = torch.randn(5, 256)
    fast = Int4WeightOnlyLinear.from_linear(lin, 64, kernel=INT4_CPU)
    ref = Int4WeightOnlyLinear.from_linear(lin, 64, kernel="reference")
    assert fast.kernel == INT4_CPU
    assert fast.weight_packed.numel() == 64 * 256 // 2  # two weights per byte
    assert torch.equal(fast.int_weight(), ref.int_weight())
    assert torch.equal(fast.dequantized_weight(), ref.dequantized_weight())
    assert sqnr_db(ref(x), fast(x)) > 40
    assert sqnr_db(lin(x), fast(x)) > 18


def test_int4_odd_shape_falls_back_to_reference():
    lin = nn.Linear(64, 40)  # 40 outputs: the aten kernel wants a multiple of 16
    layer = Int4WeightOnlyLinear.from_linear(lin, 32)
    assert layer.kernel == "reference"
    assert "RuntimeError" in layer.choice.rejected[f"{INT4_CPU} bfloat16"]  # the repack refused the shape
    assert sqnr_db(lin.weight, layer.dequantized_weight()) > 18


# --- quantize_ ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("cfg,min_sqnr", [(QuantConfig(bits=8), 30), (QuantConfig(bits=4, group_size=32), 15)])
def test_quantize_model_and_state_dict_roundtrip(family, cfg, min_sqnr):
    model = make_tiny(family)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    before = model_size_bytes(model)
    report = quantize_(model, cfg)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert not report.skipped
    out = model(ids).logits
    assert sqnr_db(ref, out) > min_sqnr
    assert model_size_bytes(model) < before / (3 if cfg.bits == 8 else 4.5)
    twin = make_tiny(family, seed=7)
    quantize_(twin, cfg)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin(ids).logits, out)


def test_tied_embeddings_share_int8_storage():
    model = make_tiny("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tie them, as course-tiny and Qwen2.5 do
    assert model.lm_head.weight is model.model.embed_tokens.weight
    float_bytes = model_size_bytes(model)
    quantize_(model, QuantConfig(bits=8))
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert model.model.embed_tokens.weight_int8 is model.lm_head.weight_int8
    assert model_size_bytes(model) < float_bytes / 3


def test_embeddings_float_and_skip_patterns():
    model = make_tiny("llama")
    report = quantize_(model, QuantConfig(bits=8, embeddings="float", skip=(r"down_proj",)))
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert "lm_head" in report.skipped and "model.layers.1.mlp.down_proj" in report.skipped


def test_layers_a_group_cannot_divide_stay_float():
    model = make_tiny("llama", hidden=64, intermediate=96)  # down_proj has 96 inputs
    report = quantize_(model, QuantConfig(bits=4, group_size=64))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert "not a multiple of group_size" in report.skipped["model.layers.0.mlp.down_proj"]


def test_bad_input():
    for kw, msg in [({"bits": 3}, "bits"), ({"bits": 4}, "group_size"), ({"bits": 4, "group_size": 100}, "group_size"),
                    ({"bits": 8, "group_size": 32}, "group_size=None"), ({"method": "awq"}, "method"),
                    ({"embeddings": "int4"}, "embeddings"), ({"compute_dtype": "int8"}, "compute_dtype"),
                    ({"skip": "lm_head"}, "tuple"), ({"bits": 4, "group_size": 128.0}, "int group_size"),
                    ({"bits": 8.0}, "bits"), ({"bits": True}, "bits"), ({"skip": ("layers.[0",)}, r"'layers\.\[0'"),
                    ({"skip": (3,)}, "strings")]:
        with pytest.raises(ValueError, match=msg):
            QuantConfig(**kw)
    model = make_tiny("llama")
    quantize_(model, QuantConfig())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, QuantConfig())
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_(nn.Sequential(nn.ReLU()), QuantConfig())
    with pytest.raises(ValueError, match="calibration"):
        quantize_(make_tiny("llama"), QuantConfig(bits=4, group_size=32, method="gptq"))
    with pytest.raises(ValueError, match="no Linear layer can take"):
        quantize_(make_tiny("llama", hidden=96, intermediate=160), QuantConfig(bits=4, group_size=64,
                                                                                 embeddings="float"))
    with pytest.raises(ValueError, match="QuantConfig"):
        quantize_(make_tiny("llama"), {"bits": 8})


# --- GPTQ -----------------------------------------------------------------------------


def _outlier_inputs(n=512, k=128, seed=0):
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) @ mix  # correlated, same for all seeds
    x[:, :4] *= 20  # a few outlier channels, as in real LLM activations
    return x


def test_gptq_beats_rtn_on_layer_output():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    x_cal, x_test = _outlier_inputs(seed=0), _outlier_inputs(seed=1)
    H = 2 * x_cal.t() @ x_cal / x_cal.shape[0]
    cfg = QuantConfig(bits=4, group_size=32, method="gptq")
    qt = gptq_quantize_weight(lin.weight, H, cfg)
    assert qt.q.min() >= 0 and qt.q.max() <= 15
    gptq_w = dequantize(qt)
    rtn_w = fake_quantize(lin.weight, 4, False, "per_group", 32)
    ref = x_test @ lin.weight.t()
    assert sqnr_db(ref, x_test @ gptq_w.t()) > sqnr_db(ref, x_test @ rtn_w.t()) + 1.0


def test_gptq_model_end_to_end(tiny_qwen2):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = tiny_qwen2(ids).logits
    cal = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    report = quantize_(tiny_qwen2, QuantConfig(bits=4, group_size=32, method="gptq"), calibration=cal)
    assert len(report.quantized) == 16
    assert sqnr_db(ref, tiny_qwen2(ids).logits) > 15
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(tiny_qwen2, QuantConfig(bits=4, group_size=32, method="gptq"), calibration=cal)


def test_gptq_beats_rtn_perplexity_on_course_tiny():
    from course_lib import load_model
    from course_lib.data import calibration_batches, encode_split
    from course_lib.metrics import perplexity

    try:
        model, tok = load_model("course-tiny")
    except ValueError as e:
        pytest.skip(f"course-tiny not trained yet: {e}")
    ids = encode_split(tok, "heldout", max_chars=40000)[:4096]
    cal = calibration_batches(tok, n=8, seq_len=128)
    rtn, _ = load_model("course-tiny")
    quantize_(rtn, QuantConfig(bits=4, group_size=128))
    quantize_(model, QuantConfig(bits=4, group_size=128, method="gptq"), calibration=cal)
    assert perplexity(model, ids, max_tokens=None) < perplexity(rtn, ids, max_tokens=None)


# --- GPTQ in O(layers): each block's inputs are cached and passed on -------------------


def _gptq_by_rerunning(model, todo, cfg, calibration, report, stages):
    """Reference GPTQ: the whole model re-runs up to the block for every stage (a list of layers quantized from
    one run's Hessians), so nothing is cached."""
    import re

    from course_lib import quantization as Q

    def stop(module, inputs, output):
        raise walk.StopForward

    packed = {}
    for block in walk.blocks(model, list(todo)):
        for stage in stages(block):
            hess = {n: gptq.Hessian(todo[n].in_features) for n in stage}
            handles = [todo[n].register_forward_hook(hess[n]) for n in stage]
            m = re.match(r"(.*layers\.\d+)\.", block[0])
            if m:
                handles.append(model.get_submodule(m.group(1)).register_forward_hook(stop))
            try:
                for row in calibration:
                    try:
                        model(input_ids=row[None])
                    except walk.StopForward:
                        pass
            finally:
                for h in handles:
                    h.remove()
            for n in stage:  # float stand-ins until the end, as the library does
                packed[n] = gptq.gptq_linear(todo[n], cfg, hess[n].H)
                Q.layers.set_module(model, n, gptq.float_stand_in(todo[n], packed[n]))
    for n, new in packed.items():
        Q.layers.set_module(model, n, new)
        report.quantized[n] = new.kernel


def _replace_gptq(monkeypatch, quantize_model):
    """Run ``method="gptq"`` through a reference implementation for the rest of the test."""
    import dataclasses

    from course_lib.quantization import registry

    monkeypatch.setitem(registry._METHODS, "gptq", dataclasses.replace(gptq.GPTQ, quantize_model=quantize_model))


@torch.no_grad()
def _gptq_rerun_from_embedding(model, todo, cfg, calibration, report):
    """True-sequential GPTQ by re-running the model: one layer at a time, each on the quantized layers before it."""
    _gptq_by_rerunning(model, todo, cfg, calibration, report, lambda block: [[n] for n in block])


@torch.no_grad()
def _gptq_float_block_hessians(model, todo, cfg, calibration, report):
    """The previous GPTQ: every layer of a block quantized from the float block's Hessians (not true-sequential)."""
    _gptq_by_rerunning(model, todo, cfg, calibration, report, lambda block: [block])


def test_gptq_is_true_sequential_within_a_block(monkeypatch):
    """o_proj is quantized from the Hessian of what the already-quantized q/k/v produce (the reference GPTQ's
    true-sequential order), not from the float block's; and it beats RTN on those inputs for held-out tokens."""
    import copy

    from course_lib import quantization as Q

    model = make_tiny("llama", layers=1, hidden=128, intermediate=256, vocab=256)
    cal = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(bits=4, group_size=32, method="gptq", embeddings="float")
    w = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    new, old = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(new, cfg, calibration=cal)
    _replace_gptq(monkeypatch, _gptq_float_block_hessians)
    quantize_(old, cfg, calibration=cal)

    # what o_proj saw during calibration: q/k/v as float stand-ins of the packed layers (the same in both)
    seen_by = copy.deepcopy(new)
    for p in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{p}"
        Q.layers.set_module(seen_by, name, gptq.float_stand_in(model.get_submodule(name), seen_by.get_submodule(name)))

    def o_proj_inputs(rows):
        seen = []
        handle = seen_by.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        with torch.no_grad():
            for row in rows:
                seen_by(row[None])
        handle.remove()
        return seen

    hess = gptq.Hessian(w.shape[1])
    for x in o_proj_inputs(cal):
        hess(None, (x,), None)
    expected = gptq.gptq_linear(model.model.layers[0].self_attn.o_proj, cfg, hess.H).dequantized_weight()
    got = {m: v.model.layers[0].self_attn.o_proj.dequantized_weight() for m, v in (("new", new), ("old", old))}
    torch.testing.assert_close(got["new"], expected, atol=1e-6, rtol=0)
    assert (got["old"] != got["new"]).any()
    x = torch.cat(o_proj_inputs(ids)).reshape(-1, w.shape[1]).float()

    def err(w_hat):
        return float(((x @ (w - w_hat).t()) ** 2).mean())

    assert err(got["new"]) < 0.8 * err(fake_quantize(w, 4, False, "per_group", 32))


def test_gptq_with_cached_block_inputs_equals_rerunning_the_model(course_tiny, monkeypatch):
    import copy

    from course_lib.data import calibration_batches

    model, tok = course_tiny
    cal = calibration_batches(tok, n=2, seq_len=48)
    # one attention and one MLP matrix per block keep it quick; every block still passes its outputs on
    cfg = QuantConfig(bits=4, group_size=128, method="gptq", skip=(r"(k|v|o)_proj", r"(gate|up)_proj"))
    new, old = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(new, cfg, calibration=cal)
    _replace_gptq(monkeypatch, _gptq_rerun_from_embedding)
    quantize_(old, cfg, calibration=cal)
    a, b = new.state_dict(), old.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    ids = cal[:1, :32]
    torch.testing.assert_close(new(ids).logits, old(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gptq_runs_each_decoder_block_a_bounded_number_of_times(family):
    """Block 0 runs the same number of times whatever the depth: O(layers) in total, not O(layers^2)."""
    rows = 2
    cal = torch.randint(0, 128, (rows, 16), generator=torch.Generator().manual_seed(1))
    calls = {}
    for depth in (2, 5):
        model = make_tiny(family, layers=depth)
        count = [0] * depth
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(lambda *_, i=i, c=count: c.__setitem__(i, c[i] + 1))
        quantize_(model, QuantConfig(bits=8, method="gptq"), calibration=cal)
        calls[depth] = count
    per_block = 7  # q, k, v, o, gate, up, down: one run of the block for each layer's Hessian (true-sequential)
    assert calls[2][0] == calls[5][0] <= (per_block + 2) * rows  # capture, one run per layer, outputs
    assert all(c <= (per_block + 2) * rows for c in calls[5])
    assert calls[5][-1] <= (per_block + 1) * rows  # the last block's outputs feed nothing


def test_gptq_cached_inputs_pass_through_blocks_left_in_float(monkeypatch):
    """A skipped first block still runs (in float) to make the next block's inputs: same result as re-running."""
    import copy


    model = make_tiny("qwen2", layers=3)
    cal = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(bits=8, method="gptq", skip=(r"layers\.0\.",))
    new, old = copy.deepcopy(model), copy.deepcopy(model)
    report = quantize_(new, cfg, calibration=cal)
    assert not any(".layers.0." in n for n in report.quantized) and "model.layers.2.mlp.down_proj" in report.quantized
    _replace_gptq(monkeypatch, _gptq_rerun_from_embedding)
    quantize_(old, cfg, calibration=cal)
    ids = cal[:1]
    torch.testing.assert_close(new(ids).logits, old(ids).logits, atol=1e-5, rtol=1e-5)
    for k, v in new.state_dict().items():
        torch.testing.assert_close(v, old.state_dict()[k], atol=1e-6, rtol=1e-5, msg=k)
# --- kernel safety: the int8 kernel crashes on some shapes, so crashing paths run in a subprocess ----------

ROOT = Path(__file__).resolve().parents[1]


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: a kernel that segfaults fails the test instead of killing pytest."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def _result(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, (f"subprocess died with rc={proc.returncode} (-11 is a segfault):\n"
                                  f"{proc.stderr[-3000:]}")
    return next(line for line in proc.stdout.splitlines() if line.startswith("RESULT")).split()[1:]


def test_course_tiny_pruned_to_width_424_then_int8_runs_finite():
    # prune_(round_to=8) gives MLP width 424 (% 16 == 8), where _weight_int8pack_mm segfaults or
    # returns inf with several rows although a one-row probe passes.
    from course_lib.models import EMBEDDED

    if not (EMBEDDED["course-tiny"] / "config.json").is_file():
        pytest.skip("course-tiny not trained yet")
    proc = _run_isolated("""
        import torch
        torch.set_num_threads(1)
        from course_lib import load_model
        from course_lib.pruning import PruneConfig, prune_
        from course_lib.quantization import QuantConfig, quantize_
        model, _ = load_model("course-tiny")
        prune_(model, PruneConfig(ratio=0.448, target="mlp", round_to=8))
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(ids).logits
            report = quantize_(model, QuantConfig(bits=8, kernel="aten._weight_int8pack_mm"))
            out = model(ids).logits
        err = float((out - ref).norm() / ref.norm())
        q = report.quantized
        print("RESULT", model.config.intermediate_size, bool(torch.isfinite(out).all()), err,
              q["model.layers.0.mlp.down_proj"], q["model.layers.0.mlp.up_proj"])
    """)
    width, finite, err, down_kernel, up_kernel = _result(proc)
    assert width == "424" and finite == "True"
    assert float(err) < 0.05  # int8 per channel: close to the unquantized pruned model
    assert down_kernel == "reference"  # 424 inputs: not a width the kernel is proven safe for
    assert up_kernel == "aten._weight_int8pack_mm"  # 256 inputs: safe, still fast


def test_int8_kernel_gets_aligned_rows_whatever_the_input_view():
    # The kernel's vector loads want aligned rows: a weight read from a file at an 8-byte offset, or bf16
    # activations that are a view at a 16-byte offset, segfault even with K = 256.
    proc = _run_isolated("""
        import torch
        from course_lib.quantization import Int8WeightOnlyLinear
        torch.manual_seed(0)
        q = torch.randint(-127, 128, (768, 256), dtype=torch.int8)
        buf = torch.empty(768 * 256 + 64, dtype=torch.int8)
        q_odd = buf[8:8 + q.numel()].view(768, 256)  # as safetensors hands tensors back
        q_odd.copy_(q)
        layer = Int8WeightOnlyLinear(q_odd, torch.rand(768) * 0.01, None, torch.bfloat16, "aten._weight_int8pack_mm")
        x = torch.empty(7 * 256 + 64, dtype=torch.bfloat16)[8:8 + 7 * 256].view(7, 256)
        x.copy_(torch.randn(7, 256))
        y = layer(x).float()
        ref = x.float() @ layer.dequantized_weight().T
        print("RESULT", layer.kernel, bool(torch.isfinite(y).all()), float((y - ref).norm() / ref.norm()))
    """)
    kernel, finite, err = _result(proc)
    assert kernel == "aten._weight_int8pack_mm" and finite == "True" and float(err) < 0.02


def test_int8_layer_traces_whole_under_torch_compile():
    # The alignment checks read pointers, which torch.compile cannot; CompiledDecoder uses fullgraph=True.
    layer = Int8WeightOnlyLinear.from_linear(nn.Linear(256, 64))
    x = torch.randn(3, 256)
    assert torch.allclose(torch.compile(layer, backend="eager", fullgraph=True)(x), layer(x))


def test_kernel_probe_uses_several_rows(monkeypatch):
    real = torch._weight_int8pack_mm

    def wrong_for_batches(x, w, s):  # right for one row, garbage for more: what the real kernel did at K=424
        y = real(x, w, s)
        return y if x.shape[0] == 1 else y * float("inf")

    monkeypatch.setattr(torch, "_weight_int8pack_mm", wrong_for_batches)
    layer = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32))
    assert layer.kernel == "reference" and "with 2 rows" in layer.choice.rejected[f"{INT8PACK} bfloat16"]


# --- casting a quantized model ------------------------------------------------------------


@pytest.mark.parametrize("cfg", [QuantConfig(bits=8), QuantConfig(bits=4, group_size=32)], ids=["int8", "int4"])
def test_dtype_casts_move_the_compute_dtype(cfg):
    model = make_tiny("llama")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    quantize_(model, cfg)
    ref = model(ids).logits
    packed = [m for m in model.modules() if isinstance(m, (Int8WeightOnlyLinear, Int4WeightOnlyLinear))]
    for cast, dtype in [(lambda m: m.half(), torch.float16), (lambda m: m.float(), torch.float32),
                        (lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.to("cpu"), torch.bfloat16)]:
        cast(model)
        assert all(m.compute_dtype == dtype for m in packed)
        assert model.model.embed_tokens.out_dtype == dtype
        out = model(ids).logits
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert sqnr_db(ref, out) > 20  # the same integers, only the activations' precision changed


# --- skip, GPT-2's Conv1D, configs that leave most layers in float ----------------------------


def test_skip_reaches_the_head_and_the_embedding():
    tied = make_tiny("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    report = quantize_(tied, QuantConfig(bits=8, skip=(r"^lm_head$",)))
    assert type(tied.lm_head) is nn.Linear and type(tied.model.embed_tokens) is nn.Embedding
    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # still tied, still float
    assert "matches skip pattern" in report.skipped["lm_head"] and "model.embed_tokens" in report.skipped
    untied = make_tiny("llama")
    report = quantize_(untied, QuantConfig(bits=8, skip=("embed_tokens",)))
    assert isinstance(untied.lm_head, Int8WeightOnlyLinear) and type(untied.model.embed_tokens) is nn.Embedding
    assert "model.embed_tokens" in report.skipped and "lm_head" in report.quantized


def make_tiny_gpt2(seed: int = 0):
    """GPT-2 layout (transformers Conv1D projections, tied head) from a config: no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("cfg,layer_type,min_sqnr", [(QuantConfig(bits=8), Int8WeightOnlyLinear, 30),
                                                     (QuantConfig(bits=4, group_size=32), Int4WeightOnlyLinear, 12)],
                         ids=["int8", "int4"])
def test_gpt2_conv1d_projections_are_quantized(cfg, layer_type, min_sqnr):
    from transformers.pytorch_utils import Conv1D

    model = make_tiny_gpt2()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    report = quantize_(model, cfg)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert sum(type(m) is layer_type for m in model.modules()) >= 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert isinstance(model.transformer.h[0].attn.c_attn, layer_type)
    assert not report.skipped
    assert sqnr_db(ref, model(ids).logits) > min_sqnr


def test_quantizing_no_projection_raises():
    with pytest.raises(ValueError, match="no Linear layer can take.*all 8 projections"):
        quantize_(make_tiny_gpt2(), QuantConfig(bits=8, skip=("attn", "mlp")))


def test_a_group_size_that_leaves_most_layers_float_warns(caplog):
    model = make_tiny("llama", hidden=96, intermediate=256)  # like SmolLM2's 576: 64 does not divide 96
    with caplog.at_level("WARNING", logger="course_lib.quantization"):
        report = quantize_(model, QuantConfig(bits=4, group_size=64))
    assert len(report.skipped) == 12  # q/k/v/o/gate/up of both layers; only down_proj takes group 64
    assert "group_size=32" in caplog.text and "12 of 14 projections in float" in caplog.text
    assert report.warnings and "WARNING" in report.summary()
    quiet = quantize_(make_tiny("llama", hidden=96, intermediate=256), QuantConfig(bits=4, group_size=32))
    assert not quiet.warnings and not quiet.skipped


# --- saving and loading a quantized model ---------------------------------------------------


@pytest.mark.parametrize("cfg", [QuantConfig(bits=8), QuantConfig(bits=4, group_size=64),
                                 QuantConfig(bits=4, group_size=32, activations="int8")], ids=["int8", "int4", "w4a8"])
def test_quantized_course_tiny_round_trips_through_save_quantized(course_tiny, cfg, tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    from course_lib import load_model

    float_model, tok = course_tiny
    model = copy.deepcopy(float_model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # course-tiny ties them
    quantize_(model, cfg)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    save_quantized(model, tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / QUANT_FILE).is_file()
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded(ids).logits, ref)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert loaded.model.embed_tokens.weight_int8.data_ptr() == loaded.lm_head.weight_int8.data_ptr()  # tied
    with pytest.raises(OSError):  # transformers alone must refuse, not build random float weights
        AutoModelForCausalLM.from_pretrained(tmp_path)
    save_quantized(loaded, tmp_path / "again")  # a loaded model saves the same way
    assert (tmp_path / "again" / QUANT_FILE).is_file()


def test_untied_quantized_model_round_trips_and_float_weights_are_not_mixed_in(tmp_path):
    from course_lib.quantization import load_quantized

    model = make_tiny("qwen2")  # q/k/v biases, untied head
    quantize_(model, QuantConfig(bits=4, group_size=32))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    save_quantized(model, tmp_path / "q")
    assert torch.equal(load_quantized(tmp_path / "q")(ids).logits, model(ids).logits)
    make_tiny("qwen2").save_pretrained(tmp_path / "f")  # a float model's folder
    with pytest.raises(ValueError, match="already holds float weights"):
        save_quantized(model, tmp_path / "f")


def _saved(folder, seed=0, cfg=None):
    """A quantized tiny Llama saved to ``folder`` (int4 layers and an int8 embedding): (model, ids, logits)."""
    model = make_tiny("llama", seed=seed)
    quantize_(model, cfg or QuantConfig(bits=4, group_size=32))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    save_quantized(model, folder)
    return model, ids, model(ids).logits


def test_a_save_that_fails_half_way_leaves_the_previous_save_loadable(tmp_path, monkeypatch):
    _, ids, before = _saved(tmp_path / "q")
    other = make_tiny("llama", seed=1)
    quantize_(other, QuantConfig(bits=8))

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(Q.save, "save_file", disk_full)  # after config.json was written, before the marker
    with pytest.raises(OSError, match="No space"):
        save_quantized(other, tmp_path / "q", overwrite=True)
    assert torch.equal(load_quantized(tmp_path / "q")(ids).logits, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary folder left beside it
    with pytest.raises(OSError, match="No space"):  # a first save that fails leaves no folder a load would trust
        save_quantized(other, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_non_empty_folder_needs_overwrite_which_keeps_the_users_files(tmp_path):
    model, ids, logits = _saved(tmp_path / "q")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.json").write_text("my own config")
    with pytest.raises(ValueError, match=r"not empty \(config.json\).*overwrite=True"):
        save_quantized(model, user)
    assert (user / "config.json").read_text() == "my own config"
    with pytest.raises(ValueError, match="overwrite=True"):  # the function API, and a second save over a save
        save_quantized(model, tmp_path / "q")
    # overwrite=True replaces the files a save writes, and nothing else, in the folder and beside it
    (tmp_path / "q" / "notes.txt").write_text("keep")
    (tmp_path / "beside.txt").write_text("keep too")
    other = make_tiny("llama", seed=1)
    quantize_(other, QuantConfig(bits=8))
    assert save_quantized(other, tmp_path / "q", overwrite=True) == tmp_path / "q"
    assert (tmp_path / "q" / "notes.txt").read_text() == "keep" and (tmp_path / "beside.txt").read_text() == "keep too"
    assert torch.equal(load_quantized(tmp_path / "q")(ids).logits, other(ids).logits)
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == sorted([*Q.QUANT_OUTPUTS, "notes.txt"])
    with pytest.raises(ValueError, match="overwrite must be True or False"):
        save_quantized(other, tmp_path / "q", overwrite="yes")


def test_a_saved_quantized_model_is_readable_by_other_users(shared_dir):
    _saved(shared_dir / "q")
    assert_readable_by_others(shared_dir / "q")


def test_quant_config_refuses_wrong_gptq_types_naming_the_field():
    for kw, msg in [({"gptq_damp": "0.1"}, "gptq_damp must be a number"), ({"gptq_damp": None}, "gptq_damp"),
                    ({"gptq_damp": True}, "gptq_damp"), ({"gptq_damp": float("nan")}, "gptq_damp"),
                    ({"gptq_damp": 1.0}, "gptq_damp"), ({"gptq_block": True}, "gptq_block must be an int"),
                    ({"gptq_block": 64.0}, "gptq_block"), ({"gptq_block": 0}, "gptq_block"),
                    ({"compute_dtype": ["bfloat16"]}, "compute_dtype")]:
        with pytest.raises(ValueError, match=msg):
            QuantConfig(**kw)
    assert QuantConfig(gptq_damp=0.1, gptq_block=64).gptq_block == 64


def _edit_quant_file(folder, edit):
    import json

    meta = json.loads((folder / QUANT_FILE).read_text())
    edit(meta)
    (folder / QUANT_FILE).write_text(json.dumps(meta))


LAYER = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("edit,field", [
    (lambda m: m.pop("aliases"), "'aliases' is missing"),
    (lambda m: m.update(layers=[]), "'layers' has the wrong type"),
    (lambda m: m["layers"][LAYER].update(group_size="32"), rf"layers\['{LAYER}'\]\['group_size'\] has the wrong"),
    (lambda m: m["layers"][LAYER].pop("compute_dtype"), rf"layers\['{LAYER}'\]\['compute_dtype'\] is missing"),
    (lambda m: m["layers"][LAYER].update(compute_dtype="int3"), r"\['compute_dtype'\] must be 'auto' or one of"),
    (lambda m: m["layers"][LAYER].update(type="int2"), r"\['type'\] must be one of"),
    (lambda m: m["layers"][LAYER].update(kernel="fastest"), rf"layers\['{LAYER}'\] cannot be rebuilt.*kernel"),
    (lambda m: m["quant_config"].update(bits="8"), "quant_config is invalid: bits must be 8 or 4"),
    (lambda m: m["quant_config"].pop("method"), r"quant_config\['method'\] is missing"),
    (lambda m: m["quant_config"].update(skip="lm_head"), r"quant_config\['skip'\] has the wrong type"),
    (lambda m: m["aliases"].update({"lm_head.weight_int8": "no.such.tensor"}), r"aliases\['lm_head.weight_int8'\]"),
], ids=["no-aliases", "layers-list", "group-size-str", "no-compute-dtype", "bad-dtype", "bad-type", "bad-kernel",
        "bits-str", "no-method", "skip-str", "alias-nowhere"])
def test_a_tampered_quant_file_fails_naming_the_file_and_the_field(tmp_path, edit, field):
    _saved(tmp_path / "q")
    _edit_quant_file(tmp_path / "q", edit)
    with pytest.raises(ValueError, match=field) as err:
        load_quantized(tmp_path / "q")
    assert str(tmp_path / "q" / QUANT_FILE) in str(err.value)


def test_a_quant_file_from_a_newer_version_with_extra_fields_loads_with_a_warning(tmp_path, caplog):
    def newer(meta):
        meta["made_by"] = "course_lib 9.0"
        meta["layers"][LAYER]["prefetch"] = True
        meta["quant_config"]["sparsity"] = 0.5

    _, ids, logits = _saved(tmp_path / "q")
    _edit_quant_file(tmp_path / "q", newer)
    with caplog.at_level("WARNING", logger="course_lib.quantization"):
        loaded = load_quantized(tmp_path / "q")
    assert torch.equal(loaded(ids).logits, logits)
    for name in ("'made_by'", "'prefetch'", "'sparsity'"):
        assert name in caplog.text and str(tmp_path / "q" / QUANT_FILE) in caplog.text


# --- the CUDA paths: run by tests/gpu_check.py where a GPU is lent, skipped without one -------------------------

_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@_cuda
@pytest.mark.parametrize("n,k,g", [(64, 256, 32), (96, 576, 64), (256, 1024, 128)])
def test_int4_cuda_kernel_matches_the_dequantized_reference(n, k, g):
    from course_lib.quantization import INT4_CUDA

    torch.manual_seed(0)
    lin = nn.Linear(k, n).cuda()
    layer = Int4WeightOnlyLinear.from_linear(lin, group_size=g, kernel=INT4_CUDA)
    ref = Int4WeightOnlyLinear.from_linear(lin, group_size=g, kernel="reference")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("torch's int4 CUDA kernel needs compute capability 8.0 or newer")
    assert layer.kernel == INT4_CUDA, layer.kernel
    assert torch.equal(layer.int_weight(), ref.int_weight())  # the layout is read back exactly
    x = torch.randn(7, k, device="cuda", dtype=torch.bfloat16)
    y, y_ref = layer(x).float(), ref(x).float()
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 0.02
    sd = layer.state_dict()  # saved in the portable layout, whatever the kernel
    assert torch.equal(sd["weight_packed"], ref.state_dict()["weight_packed"])


@pytest.mark.gpu
@_cuda
def test_packed_layers_move_between_cpu_and_cuda():
    from course_lib.quantization import INT4_CPU, INT4_CUDA

    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    x = torch.randn(3, 256)
    for make in (lambda: Int4WeightOnlyLinear.from_linear(lin, 32), lambda: Int8WeightOnlyLinear.from_linear(lin)):
        layer = make()
        q = layer.int_weight().clone() if isinstance(layer, Int4WeightOnlyLinear) else layer.weight_int8.clone()
        y_cpu = layer(x).float()
        layer.cuda()  # in place, like model.to("cuda")
        assert layer.kernel in (INT4_CUDA, "reference")
        y_gpu = layer(x.cuda()).float().cpu()
        assert ((y_gpu - y_cpu).norm() / y_cpu.norm()).item() < 0.02
        layer.to("cpu")
        assert layer.kernel in (INT4_CPU, "aten._weight_int8pack_mm", "reference")
        back = layer.int_weight() if isinstance(layer, Int4WeightOnlyLinear) else layer.weight_int8
        assert torch.equal(back, q)


@pytest.mark.gpu
@_cuda
def test_int8_on_cuda_is_dequantize_and_linear():
    torch.manual_seed(0)
    lin = nn.Linear(576, 96).cuda()
    layer = Int8WeightOnlyLinear.from_linear(lin)
    assert layer.kernel == "reference" and layer.weight_int8.device.type == "cuda"
    x = torch.randn(5, 576, device="cuda")
    ref = x @ layer.dequantized_weight().T + lin.bias
    assert ((layer(x).float() - ref).norm() / ref.norm()).item() < 0.02


@pytest.mark.gpu
@_cuda
def test_gptq_on_cuda_keeps_every_tensor_on_the_gpu():
    model = make_tiny("llama").cuda()
    calibration = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize_(model, QuantConfig(bits=4, group_size=32, method="gptq"), calibration=calibration)
    assert all(b.device.type == "cuda" for b in model.buffers())
    with torch.no_grad():
        assert torch.isfinite(model(calibration.cuda()).logits).all()


# --- kernels chosen by measurement ----------------------------------------------------------------------------
# Tests assert that the choice is one of the correct candidates and that a broken one is never chosen: never a
# timing. Where a test needs a particular winner it replaces the clock (kernel_choice.time_candidates).


def _correct(layer) -> set[str]:
    return set(layer.choice.times_us) - set(layer.choice.rejected)


@pytest.mark.parametrize("make", [lambda lin: Int8WeightOnlyLinear.from_linear(lin, kernel="auto"),
                                  lambda lin: Int4WeightOnlyLinear.from_linear(lin, 32, kernel="auto"),
                                  lambda lin: Int8DynamicLinear.from_linear(lin, kernel="auto")],
                         ids=["int8", "int4", "w8a8"])
def test_the_measured_choice_is_a_correct_candidate_and_is_reported(make):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    layer = make(lin)
    assert layer.choice.name in _correct(layer)  # chosen among the ones that passed the check
    assert FLOAT in layer.choice.times_us  # "auto": the float layer it replaced is a candidate
    assert layer.choice.kernel == layer.kernel and layer.choice.dtype == layer.compute_dtype
    assert f"kernel={layer.kernel}" in repr(layer)
    x = torch.randn(5, 128)
    assert sqnr_db(lin(x), layer(x)) > 18  # whichever ran, it computes the quantized layer
    key = next(iter(kernel_choice.kernel_choices()))
    assert key[:3] == (type(layer).__name__, 48, 128)  # cached per shape (and dtype, device)


def test_a_fast_but_wrong_or_crashing_candidate_is_never_chosen():
    w = torch.randn(32, 64)
    ref = lambda x: x.float() @ w.T  # noqa: E731
    cands = [kernel_choice.Candidate("zeros", "zeros", torch.float32, lambda x: x.new_zeros(x.shape[0], 32)),
             kernel_choice.Candidate("raises", "raises", torch.float32, lambda x: torch.ops.aten.mm(x, w)),
             kernel_choice.Candidate("one row only", "x", torch.float32,
                                     lambda x: x @ w.T if x.shape[0] == 1 else (x @ w.T) * 2),
             kernel_choice.Candidate("right", "right", torch.float32, lambda x: x @ w.T)]
    choice = kernel_choice.choose("test-key", cands, ref, 64, torch.device("cpu"))
    assert choice.name == "right"
    assert set(choice.rejected) == {"zeros", "raises", "one row only"}
    assert "RuntimeError" in choice.rejected["raises"] and "2 rows" in choice.rejected["one row only"]
    with pytest.raises(RuntimeError, match="no correct kernel"):
        kernel_choice.choose("test-key-2", cands[:3], ref, 64, torch.device("cpu"))


def test_a_broken_int_mm_is_never_chosen_for_w8a8(monkeypatch):
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: real(a, b) * 2)
    layer = Int8DynamicLinear.from_linear(nn.Linear(64, 32), kernel="packed")
    assert layer.kernel == "reference" and "differs" in layer.choice.rejected[INT_MM]


def _fake_clock(monkeypatch, times: dict[str, float]):
    """Replace the timing so the test decides which candidate is fastest (the choice logic is under test)."""
    def fake(cands, in_features, device, rounds=kernel_choice.ROUNDS):
        return {c.name: times.get(c.name, 1.0) for c in cands}
    monkeypatch.setattr(kernel_choice, "time_candidates", fake)


def test_auto_takes_the_float_matmul_when_it_is_faster_and_packed_never_does(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    x = torch.randn(3, 128)
    _fake_clock(monkeypatch, {FLOAT: 0.1})
    auto = Int8WeightOnlyLinear.from_linear(lin, kernel="auto")
    assert auto.kernel == FLOAT and auto.weight_float.dtype == torch.float32  # the replaced layer's dtype
    torch.testing.assert_close(auto(x), F_linear(x, auto.dequantized_weight(), lin.bias))
    assert "weight_float" not in auto.state_dict()  # the file holds the integers, whatever ran
    packed = Int8WeightOnlyLinear.from_linear(lin, kernel="packed")
    assert packed.kernel != FLOAT and FLOAT not in packed.choice.times_us and packed.weight_float is None
    # a tie (float < 10% faster) keeps the integers: memory saved for sure, a few percent is noise
    kernel_choice.clear_kernel_choices()
    _fake_clock(monkeypatch, {FLOAT: 0.95, f"{INT8PACK} bfloat16": 1.0, "reference bfloat16": 2.0})
    assert Int8WeightOnlyLinear.from_linear(lin, kernel="auto").choice.name == f"{INT8PACK} bfloat16"


def F_linear(x, w, b):
    return torch.nn.functional.linear(x, w, b)


def test_the_choice_is_measured_once_per_shape_and_checked_on_every_layer(monkeypatch):
    calls = []
    real = kernel_choice.time_candidates
    monkeypatch.setattr(kernel_choice, "time_candidates", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    torch.manual_seed(0)
    a = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32))
    b = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32))
    assert len(calls) == 1 and a.choice is b.choice  # same shape: measured once
    Int8WeightOnlyLinear.from_linear(nn.Linear(128, 32))
    assert len(calls) == 2
    # a layer of a cached shape whose chosen kernel fails on *its* weights falls back to the reference path
    chosen = a.kernel
    if chosen == INT8PACK:
        realk = torch._weight_int8pack_mm
        monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, w, s: realk(x, w, s) * float("nan"))
        c = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32))
        assert c.kernel == "reference" and len(calls) == 2


def test_compute_dtype_auto_measures_every_dtype_and_a_fixed_one_only_itself():
    lin = nn.Linear(64, 32)
    auto = Int8WeightOnlyLinear.from_linear(lin, "auto", kernel="packed")
    assert {n.rsplit(" ", 1)[1] for n in auto.choice.times_us} == {"bfloat16", "float16", "float32"}
    fixed = Int8WeightOnlyLinear.from_linear(lin, torch.float32, kernel="packed")
    assert {n.rsplit(" ", 1)[1] for n in fixed.choice.times_us} == {"float32"} and fixed.compute_dtype == torch.float32


def test_choosing_a_kernel_never_runs_the_int8_kernel_on_an_unsafe_width(monkeypatch):
    def crash(*a, **k):  # stands for the segfault: this kernel must not even be called
        raise AssertionError("_weight_int8pack_mm called on an unsafe width")
    monkeypatch.setattr(torch, "_weight_int8pack_mm", crash)
    layer = Int8WeightOnlyLinear.from_linear(nn.Linear(72, 32), kernel="auto")  # 72 % 16 == 8
    assert not any(INT8PACK in n for n in layer.choice.times_us) and layer.kernel != INT8PACK
    layer(torch.randn(3, 72))


# --- W8A8: int8 weights times int8 activations ------------------------------------------------------------------


def test_w8a8_config_is_validated():
    for kw, msg in [({"activations": "fp8"}, r"activations must be one of \('none', 'int8'\)"),
                    ({"bits": 4, "group_size": 64, "activations": "int8"}, "groups of 32"),
                    ({"bits": 4, "group_size": 32, "activations": "int8", "smooth": 0.5}, "is for W8A8"),
                    ({"activations": "int8", "method": "gptq"}, "smooth=0.5"),
                    ({"smooth": 0.5}, "is for W8A8"),
                    ({"activations": "int8", "smooth": 1.5}, r"\[0, 1\]"),
                    ({"activations": "int8", "smooth": True}, r"\[0, 1\]"),
                    ({"activations": "int8", "kernel": INT8PACK}, "torch._int_mm"),
                    ({"bits": 8, "kernel": INT4_CPU}, INT8PACK)]:
        with pytest.raises(ValueError, match=msg):
            QuantConfig(**kw)
    assert QuantConfig(bits=8, activations="int8").name == "w8a8"
    assert QuantConfig(bits=8, activations="int8", smooth=0.5).name == "w8a8-sq0.5"
    assert QuantConfig(bits=4, group_size=32, activations="int8").name == "w4a8-g32"
    with pytest.raises(ValueError, match="calibration"):
        quantize_(make_tiny("llama"), QuantConfig(bits=8, activations="int8", smooth=0.5))


def test_activations_are_rounded_to_int8_per_group_of_32():
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 10, 96)
    x[1, :32] = 0  # an all-zero group stays zero (no division by a zero scale)
    r = Q.round_activation_groups(x, 32)
    scale = x.reshape(3, 3, 32).abs().amax(-1, keepdim=True) / 127
    q = r.reshape(3, 3, 32) / scale.clamp_min(1e-30)
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127 + 1e-3  # integers in [-127, 127]
    assert ((r - x).reshape(3, 3, 32).abs() <= scale / 2 + 1e-6).all()  # each within half its group's step
    assert torch.equal(r[1, :32], torch.zeros(32))
    with pytest.raises(ValueError, match="must divide"):
        Q.round_activation_groups(torch.randn(1, 40), 32)


@pytest.mark.parametrize("kernel", ["packed", "reference", "auto"])
def test_w4a8_layer_multiplies_the_rounded_activations_whatever_kernel_runs(kernel):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    model = nn.Sequential(lin)
    quantize_(model, QuantConfig(bits=4, group_size=32, activations="int8", kernel=kernel, compute_dtype="float32"))
    layer = model[0]
    assert type(layer) is Q.Int4A8Linear and layer.KIND == "w4a8"
    w = layer.dequantized_weight()
    for rows in (1, 3, 17):
        x = torch.randn(rows, 96)
        with torch.no_grad():
            y = layer(x)
        want = Q.round_activation_groups(x, 32) @ w.T + lin.bias
        assert torch.allclose(y, want, rtol=1e-4, atol=1e-4), kernel
        assert not torch.allclose(y, x @ w.T + lin.bias, rtol=1e-6, atol=1e-6)  # the activations were rounded
    with pytest.raises(ValueError, match="groups of 32"):
        Q.Int4A8Linear(torch.zeros(8, 64, dtype=torch.uint8), torch.ones(1, 8, 2), 64, None)


@pytest.mark.parametrize("kernel", [INT_MM, "reference"])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_w8a8_is_per_token_int8_times_int8_with_int32_accumulation(kernel, rows):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)  # 96 inputs, 40 outputs, 1 / 3 / 17 rows: odd shapes for _int_mm on the CPU
    layer = Int8DynamicLinear.from_linear(lin, kernel=kernel)
    assert layer.kernel == kernel and layer.weight_int8.dtype == torch.int8
    x = torch.randn(rows, 96)
    x[:, 0] *= 30  # an outlier channel: its row's scale is set by it
    sx = x.abs().amax(1, keepdim=True) / 127  # one scale per token, found at run time
    xq = torch.clamp(torch.round(x / sx), -127, 127)
    want = (xq @ layer.weight_int8.float().T) * sx * layer.scales + lin.bias  # exact integers, then rescaled
    torch.testing.assert_close(layer(x), want, rtol=1e-2 if kernel == "reference" else 1e-5, atol=1e-4)


def test_w8a8_model_quantizes_saves_and_loads(tmp_path):
    from course_lib.quantization import load_quantized

    model = make_tiny("qwen2")  # q/k/v biases
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        report = quantize_(model, QuantConfig(bits=8, activations="int8", skip=("mlp.down_proj",)))
        out = model(ids).logits
    w8a8 = [n for n, m in model.named_modules() if isinstance(m, Int8DynamicLinear)]
    assert len(w8a8) == 2 * 6 and all("down_proj" not in n for n in w8a8)
    assert all("skip pattern" in report.skipped[f"model.layers.{i}.mlp.down_proj"] for i in range(2))
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)  # the head stays int8 weight-only
    assert sqnr_db(ref, out) > 20
    save_quantized(model, tmp_path / "q")
    back = load_quantized(tmp_path / "q")
    assert isinstance(back.model.layers[0].self_attn.q_proj, Int8DynamicLinear)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, out, rtol=1e-4, atol=1e-4)


def test_smoothquant_moves_outliers_into_the_weights_and_cuts_the_error():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    x_cal, x_test = _outlier_inputs(seed=0), _outlier_inputs(seed=1)
    x_cal[:, :4] *= 10  # outliers that make per-token int8 activations coarse
    x_test[:, :4] *= 10
    from course_lib.quantization import smoothquant_scales

    s = smoothquant_scales(x_cal, [lin.weight], 0.5)
    plain = Int8DynamicLinear.from_linear(lin)
    smooth_lin = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        smooth_lin.weight.copy_(lin.weight * s)  # W * s ...
    smoothed = Int8DynamicLinear.from_linear(smooth_lin, input_scale=1 / s)  # ... and x / s
    ref = lin(x_test)
    assert sqnr_db(ref, smoothed(x_test)) > sqnr_db(ref, plain(x_test)) + 3


def test_smoothquant_on_a_model_folds_into_the_norms_and_round_trips(tmp_path):
    from course_lib.quantization import load_quantized

    model = make_tiny("llama")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    report = quantize_(model, QuantConfig(bits=8, activations="int8", smooth=0.5), calibration=ids)
    assert "folded into model.layers.0.input_layernorm" in report.scaled["model.layers.0.self_attn.k_proj"]
    assert "folded into model.layers.1.post_attention_layernorm" in report.scaled["model.layers.1.mlp.up_proj"]
    assert report.scaled["model.layers.0.mlp.down_proj"].endswith("input_scale")
    assert model.model.layers[0].mlp.down_proj.input_scale is not None
    assert model.model.layers[0].self_attn.q_proj.input_scale is None  # the norm took it
    with torch.no_grad():
        out = model(ids).logits
    assert sqnr_db(ref, out) > 20
    save_quantized(model, tmp_path / "sq")
    back = load_quantized(tmp_path / "sq")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, out, rtol=1e-4, atol=1e-4)


# --- AWQ: activation-aware scales ----------------------------------------------------------------------------------


def test_awq_layer_error_is_at_most_rtn_on_outlier_channels():
    from course_lib.quantization import awq_scales

    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    x_cal, x_test = _outlier_inputs(seed=0), _outlier_inputs(seed=1)
    cfg = QuantConfig(bits=4, group_size=32, method="awq")
    s, alpha, errs = awq_scales(x_cal, [lin.weight], cfg)
    assert errs[alpha] == min(errs.values()) and errs[alpha] <= errs[0.0]  # alpha = 0 is RTN
    assert alpha > 0  # with outlier channels, scaling them up pays
    awq_w = fake_quantize(lin.weight * s, 4, False, "per_group", 32) / s
    rtn_w = fake_quantize(lin.weight, 4, False, "per_group", 32)
    ref = x_test @ lin.weight.t()
    assert sqnr_db(ref, x_test @ awq_w.t()) > sqnr_db(ref, x_test @ rtn_w.t())  # on calibration-like data


def test_fold_into_norm_divides_the_output_and_refuses_a_norm_it_cannot_fold():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from course_lib.quantization.awq import _fold_into_norm

    s = torch.rand(16) + 0.5
    x = torch.randn(3, 16)
    norm = LlamaRMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
        before = norm(x)
        assert _fold_into_norm(norm, s)
        torch.testing.assert_close(norm(x), before / s)

    class OnePlusNorm(nn.Module):  # Gemma's form: x * (1 + weight); dividing the weight is not dividing the output
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(16))

        def forward(self, x):
            return x * (1 + self.weight)

    g = OnePlusNorm()
    with torch.no_grad():
        assert not _fold_into_norm(g, s)
    assert torch.equal(g.weight, torch.zeros(16))  # left as it was


def test_awq_model_keeps_logits_close_and_beats_rtn_on_its_calibration_data(tmp_path):
    from course_lib.quantization import load_quantized

    model = make_tiny("llama")
    with torch.no_grad():  # outlier channels in the residual stream, as real LLMs have
        model.model.layers[0].input_layernorm.weight[:3] *= 25
        model.model.layers[1].post_attention_layernorm.weight[5:7] *= 25
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    import copy

    with torch.no_grad():
        ref = model(ids).logits
        rtn, awq = copy.deepcopy(model), copy.deepcopy(model)
        quantize_(rtn, QuantConfig(bits=4, group_size=32, embeddings="float"))
        report = quantize_(awq, QuantConfig(bits=4, group_size=32, method="awq", embeddings="float"),
                           calibration=ids)
        out_awq, out_rtn = awq(ids).logits, rtn(ids).logits
    assert report.scaled and all(v.startswith("awq alpha=") for v in report.scaled.values())
    assert "folded into model.layers.0.input_layernorm" in report.scaled["model.layers.0.self_attn.q_proj"]
    assert awq.model.layers[0].self_attn.o_proj.input_scale is not None
    assert sqnr_db(ref, out_awq) > 15  # the model's logits stay close
    assert sqnr_db(ref, out_awq) >= sqnr_db(ref, out_rtn) - 0.5  # and no worse than RTN here
    save_quantized(awq, tmp_path / "awq")
    back = load_quantized(tmp_path / "awq")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, out_awq, rtol=1e-4, atol=1e-4)


def test_a_named_kernel_that_is_wrong_here_falls_back_to_the_reference(monkeypatch):
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, w, s: real(x, w, s) * 2)
    layer = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32), kernel=INT8PACK)
    assert layer.kernel == "reference" and "no correct kernel" in layer.choice.rejected["error"]
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T + layer.bias, rtol=0.02, atol=0.02)


def test_gptq_integers_do_not_depend_on_the_kernel_a_timing_picked(monkeypatch):
    """With compute_dtype="auto" a timing picks each packed layer's kernel (bf16 or fp32 activations). The
    layers GPTQ calibrates later must not see that choice: the same integers whichever dtype the timing favours."""
    import copy

    model = make_tiny("llama", layers=2, hidden=128, intermediate=256, vocab=256)
    cal = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    cfg = QuantConfig(bits=4, group_size=32, method="gptq", embeddings="float")

    def ints(favoured):
        def fake_times(cands, in_features, device, rounds=kernel_choice.ROUNDS):
            return {c.name: 1e-6 if c.dtype == favoured else 1e-3 for c in cands}

        monkeypatch.setattr(kernel_choice, "time_candidates", fake_times)
        kernel_choice.clear_kernel_choices()
        m = copy.deepcopy(model)
        quantize_(m, cfg, calibration=cal)
        layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, Int4WeightOnlyLinear)}
        assert layers and {mod.compute_dtype for mod in layers.values()} == {favoured}
        return {n: mod.int_weight() for n, mod in layers.items()}

    try:
        a, b = ints(torch.bfloat16), ints(torch.float32)
    finally:
        kernel_choice.clear_kernel_choices()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_gptq_rounds_each_weight_to_the_grid_the_layer_stores():
    """The layer stores bf16 scales and offsets ("auto"), so GPTQ rounds against that grid. With H = I nothing is
    spread to later columns and GPTQ is rounding to nearest: every stored weight must then be the nearest point
    of the stored grid. Rounding against the fp32 scales and storing bf16 ones misses it for some weights."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    cfg = QuantConfig(bits=4, group_size=32, method="gptq")  # damping keeps a diagonal H diagonal

    def stored(scale_dtype):
        layer = Int4WeightOnlyLinear.from_quantized(gptq_quantize_weight(w, torch.eye(256), cfg, scale_dtype),
                                                    None, torch.bfloat16, Q.REFERENCE)
        assert layer.scales_and_zeros.dtype == torch.bfloat16
        sz = layer.scales_and_zeros.float().transpose(0, 1).repeat_interleave(32, 1)  # (N, K, 2)
        grid = (torch.arange(16.0) - 8) * sz[..., :1] + sz[..., 1:]  # (N, K, 16): every value it can store
        nearest = grid.gather(-1, (grid - w[..., None]).abs().argmin(-1, keepdim=True))[..., 0]
        return layer.dequantized_weight(), nearest

    got, nearest = stored(torch.bfloat16)
    torch.testing.assert_close(got, nearest, atol=0, rtol=0)
    got, nearest = stored(torch.float32)
    assert (got != nearest).any()


def test_gptq_shares_one_run_per_input_group_and_stops_early_with_the_same_result(monkeypatch):
    """q/k/v (and gate/up) read one input, so one block run gives all their Hessians, and a run stops once the
    group has seen its input. Same integers as one full block run per layer (fixed compute dtype: "auto" measures
    which dtype is fastest, and that may differ between runs), with fewer runs of the block (counted at its
    first norm, which is never replaced)."""
    from course_lib import load_model
    from course_lib.data import calibration_batches

    _, tok = load_model("course-tiny")
    calib = calibration_batches(tok, n=2, seq_len=32)
    cfg = QuantConfig(bits=4, group_size=32, method="gptq", kernel="reference", compute_dtype="float32")

    def run():
        torch.manual_seed(0)
        model, _ = load_model("course-tiny")
        downs = [0]
        model.model.layers[0].input_layernorm.register_forward_pre_hook(lambda *a: downs.__setitem__(0, downs[0] + 1))
        quantize_(model, cfg, calibration=calib)
        return {k: v.clone() for k, v in model.state_dict().items()}, downs[0]

    grouped, grouped_calls = run()
    monkeypatch.setattr(walk, "input_groups", lambda names, prefix: [[n] for n in names])  # one run per layer
    single, single_calls = run()
    assert grouped.keys() == single.keys() and all(torch.equal(grouped[k], single[k]) for k in grouped)
    assert grouped_calls < single_calls


# --- presets and the method registry: a format is a name, a method is one registration -----------------------


def test_every_bench_format_is_a_preset_and_no_two_presets_are_one_format():
    from course_lib.bench import engines, quant, quant_real

    used = [*quant.PRESET_OF.values(), *(p for p, _ in engines.FORMATS.values()),
            *(m for m in quant_real.METHODS if m not in ("fp32", "int4-per-channel-fake"))]
    assert set(used) <= set(Q.PRESETS)
    configs = {name: Q.preset(name) for name in Q.PRESETS}
    assert len(set(configs.values())) == len(configs)
    assert configs["int4-wo-g32"].group_size == 32 and configs["int4-wo-g128"].group_size == 128
    assert Q.preset("int4-wo-g128", kernel="reference").kernel == "reference"
    with pytest.raises(ValueError, match="no quantization preset 'int4-wo'"):
        Q.preset("int4-wo")


def _clip_then_round(model, todo, cfg, calibration, report):
    """A toy method: each weight row clipped at 90% of its largest magnitude, then rounded to nearest."""
    for name, lin in todo.items():
        new = Q.layers.packed_linear(lin, cfg, weight=_clipped(lin.weight))
        Q.layers.set_module(model, name, new)
        report.quantized[name] = new.kernel


def _clipped(w: torch.Tensor) -> torch.Tensor:
    limit = 0.9 * w.detach().abs().amax(1, keepdim=True)
    return torch.maximum(torch.minimum(w.detach(), limit), -limit)


@pytest.fixture
def clip_method(monkeypatch):
    """The toy method, registered here and nowhere else, with a preset naming it."""
    from course_lib.quantization import registry

    method = registry.register(Q.Method("rtn-clip", _clip_then_round))
    monkeypatch.setitem(Q.PRESETS, "clip-int8", dict(bits=8, method="rtn-clip", kernel="reference",
                                                    compute_dtype="float32"))
    yield method
    registry.unregister("rtn-clip")


def test_a_method_registered_in_one_place_quantizes_saves_loads_and_makes_a_bench_row(clip_method, tmp_path):
    from course_lib.bench import quant, quant_real

    cfg = Q.preset("clip-int8")
    assert "rtn-clip" in Q.method_names() and cfg.name == "rtn-clip-int8-wo" and not cfg.needs_calibration
    model = make_tiny("llama")
    float_down = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    report = quantize_(model, cfg)
    assert "model.layers.1.mlp.down_proj" in report.quantized
    want = quantize(_clipped(float_down), 8, symmetric=True, granularity="per_channel").q
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight_int8, want)  # the method's integers, not RTN's
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    save_quantized(model, tmp_path / "clip")
    back = Q.load_quantized(tmp_path / "clip")
    assert back.course_quant_config == cfg
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    base = make_tiny("llama")
    row_model, info = quant_real._variant("clip-int8", base, ids)
    assert info == {"quantized_linears": len(report.quantized), "float_linears": 0}
    assert torch.equal(row_model.model.layers[1].mlp.down_proj.weight_int8, want)
    speed_model = quant._prepare("clip-int8", make_tiny("llama"), None)
    assert torch.equal(speed_model.model.layers[1].mlp.down_proj.weight_int8, want)


def test_config_lists_the_registered_methods_when_one_is_unknown():
    with pytest.raises(ValueError, match=r"method must be one of \('rtn', 'gptq', 'awq'\), got 'hqq'"):
        QuantConfig(bits=4, group_size=32, method="hqq")


def test_a_quantized_model_saved_by_transformers_is_refused_with_the_fix(course_tiny, tmp_path):
    from course_lib import load_model

    _, tok = course_tiny
    model = make_tiny("llama")
    quantize_(model, QuantConfig(bits=8))
    model.save_pretrained(tmp_path)  # transformers' own save: packed buffers under names it cannot rebuild
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"save_pretrained.*save_quantized\(model, folder\)"):
        load_model(tmp_path)

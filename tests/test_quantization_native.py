"""Tests for course_lib.quantization.native: the hand-written decode kernels (C++, built at first use).

Correctness only, never a timing: each operator against a float reference at one and two rows, every weight and
activation dtype it takes, widths that are not a multiple of its vector width and row counts not a multiple of
its block; the int4 kernel in both of its paths (float32 and bf16 activations) and both scale layouts; clear
errors for what it refuses; tracing into a compiled graph; and the streaming layers running it. Skipped where the
kernels cannot be built (no AVX-512, no compiler, no ninja): the streaming layers then run the compiled
reductions, which tests/test_quantization_streaming.py covers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from course_lib.generation import CompiledDecoder, generate_kv_cache
from course_lib.quantization import (
    STREAM,
    QuantConfig,
    kernel_choice,
    native,
    quantize_,
    round_activation_groups,
    stream_,
    streaming,
)
from course_lib.speculative import prompt_lookup_compiled
from tests.conftest import make_tiny

OK, WHY = native.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"native kernels not built here: {WHY}")


@pytest.fixture(autouse=True)
def fresh_kernel_choices():
    kernel_choice.clear_kernel_choices()  # a choice is cached per layer shape: each test makes its own
    yield
    kernel_choice.clear_kernel_choices()


SHAPES = [(1536, 576), (37, 100), (5, 32)]  # SmolLM2's MLP; a tail of 4 columns and a short last block; tiny


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_float_kernel_matches_a_float32_matmul(rows, shape, wdt, xdt):
    g = torch.Generator().manual_seed(0)
    n, k = shape
    x, w = torch.randn(rows, k, generator=g).to(xdt), torch.randn(n, k, generator=g).to(wdt)
    y = native.gemv_float(x, w)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    assert _rel(y, x.float() @ w.float().T) < 1e-5


@pytest.mark.parametrize("shape", [(1536, 576), (48, 64), (37, 96), (4, 32)])  # tiles of 16 rows (AMX), or not
def test_bf16_kernel_scores_up_to_16_rows_each_as_if_alone(shape):
    """A speculative verification pass sends several rows: each must come out bit for bit as a one-row call."""
    g = torch.Generator().manual_seed(5)
    n, k = shape
    w, x = torch.randn(n, k, generator=g).bfloat16(), torch.randn(native.BF16_ROWS, k, generator=g).bfloat16()
    alone = torch.cat([native.gemv_float(x[i:i + 1], w) for i in range(len(x))])
    assert _rel(alone, x.float() @ w.float().T) < 1e-5
    for rows in (2, 3, 5, 6, 8, 16):
        assert torch.equal(native.gemv_float(x[:rows], w), alone[:rows])
    assert torch.equal(native.gemv_float(x[:6].T.contiguous().T, w), alone[:6])  # strided rows are copied first
    assert native.max_rows("float", x, w) == native.BF16_ROWS
    assert native.max_rows("float", x.float(), w) == native.max_rows("int8", x, w) == native.ROWS


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16])
def test_int8_kernel_applies_each_channels_scale(rows, shape, sdt):
    g = torch.Generator().manual_seed(1)
    n, k = shape
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, generator=g) + 0.1).to(sdt)
    x = torch.randn(rows, k, generator=g).bfloat16()
    assert _rel(native.gemv_int8(x, q, s), (x.float() @ q.float().T) * s.float()) < 1e-5


@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,group", [(1536, 576, 32), (37, 576, 64), (6, 128, 128), (7, 96, 96)])
@pytest.mark.parametrize("layout", ["as stored", "rows-major", "rows-major bf16"])
def test_int4_kernel_matches_the_dequantized_weights(xdt, n, k, group, layout):
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (n, k), generator=g)
    sz = torch.randn(k // group, n, 2, generator=g)  # weight = (q - 8) * scale + zero, per group
    if layout != "as stored":
        sz = native.rows_major(sz)
        assert sz.shape == (k // group, n, 2) and sz.transpose(0, 1).is_contiguous()
    if layout.endswith("bf16"):
        sz = sz.bfloat16()
    w = ((q.float().reshape(n, -1, group) - 8) * sz.float().transpose(0, 1)[..., :1]
         + sz.float().transpose(0, 1)[..., 1:]).reshape(n, k)
    packed = streaming.pack_int4_halves(q, group)
    for rows in (1, 2):  # one bf16 row takes the dot-product path, the rest the float32 one
        x = torch.randn(rows, k, generator=g).to(xdt)
        assert _rel(native.gemv_int4(x, packed, sz, group), x.float() @ w.T) < 1e-4


@pytest.mark.skipif(not native.vnni(), reason="the W4A8 kernel needs AVX512-VNNI")
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(1536, 576), (7, 64), (13, 96)])  # K/2 = 288 and 48: a short last chunk
def test_w4a8_kernel_multiplies_the_activations_rounded_per_group(xdt, sdt, n, k):
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (n, k), generator=g)
    sz = native.rows_major(torch.randn(k // 32, n, 2, generator=g) * 0.1).to(sdt)
    w = ((q.float().reshape(n, -1, 32) - 8) * sz.float().transpose(0, 1)[..., :1]
         + sz.float().transpose(0, 1)[..., 1:]).reshape(n, k)
    packed = streaming.pack_int4_halves(q, 32)
    for rows in (1, 2):
        x = torch.randn(rows, k, generator=g).to(xdt)
        out = native.gemv_int4_a8(x, packed, sz)
        assert _rel(out, round_activation_groups(x, 32) @ w.T) < 1e-5
        assert _rel(out, x.float() @ w.T) > 1e-4  # not the unrounded product: the activations were rounded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,hkv,slots,d,slot", [(1, 9, 3, 150, 64, 0), (1, 9, 3, 150, 64, 37), (2, 4, 4, 40, 32, 39),
                                                  (1, 8, 1, 300, 64, 299), (1, 9, 3, 150, 64, 16)])
def test_decode_attention_matches_masked_attention_over_the_filled_slots(dtype, b, h, hkv, slots, d, slot):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for shape in
               ((b, h, 1, d), (b, hkv, slots, d), (b, hkv, slots, d)))
    k[:, :, slot + 1:] = float("nan")  # empty slots: never read (a read would poison the softmax)
    out = native.decode_attention(q, k, v, torch.tensor(slot), d ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    rep = h // hkv
    n = slot + 1
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k[:, :, :n].float().repeat_interleave(rep, 1), v[:, :, :n].float().repeat_interleave(rep, 1))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(out, ref) < tol


def test_the_kernels_refuse_what_they_do_not_compute():
    w, x3 = torch.randn(8, 64), torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="1 to 2 rows"):
        native.gemv_float(x3, w)
    with pytest.raises(RuntimeError, match=f"1 to {native.BF16_ROWS} rows"):
        native.gemv_float(torch.randn(native.BF16_ROWS + 1, 64).bfloat16(), w.bfloat16())
    with pytest.raises(RuntimeError, match=r"\(rows, 64\)"):
        native.gemv_float(torch.randn(1, 32), w)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        native.gemv_int4(torch.randn(1, 64), torch.zeros(8, 32, dtype=torch.uint8), torch.ones(4, 8, 2), 16)
    with pytest.raises(RuntimeError, match="one scale per output channel"):
        native.gemv_int8(torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(7))
    q, cache = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 10, 32)
    with pytest.raises(RuntimeError, match="outside the cache's 10 slots"):
        native.decode_attention(q, cache, cache, torch.tensor(10), 1.0)
    with pytest.raises(RuntimeError, match="outside the cache's 10 slots"):  # 3 new tokens from slot 8: 8..10
        native.decode_attention(torch.randn(1, 4, 3, 32), cache, cache, torch.tensor(8), 1.0)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        native.decode_attention(torch.randn(1, 3, 1, 32), cache, cache, torch.tensor(0), 1.0)
    if native.vnni():
        packed = torch.zeros(8, 32, dtype=torch.uint8)
        with pytest.raises(RuntimeError, match="rows-major"):
            native.gemv_int4_a8(torch.randn(1, 64), packed, torch.ones(2, 8, 2))
        with pytest.raises(RuntimeError, match="multiple of 32"):
            native.gemv_int4_a8(torch.randn(1, 48), torch.zeros(8, 24, dtype=torch.uint8), torch.ones(1, 8, 2))


def test_turned_off_by_the_environment_says_so(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native._load() == (False, f"turned off ({native.ENV}=0)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_of_several_new_tokens_is_each_tokens_own(dtype):
    """T new tokens at slots slot..slot+T-1 (a verification pass): token t sees slots 0..slot+t, computed exactly
    as a one-token call at slot + t; the output is contiguous whatever q's strides."""
    g = torch.Generator().manual_seed(6)
    b, h, hkv, slots, d, slot, t = 1, 9, 3, 60, 64, 20, 6
    q = torch.randn(b, t, h, d, generator=g).to(dtype).transpose(1, 2)  # as the model makes it: a view
    k, v = (torch.randn(b, hkv, slots, d, generator=g).to(dtype) for _ in range(2))
    k[:, :, slot + t:] = float("nan")  # past the last new token: never read
    out = native.decode_attention(q, k, v, torch.tensor(slot), d ** -0.5)
    assert out.shape == q.shape and out.is_contiguous()
    for j in range(t):
        one = native.decode_attention(q[:, :, j:j + 1], k, v, torch.tensor(slot + j), d ** -0.5)
        assert torch.equal(out[:, :, j:j + 1], one)
    mask = torch.arange(slots)[None, :] <= (slot + torch.arange(t))[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().nan_to_num().repeat_interleave(3, 1), v.float().repeat_interleave(3, 1), attn_mask=mask)
    assert _rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("b, h, hkv, d", [(1, 9, 3, 64), (2, 10, 2, 48), (1, 8, 1, 80), (1, 4, 4, 32)])
def test_decode_attention_computes_a_query_alike_whichever_heads_share_its_work(b, h, hkv, d):
    """The kernel groups the query heads that share a key/value head into one work item when there are enough
    items for the threads (a pass of several tokens) and not otherwise (one token): the output is the same."""
    g = torch.Generator().manual_seed(7)
    slots, slot, t = 50, 30, 5
    q = torch.randn(b, t, h, d, generator=g).bfloat16().transpose(1, 2)
    k, v = (torch.randn(b, hkv, slots, d, generator=g).bfloat16() for _ in range(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # b * hkv * t items >= 2 threads: grouped
    try:
        grouped = native.decode_attention(q, k, v, torch.tensor(slot), d ** -0.5)
    finally:
        torch.set_num_threads(threads)
    for j in range(t):  # one token, one batch row, one key/value head at a time: too few items, one head each
        for i in range(b):
            for kv in range(hkv):
                heads = slice(kv * (h // hkv), (kv + 1) * (h // hkv))
                one = native.decode_attention(q[i:i + 1, heads, j:j + 1], k[i:i + 1, kv:kv + 1], v[i:i + 1, kv:kv + 1],
                                              torch.tensor(slot + j), d ** -0.5)
                assert torch.equal(grouped[i:i + 1, heads, j:j + 1], one)


def test_a_compiled_graph_calls_the_kernels_as_operators():
    w, x = torch.randn(40, 96), torch.randn(1, 96)
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    f = torch.compile(lambda x, w: native.gemv_float(x, w) * 2, backend=backend, fullgraph=True)
    torch.testing.assert_close(f(x, w), 2 * x @ w.T, rtol=1e-5, atol=1e-5)
    assert any("course_lib.gemv_float" in t for t in seen)


def test_streaming_layers_run_the_native_kernels_where_built(monkeypatch):
    calls = []
    for kind, fn in list(native.KERNELS.items()):
        monkeypatch.setitem(native.KERNELS, kind, lambda *a, fn=fn, kind=kind: calls.append(kind) or fn(*a))
    model = make_tiny(hidden=64, intermediate=128, vocab=96)
    ids = torch.tensor([[3, 17, 5, 42, 8]])
    reference = generate_kv_cache(model, ids, 6)
    assert set(stream_(model).values()) == {STREAM}
    assert torch.equal(generate_kv_cache(model, ids, 6), reference)  # fp32: the same greedy tokens
    assert "float" in calls
    calls.clear()
    int8 = make_tiny(hidden=64, intermediate=128, vocab=96)
    quantize_(int8, QuantConfig(bits=8, kernel="stream"))
    assert torch.equal(CompiledDecoder(int8, backend="eager")(ids, 6), generate_kv_cache(int8, ids, 6))
    assert "int8" in calls
    calls.clear()
    int4 = make_tiny(hidden=64, intermediate=128, vocab=96)
    quantize_(int4, QuantConfig(bits=4, group_size=32, kernel="stream"))
    generate_kv_cache(int4, ids, 3)
    assert "int4" in calls
    if native.vnni():  # W4A8: the integer kernel at one row, eager and traced alike; the prompt (5 rows) elsewhere
        calls.clear()
        w4a8 = make_tiny(hidden=64, intermediate=128, vocab=96)
        quantize_(w4a8, QuantConfig(bits=4, group_size=32, activations="int8", kernel="stream"))
        assert torch.equal(CompiledDecoder(w4a8, backend="eager")(ids, 6), generate_kv_cache(w4a8, ids, 6))
        assert "int4_a8" in calls


def test_a_bf16_verification_pass_scores_each_token_as_the_one_token_step():
    """Compiled (inductor) bf16 engine: the k + 1 rows of a verification pass are bit for bit the one-token step's
    logits, so prompt lookup on it gives exactly the decoder's greedy tokens."""
    model = make_tiny(hidden=64, intermediate=128, vocab=96, layers=2).to(torch.bfloat16)
    stream_(model)
    dec = CompiledDecoder(model)
    prompt = torch.tensor([[5, 7, 9, 11, 5, 7, 9, 11, 5, 7]])
    with torch.inference_mode():
        nxt, slot, cache = dec.start(prompt, 8, room=8)
        toks = torch.tensor([[int(nxt), 3, 4, 5, 6]])
        rows = dec.verify(toks, slot, cache)[0]
        for j in range(toks.shape[1]):
            assert torch.equal(dec.step(toks[:, j:j + 1], slot + j, cache)[0], rows[j])
        assert dec.verify_tokens(toks, slot, cache)[0].tolist() == rows.argmax(-1).tolist()
    ref = dec(prompt, 24)[0].tolist()  # the plain loop
    res = prompt_lookup_compiled(dec, prompt, 24, k=4, min_ngram=1)
    assert res.tokens == ref and res.drafted_rounds > 0


def test_a_stream_request_without_native_kernels_keeps_measuring(monkeypatch):
    monkeypatch.setattr(native, "_STATE", [(False, "not built in this test")])
    lin = nn.Linear(64, 32)
    layer = streaming.StreamingLinear.from_linear(lin)
    assert any(n.startswith("F.linear") for n in layer.choice.times_us)  # both candidates timed, not one taken

"""KV-cache quantization: the storage format, the static, paged and transformers caches, quality and bytes."""

from __future__ import annotations

import pytest
import torch

from course_lib.data import encode_split
from course_lib.generation import generate_kv_cache
from course_lib.kv_cache import KVCache
from course_lib.kv_quant import (
    KVQuantConfig,
    QuantizedKV,
    QuantizedKVCache,
    cache_kwargs,
    kv_bytes_per_token,
    max_batch,
    quantized_cache,
)
from course_lib.metrics import perplexity
from course_lib.paged_kv import PagedKVCache
from course_lib.scratch_llama import ScratchLlama

from .conftest import make_tiny

INT8, INT4 = KVQuantConfig(bits=8), KVQuantConfig(bits=4, group_size=16)


def _text_ids(tokenizer, n: int) -> torch.Tensor:
    return encode_split(tokenizer, "heldout", max_chars=n * 16)[:n][None]


def _cached_logits(scratch: ScratchLlama, ids: torch.Tensor, prefill: int, kv_quant=None) -> torch.Tensor:
    """Logits of every position: a prefill of ``prefill`` tokens, then one token per step from the cache."""
    cache = scratch.new_cache(ids.shape[0], ids.shape[1], kv_quant=kv_quant)
    parts = [scratch(ids[:, :prefill], cache)]
    parts += [scratch(ids[:, i:i + 1], cache) for i in range(prefill, ids.shape[1])]
    return torch.cat(parts, 1)


@torch.inference_mode()
def test_quantized_caches_stay_within_their_tolerance_of_the_float_cache(course_tiny):
    """course-tiny on held-out code, 64 tokens prefilled then 32 decoded: int8 moves no logit by more than 0.15
    (the logits' spread is about 2.5) and changes no greedy token; 4-bit (groups of 16) keeps the mean KL under
    0.02 nats and at least 85% of the greedy tokens (measured: max 0.05 / KL 1.5e-5 and KL 0.005 / 95%)."""
    model, tok = course_tiny
    scratch = ScratchLlama(model)
    ids = _text_ids(tok, 96)
    ref = _cached_logits(scratch, ids, 64)
    torch.testing.assert_close(ref, model(ids).logits, atol=1e-4, rtol=1e-4)  # the float cache is exact
    got_of = {}
    for cfg, max_diff, max_kl, min_agree in ((INT8, 0.15, 1e-4, 1.0), (INT4, None, 0.02, 0.85)):
        got = got_of[cfg] = _cached_logits(scratch, ids, 64, cfg)
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert 0 < kl < max_kl and agree >= min_agree, (cfg.name, kl, agree)
        if max_diff is not None:
            assert (got - ref).abs().max().item() < max_diff
    # 4 bits costs more than 8: the tolerance is not so loose that it hides the format
    assert (got_of[INT4] - ref).abs().mean() > 4 * (got_of[INT8] - ref).abs().mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_halves_a_16_bit_cache_and_quarters_a_32_bit_one(dtype):
    scratch = ScratchLlama(make_tiny("llama", num_heads=4, num_kv_heads=2, hidden=128).to(dtype))  # head_dim 32
    s = scratch.shape
    float_cache = scratch.new_cache(2, 40)
    for cfg in (INT8, INT4, KVQuantConfig(bits=4)):
        q = scratch.new_cache(2, 40, kv_quant=cfg)
        assert isinstance(q, QuantizedKVCache) and q.nbytes() == kv_bytes_per_token(s, cfg) * 2 * 40
    assert float_cache.nbytes() == kv_bytes_per_token(s, None, dtype) * 2 * 40
    ratio = scratch.new_cache(2, 40, kv_quant=INT8).nbytes() / float_cache.nbytes()
    # 32 int8 codes + one float16 scale per token and head: 34 bytes against 64 (bf16) or 128 (fp32)
    assert ratio == pytest.approx(34 / (32 * dtype.itemsize))
    # 4-bit in groups of 16: 16 bytes of codes + 2 x (scale, minimum) = 24 bytes per token and head
    assert kv_bytes_per_token(s, INT4) == s.n_layers * 2 * s.n_kv_heads * 24
    budget = 1 << 20
    assert max_batch(s, budget, 64, INT8) >= 1.8 * max_batch(s, budget, 64, None, torch.bfloat16)
    assert max_batch(s, budget, 64, None, dtype) == budget // (kv_bytes_per_token(s, None, dtype) * 64)


def test_round_trip_error_is_bounded_by_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 7, 64, generator=g) * torch.logspace(-2, 2, 64)  # channels of very different sizes
    x[0, 0, 0] = 0.0  # an all-zero vector must come back as zeros, not NaN
    for cfg in (INT8, KVQuantConfig(bits=8, group_size=16), KVQuantConfig(bits=4), INT4):
        q = QuantizedKV.quantize(x, cfg)
        assert q.shape == x.shape and q.codes.shape[-1] == 64 * cfg.bits // 8  # 4-bit: two codes a byte
        back = q.dequantize(torch.float32)
        assert torch.equal(back[0, 0, 0], torch.zeros(64))
        groups = x.reshape(3, 2, 7, -1, cfg.group(64))
        step = groups.abs().amax(-1) / 127 if cfg.bits == 8 else (groups.amax(-1) - groups.amin(-1)) / 15
        err = (back - x).abs().reshape(groups.shape)
        # half a step, plus the float16 rounding of the stored scale (and minimum)
        assert (err <= step[..., None] * 0.51 + 2e-3 * groups.abs().amax(-1, keepdim=True)).all(), cfg.name
    def mse(cfg):
        return (QuantizedKV.quantize(x, cfg).dequantize() - x).pow(2).mean()

    assert mse(KVQuantConfig(bits=4, group_size=8)) < mse(KVQuantConfig(bits=4)) / 2  # finer groups: less error
    assert mse(INT8) < mse(KVQuantConfig(bits=4)) / 50


@torch.inference_mode()
def test_static_decode_step_reads_the_quantized_cache():
    """``decode_static`` (the compilable step) writes and reads through the cache the same way as the eager path."""
    scratch = ScratchLlama(make_tiny("llama"))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    eager = _cached_logits(scratch, ids, 8, INT8)[:, -1]
    cache = scratch.new_cache(2, 12, kv_quant=INT8)
    scratch(ids[:, :8], cache)
    torch.testing.assert_close(scratch.decode_static(ids[:, 8:], torch.tensor(8), cache), eager,
                               atol=1e-5, rtol=1e-5)
    made = QuantizedKVCache(scratch.shape, 2, 12, INT8, scratch.dtype)  # built directly: no RoPE tables in it
    scratch(ids[:, :8], made)
    torch.testing.assert_close(scratch.decode_static(ids[:, 8:], torch.tensor(8), made), eager,
                               atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_transformers_cache_matches_the_scratch_cache_and_generates(course_tiny):
    model, tok = course_tiny
    scratch = ScratchLlama(model)
    ids = _text_ids(tok, 24)
    for cfg in (INT8, INT4):
        want = _cached_logits(scratch, ids, 16, cfg)
        cache = quantized_cache(model, cfg)
        kw = cache_kwargs(model, cfg)
        name = next(k for k in kw if k != "use_cache")
        got = [model(input_ids=ids[:, :16], **{name: cache}, use_cache=True).logits]
        got += [model(input_ids=ids[:, i:i + 1], **{name: cache}, use_cache=True).logits for i in range(16, 24)]
        torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-4, rtol=1e-4)
        assert cache.get_seq_length() == 24
        assert cache.nbytes() == kv_bytes_per_token(model.config, cfg) * 24
    # int8 decodes course-tiny's greedy answer unchanged, through both loops
    plain = generate_kv_cache(model, ids, 12)
    assert torch.equal(generate_kv_cache(model, ids, 12, kv_quant=INT8), plain)
    hf = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                        do_sample=False, pad_token_id=0, **cache_kwargs(model, INT8))
    assert torch.equal(hf[:, ids.shape[1]:], plain)
    assert cache_kwargs(model, None) == {}


def test_transformers_layer_reorders_its_quantized_states():
    """Beam search reorders the batch: the stored codes move with it (the float ``keys`` stay empty here)."""
    layer = quantized_cache(make_tiny("llama"), INT8).layers[0]
    k = torch.randn(2, 2, 3, 16, generator=torch.Generator().manual_seed(2))
    layer.update(k, -k)
    layer.reorder_cache(torch.tensor([1, 0]))
    keys, values = layer.update(k[:, :, :1], -k[:, :, :1])
    torch.testing.assert_close(keys[:, :, :3], k.flip(0), atol=0.02, rtol=0)
    torch.testing.assert_close(values[:, :, :3], -k.flip(0), atol=0.02, rtol=0)
    layer.batch_repeat_interleave(2)
    assert layer._quantized_keys.shape == (4, 2, 4, 16)


@torch.inference_mode()
def test_paged_cache_round_trip_matches_the_static_quantized_cache():
    model = make_tiny("llama", vocab=64)
    scratch = ScratchLlama(model)
    paged = PagedKVCache(scratch.shape, num_blocks=16, block_size=4, dtype=torch.float32, device="cpu",
                         prefix_cache=True, kv_quant=INT8)
    plain = PagedKVCache(scratch.shape, num_blocks=16, block_size=4, dtype=torch.float32, device="cpu")
    assert paged.bytes_per_block == kv_bytes_per_token(scratch.shape, INT8) * 4 < plain.bytes_per_block / 3
    system = list(range(10, 19))
    a, b = system + [1, 2, 3], system + [5, 6]
    for sid, seq in ((0, a), (1, b)):
        done = paged.add(sid, tuple(seq))
        positions, key_mask = paged.begin([sid], len(seq) - done)
        got = scratch(torch.tensor([seq[done:]]), paged, positions, key_mask, last_only=True)[:, -1]
        paged.commit([sid], [seq[done:]])
        want = _cached_logits(scratch, torch.tensor([seq]), len(seq), INT8)[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert paged.alloc.hits == 2  # b reused a's two full system-prompt blocks, stored quantized once
    # one decode step over both rows (right-aligned, different lengths) matches each sequence alone
    positions, key_mask = paged.begin([0, 1], 1)
    got = scratch(torch.tensor([[7], [8]]), paged, positions, key_mask, last_only=True)[:, -1]
    paged.commit([0, 1], [[7], [8]])
    for row, seq in enumerate((a + [7], b + [8])):
        want = _cached_logits(scratch, torch.tensor([seq]), len(seq) - 1, INT8)[:, -1]
        torch.testing.assert_close(got[row], want[0], atol=1e-5, rtol=1e-5)
    paged.free(0)
    paged.free(1)
    assert paged.alloc.used == 0


@torch.inference_mode()
def test_perplexity_through_the_quantized_cache(course_tiny):
    model, tok = course_tiny
    ids = encode_split(tok, "heldout", max_chars=8000)[:600]
    base = perplexity(model, ids, seq_len=128, batch_size=4)
    int8 = perplexity(model, ids, seq_len=128, batch_size=4, kv_quant=INT8)
    int4 = perplexity(model, ids, seq_len=128, batch_size=4, kv_quant=KVQuantConfig(bits=4))
    assert abs(int8 / base - 1) < 0.01 and int4 > int8 and int4 != base


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3), r"bits must be one of \(8, 4\)"),
    (dict(bits=True), "bits must be one of"),
    (dict(bits=8, group_size=0), "group_size must be an int >= 2"),
    (dict(bits=8, group_size=16.0), "group_size must be an int"),
    (dict(bits=4, group_size=7), "group_size must be even for bits=4"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVQuantConfig(**kwargs)


def test_bad_uses_are_refused():
    scratch = ScratchLlama(make_tiny("llama"))  # head_dim 16
    with pytest.raises(ValueError, match=r"group_size=6 does not divide head_dim=16; use one of \[2, 4, 8, 16\]"):
        scratch.new_cache(1, 8, kv_quant=KVQuantConfig(bits=4, group_size=6))
    with pytest.raises(ValueError, match="does not divide head_dim"):
        quantized_cache(make_tiny("llama"), KVQuantConfig(bits=8, group_size=12))
    for bad in (8, "int8"):
        with pytest.raises(ValueError, match="must be a KVQuantConfig"):
            QuantizedKVCache(scratch.shape, 1, 8, bad, torch.float32)
        with pytest.raises(ValueError, match="must be a KVQuantConfig"):
            PagedKVCache(scratch.shape, 4, 4, torch.float32, "cpu", kv_quant=bad)
    q = QuantizedKV.empty((2, 4, 16), INT8)
    with pytest.raises(ValueError, match="leading dimensions"):
        q.index_copy_(-1, torch.tensor([0]), torch.zeros(2, 4, 1))
    with pytest.raises(ValueError, match="budget_bytes"):
        max_batch(scratch.shape, 0, 64, INT8)
    assert isinstance(scratch.new_cache(1, 8), KVCache) and not isinstance(scratch.new_cache(1, 8), QuantizedKVCache)

"""Exercise checks of notebooks 03, 04 and 08: each passes a right answer, names the mistake in a wrong one, and
calls an unfinished stub "not done yet"."""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

from course_lib.exercises import ch03, ch04, ch08
from course_lib.scratch_llama import repeat_kv


def _stub(*args):
    raise NotImplementedError


def _not_done(fb):
    return not fb.passed and not fb.done and "Not done yet" in fb.message


# --- 03: the KV-cache decode step ---------------------------------------------------------------------

def _decode_step(k_cache, v_cache, q, k, v):
    k_cache, v_cache = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)
    s = q @ k_cache.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ v_cache, k_cache, v_cache


def test_ch03_decode_step_right_wrong_and_stub():
    assert ch03.check_decode_step(_decode_step)
    assert _not_done(ch03.check_decode_step(_stub))
    no_append = ch03.check_decode_step(lambda kc, vc, q, k, v: (_decode_step(kc, vc, q, k, v)[0], kc, vc))
    assert not no_append and "did not grow" in no_append.message

    def attend_then_append(kc, vc, q, k, v):
        out = F.scaled_dot_product_attention(q, kc, vc)
        return out, torch.cat([kc, k], 2), torch.cat([vc, v], 2)

    before = ch03.check_decode_step(attend_then_append)
    assert not before and "attend to itself" in before.message

    def causal_single_query(kc, vc, q, k, v):
        kc, vc = torch.cat([kc, k], 2), torch.cat([vc, v], 2)
        return F.scaled_dot_product_attention(q, kc, vc, is_causal=True), kc, vc

    top_left = ch03.check_decode_step(causal_single_query)
    assert not top_left and "top-left" in top_left.message

    def unscaled(kc, vc, q, k, v):
        kc, vc = torch.cat([kc, k], 2), torch.cat([vc, v], 2)
        return torch.softmax(q @ kc.transpose(-1, -2), -1) @ vc, kc, vc

    assert "sqrt(head_dim)" in ch03.check_decode_step(unscaled).message
    transposed = ch03.check_decode_step(
        lambda kc, vc, q, k, v: (q, torch.cat([kc, k], 2).transpose(2, 3), torch.cat([vc, v], 2).transpose(2, 3)))
    assert not transposed and "dim=2" in transposed.message


def test_ch03_repeat_kv_right_wrong_and_stub():
    assert ch03.check_repeat_kv(repeat_kv)
    tiled = ch03.check_repeat_kv(lambda x, n: x.repeat(1, n, 1, 1))
    assert not tiled and "in place" in tiled.message and "0,1,0,1" in tiled.message
    assert "raised" in ch03.check_repeat_kv(lambda x, n: 1 / 0).message
    assert "shape" in ch03.check_repeat_kv(lambda x, n: x).message
    assert _not_done(ch03.check_repeat_kv(_stub))


def _tiled(q, k, v, tile):
    scale = 1 / math.sqrt(q.shape[-1])
    m = torch.full(q.shape[:-1] + (1,), float("-inf"))
    den = torch.zeros_like(m)
    acc = torch.zeros_like(q)
    for j in range(0, k.shape[2], tile):
        s = q @ k[:, :, j:j + tile].transpose(-1, -2) * scale
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        p, fix = torch.exp(s - m_new), torch.exp(m - m_new)
        den = den * fix + p.sum(-1, keepdim=True)
        acc = acc * fix + p @ v[:, :, j:j + tile]
        m = m_new
    return acc / den


def test_ch03_tiled_attention_right_wrong_and_stub():
    assert ch03.check_tiled_attention(_tiled)
    assert _not_done(ch03.check_tiled_attention(_stub))
    no_rescale = ch03.check_tiled_attention(ch03._one_pass_without_rescale)
    assert not no_rescale and "exp(m_old - m_new)" in no_rescale.message

    def no_max(q, k, v, tile):  # exact for small scores, overflows for the large ones
        s = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
        return (s @ v) / s.sum(-1, keepdim=True)

    overflow = ch03.check_tiled_attention(no_max)
    assert not overflow and "running max" in overflow.message

    def unnormalised(q, k, v, tile):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return torch.exp(s - s.amax(-1, keepdim=True)) @ v

    assert "divide the accumulator" in ch03.check_tiled_attention(unnormalised).message
    unscaled = ch03.check_tiled_attention(lambda q, k, v, t: F.scaled_dot_product_attention(q, k, v, scale=1.0))
    assert not unscaled and "sqrt(head_dim)" in unscaled.message


def _kv_bytes(cfg):
    if "kv_lora_rank" in cfg:
        return cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 2
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return cfg["num_hidden_layers"] * 2 * kv * head_dim * 2


def test_ch03_kv_bytes_per_token_right_wrong_and_stub():
    assert ch03.check_kv_bytes_per_token(_kv_bytes)
    assert _not_done(ch03.check_kv_bytes_per_token(_stub))
    k_only = ch03.check_kv_bytes_per_token(lambda c: _kv_bytes(c) / 2)
    assert not k_only and "both K and V" in k_only.message

    def query_heads(c):
        return _kv_bytes({**c, "num_key_value_heads": c["num_attention_heads"]})

    assert "key/value heads" in ch03.check_kv_bytes_per_token(query_heads).message

    def no_head_dim(c):
        return _kv_bytes({k: v for k, v in c.items() if k != "head_dim"})

    assert "use head_dim" in ch03.check_kv_bytes_per_token(no_head_dim).message

    def mla_as_mha(c):
        return _kv_bytes({k: v for k, v in c.items() if k != "kv_lora_rank"})

    assert "latent" in ch03.check_kv_bytes_per_token(mla_as_mha).message
    no_rope = ch03.check_kv_bytes_per_token(lambda c: _kv_bytes({**c, "qk_rope_head_dim": 0}))
    assert "RoPE" in no_rope.message


# --- 04: the timing loop and the interleaved comparison ------------------------------------------------

def _timer(work, sync, clock, warmup, repeat):
    for _ in range(warmup):
        work()
    sync()
    samples = []
    for _ in range(repeat):
        t0 = clock()
        work()
        sync()
        samples.append(clock() - t0)
    return statistics.median(samples)


def test_ch04_timer_right_wrong_and_stub():
    assert ch04.check_timer(_timer)
    assert _not_done(ch04.check_timer(_stub))

    def no_sync(work, sync, clock, warmup, repeat):
        for _ in range(warmup):
            work()
        samples = []
        for _ in range(repeat):
            t0 = clock()
            work()
            samples.append(clock() - t0)
        return statistics.median(samples)

    assert "queue" in ch04.check_timer(no_sync).message
    cold = ch04.check_timer(lambda work, sync, clock, warmup, repeat: _timer(work, sync, clock, 0, repeat))
    assert not cold and "cold" in cold.message

    def mean(work, sync, clock, warmup, repeat):
        for _ in range(warmup):
            work()
        sync()
        samples = []
        for _ in range(repeat):
            t0 = clock()
            work()
            sync()
            samples.append(clock() - t0)
        return statistics.fmean(samples)

    assert "median" in ch04.check_timer(mean).message and "mean" in ch04.check_timer(mean).message
    once = ch04.check_timer(lambda work, sync, clock, warmup, repeat: _timer(work, sync, clock, 0, 1))
    assert not once and "1 times" in once.message
    import time

    own_clock = ch04.check_timer(lambda work, sync, clock, warmup, repeat: _timer(work, sync, time.perf_counter,
                                                                                    warmup, repeat))
    assert not own_clock and "`clock` argument" in own_clock.message
    ms = ch04.check_timer(lambda *a: _timer(*a) * 1e3)
    assert not ms and "milliseconds" in ms.message


def _interleaved(fns, clock, rounds):
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            samples[name].append(clock() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def test_ch04_compare_right_wrong_and_stub():
    assert ch04.check_compare(_interleaved)
    assert _not_done(ch04.check_compare(_stub))

    def one_after_the_other(fns, clock, rounds):
        return {name: _interleaved({name: fn}, clock, rounds)[name] for name, fn in fns.items()}

    seq = ch04.check_compare(one_after_the_other)
    assert not seq and "Interleave" in seq.message
    assert "dict" in ch04.check_compare(lambda fns, clock, rounds: 1.0).message
    import time

    own_clock = ch04.check_compare(lambda fns, c, rounds: _interleaved(fns, time.perf_counter, rounds))
    assert not own_clock and "`clock` argument" in own_clock.message
    too_few = ch04.check_compare(lambda fns, clock, rounds: _interleaved(fns, clock, 1))
    assert not too_few and "at least" in too_few.message


def test_ch04_simulated_device_queues_work_until_sync():
    dev = ch04.SimulatedDevice([0.5, 0.25])
    dev.work()
    assert dev.clock() == ch04.LAUNCH_S  # queued, not done
    dev.sync()
    assert math.isclose(dev.clock(), 0.5 + ch04.LAUNCH_S)


# --- 08: the article's ratio, the roofline by hand -----------------------------------------------------

def test_ch08_article_ratio_and_the_default_is_not_done():
    assert ch08.check_article_ratio(1 / 16)
    assert "printed" in ch08.check_article_ratio(0.25).message
    assert "claim" in ch08.check_article_ratio(5).message
    assert "upside down" in ch08.check_article_ratio(16).message
    assert _not_done(ch08.check_article_ratio(None))
    assert not ch08.check_article_ratio("fast").passed


def _decode_time(dims, hw, batch, context, weight_bits, dtype):
    bytes_ = dims.decode_params * weight_bits / 8 + batch * dims.kv_bytes_per_token(16) * context
    memory_s = bytes_ / (hw.bandwidth_gbs * 1e9)
    compute_s = 2 * dims.decode_params * batch / (hw.peak(dtype) * 1e9)
    return max(memory_s, compute_s), "memory" if memory_s >= compute_s else "compute"


def test_ch08_cases_cover_both_bounds():
    from course_lib.models import speed_lab_config
    from course_lib.roofline import ModelDims, decode_cost, predict

    bounds = {predict(decode_cost(ModelDims.from_config(speed_lab_config(n)), b, c, w, 16), hw, dt).bound
              for n, hw, b, c, w, dt in ch08._cases()}
    assert bounds == {"memory", "compute"}


def test_ch08_decode_time_right_wrong_and_stub():
    assert ch08.check_decode_time(_decode_time)
    assert _not_done(ch08.check_decode_time(_stub))

    def per_sequence_weights(dims, hw, batch, context, weight_bits, dtype):
        s, _ = _decode_time(dims, hw, 1, context, weight_bits, dtype)
        return _decode_time(dims, hw, batch, context, weight_bits, dtype) if batch == 1 else (s * batch, "memory")

    def no_kv(dims, hw, batch, context, weight_bits, dtype):
        return _decode_time(dims, hw, batch, 0, weight_bits, dtype)

    def summed(dims, hw, batch, context, weight_bits, dtype):
        bytes_ = dims.decode_params * weight_bits / 8 + batch * dims.kv_bytes_per_token(16) * context
        t = bytes_ / (hw.bandwidth_gbs * 1e9) + 2 * dims.decode_params * batch / (hw.peak(dtype) * 1e9)
        return t, "memory"

    assert "KV cache" in ch08.check_decode_time(no_kv).message
    assert "larger" in ch08.check_decode_time(summed).message
    assert not ch08.check_decode_time(per_sequence_weights)
    wrong_bound = ch08.check_decode_time(lambda *a: (_decode_time(*a)[0], "memory"))
    assert not wrong_bound and "bound" in wrong_bound.message and "compute" in wrong_bound.message
    always_compute = ch08.check_decode_time(lambda *a: (_decode_time(*a)[0], "compute"))
    assert not always_compute, "a fixed answer must not pass"
    bits = ch08.check_decode_time(lambda d, hw, b, c, w, dt: _decode_time(d, hw, b, c, w * 8, dt))
    assert not bits and "b / 8" in bits.message


# --- 08: bytes per token of a quantized KV cache ----------------------------------------------------------

def _qkv_bytes(dims, bits, group_size, *, k_and_v=2, scale_bytes=2, minimum=True, scales=True, bits_per_byte=8):
    codes = dims.head_dim * bits // bits_per_byte
    if bits == 16:
        return dims.layers * k_and_v * dims.kv_heads * codes
    groups = dims.head_dim // (group_size or dims.head_dim)
    meta = groups * scale_bytes * (2 if bits == 4 and minimum else 1) if scales else 0
    return dims.layers * k_and_v * dims.kv_heads * (codes + meta)


def test_ch08_kv_bytes_right_wrong_and_stub():
    assert ch08.check_kv_bytes(_qkv_bytes)
    assert _not_done(ch08.check_kv_bytes(_stub))
    assert "*and* a value" in ch08.check_kv_bytes(lambda d, b, g: _qkv_bytes(d, b, g, k_and_v=1)).message
    assert "float16 scale" in ch08.check_kv_bytes(lambda d, b, g: _qkv_bytes(d, b, g, scales=False)).message
    assert "not 4" in ch08.check_kv_bytes(lambda d, b, g: _qkv_bytes(d, b, g, scale_bytes=4)).message
    assert "minimum" in ch08.check_kv_bytes(lambda d, b, g: _qkv_bytes(d, b, g, minimum=False)).message
    assert "b / 8" in ch08.check_kv_bytes(lambda d, b, g: _qkv_bytes(d, b, g, bits_per_byte=1)).message
    assert not ch08.check_kv_bytes(lambda d, b, g: 1000), "a fixed answer must not pass"
    assert not ch08.check_kv_bytes(lambda d, b, g: True)


def test_ch08_decode_time_names_the_kv_cache_and_min_mistakes():
    def kv_once(dims, hw, batch, context, weight_bits, dtype):  # the cache counted once, as if shared
        bytes_ = dims.decode_params * weight_bits / 8 + dims.kv_bytes_per_token(16) * context
        memory_s = bytes_ / (hw.bandwidth_gbs * 1e9)
        compute_s = 2 * dims.decode_params * batch / (hw.peak(dtype) * 1e9)
        return max(memory_s, compute_s), "memory" if memory_s >= compute_s else "compute"

    def kv_at_weight_bits(dims, hw, batch, context, weight_bits, dtype):  # a 4-bit model's cache taken as 4-bit
        kv = batch * dims.kv_bytes_per_token(weight_bits) * context
        memory_s = (dims.decode_params * weight_bits / 8 + kv) / (hw.bandwidth_gbs * 1e9)
        compute_s = 2 * dims.decode_params * batch / (hw.peak(dtype) * 1e9)
        return max(memory_s, compute_s), "memory" if memory_s >= compute_s else "compute"

    def smaller(dims, hw, batch, context, weight_bits, dtype):
        bytes_ = dims.decode_params * weight_bits / 8 + batch * dims.kv_bytes_per_token(16) * context
        memory_s, compute_s = bytes_ / (hw.bandwidth_gbs * 1e9), 2 * dims.decode_params * batch / (hw.peak(dtype) * 1e9)
        return min(memory_s, compute_s), "memory" if memory_s <= compute_s else "compute"

    once = ch08.check_decode_time(kv_once)
    assert not once and "its own KV cache" in once.message
    low = ch08.check_decode_time(kv_at_weight_bits)
    assert not low and "stays 16-bit" in low.message
    small = ch08.check_decode_time(smaller)
    assert not small and "slower roof" in small.message

"""Exercises of notebook 03 (algorithms): a KV-cache decode step, GQA, tiled attention, KV bytes per token."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kv_memory import PUBLISHED, kv_layout
from ..scratch_llama import repeat_kv
from . import Feedback, attempt, checked, fail, ok


def _full_causal(q, k, v):
    """The reference: attention of the whole sequence at once, recomputed from scratch (no cache)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@checked
def check_decode_step(fn: Callable) -> Feedback:
    """``fn(k_cache, v_cache, q, k, v) -> (out, k_cache, v_cache)``: append one token's K/V, attend over the cache.

    Run token by token from a short prompt, every output must equal the full causal recompute's row for
    that token, and the returned caches must hold every key and value so far.
    """
    g = torch.Generator().manual_seed(3)
    for b, h, d, prompt, steps in ((1, 2, 8, 3, 4), (2, 3, 16, 1, 5), (1, 4, 4, 0, 3)):
        n = prompt + steps
        q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
        want = _full_causal(q, k, v)
        kc, vc = k[:, :, :prompt].clone(), v[:, :, :prompt].clone()  # the cache after the prompt's prefill
        for t in range(prompt, n):
            sl = slice(t, t + 1)
            got = attempt(fn, kc, vc, q[:, :, sl], k[:, :, sl], v[:, :, sl])
            if not isinstance(got, (tuple, list)) or len(got) != 3:
                return fail("return three tensors: (out, k_cache, v_cache), the caches with the new token appended")
            out, kc2, vc2 = got
            if not all(isinstance(x, torch.Tensor) for x in got):
                return fail("return three tensors: (out, k_cache, v_cache)")
            if kc2.shape != (b, h, t + 1, d) or vc2.shape != (b, h, t + 1, d):
                if kc2.shape == kc.shape:
                    return fail("the cache did not grow: append the new k and v to the cache "
                                "(torch.cat([k_cache, k], dim=2), the token axis) and return the grown caches")
                return fail(f"after {t + 1} tokens the caches should be (batch, heads, tokens, head_dim) = "
                            f"{(b, h, t + 1, d)}, got {tuple(kc2.shape)}: append along dim=2, the token axis")
            if not (torch.equal(kc2, k[:, :, :t + 1]) and torch.equal(vc2, v[:, :, :t + 1])):
                return fail("the returned caches do not hold the keys/values in the order the tokens came: "
                            "old cache first, the new token last (and K in k_cache, V in v_cache)")
            row = want[:, :, sl]
            if out.shape != row.shape:
                return fail(f"out should have one row per new token, shape {tuple(row.shape)}; got {tuple(out.shape)}")
            if not torch.allclose(out, row, atol=1e-5):
                if t > 0 and torch.allclose(out, F.scaled_dot_product_attention(q[:, :, sl], kc, vc), atol=1e-5):
                    return fail("the new token did not attend to itself: append its k and v first, then attend "
                                "over the whole cache (old tokens + the new one)")
                if torch.allclose(out, v[:, :, :1], atol=1e-5):
                    return fail("only the first cached token was attended. Careful with is_causal=True for one "
                                "query: torch aligns that mask to the top-left corner, so the query sees key 0 only. "
                                "A new token may see the whole cache: no mask is needed in a decode step")
                s = q[:, :, sl] @ kc2.transpose(-1, -2)
                if torch.allclose(out, torch.softmax(s, -1) @ vc2, atol=1e-5):
                    return fail(f"divide the scores by sqrt(head_dim) = sqrt({d}) before the softmax")
                return fail(f"at token {t} (cache of {t + 1}) the output differs from the full recompute by "
                            f"{(out - row).abs().max().item():.3g}: softmax(q k_cache^T / sqrt(d)) v_cache")
            kc, vc = kc2, vc2
    return ok("Correct: step by step, your cached decode gives exactly what recomputing the whole sequence gives, "
              "while each step only computes one token's q, k and v.")


@checked
def check_repeat_kv(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Feedback:
    """``fn(x, n_rep)`` must turn (B, n_kv, S, D) into (B, n_kv * n_rep, S, D), each KV head repeated in place."""
    g = torch.Generator().manual_seed(4)
    for shape, n_rep in (((2, 2, 3, 4), 3), ((1, 3, 5, 2), 2), ((1, 4, 2, 8), 1), ((2, 1, 4, 4), 4)):
        x = torch.randn(shape, generator=g)
        got = attempt(fn, x.clone(), n_rep)
        want = repeat_kv(x, n_rep)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return fail(f"for x of shape {shape} and n_rep={n_rep} expected shape {tuple(want.shape)}, got "
                        f"{getattr(got, 'shape', type(got).__name__)}")
        if torch.equal(got, want):
            continue
        if torch.equal(got, x.repeat(1, n_rep, 1, 1)):
            order = ",".join(str(i) for i in list(range(shape[1])) * n_rep)
            return fail(f"heads come out in the order {order}. Query heads 0..{n_rep - 1} share KV head 0, so "
                        "each head must repeat in place (0,0,..,1,1,..): expand a new axis after the head axis")
        return fail(f"right shape, wrong values for n_rep={n_rep}: each KV head should appear n_rep times in a row")
    return ok("Correct: each KV head now serves its group of query heads (and n_rep=1 leaves x as it is).")


def _tile_cases():
    g = torch.Generator().manual_seed(5)
    # (batch, heads, queries, keys, head_dim, tile, score scale): keys not a multiple of the tile, one tile,
    # tile 1, and large scores where exp() overflows unless the running max is subtracted
    for b, h, t, s, d, tile, big in ((1, 2, 4, 10, 8, 4, 1.0), (2, 3, 5, 16, 16, 16, 1.0), (1, 2, 3, 7, 8, 1, 1.0),
                                     (1, 1, 6, 33, 8, 8, 1.0), (1, 2, 4, 12, 8, 5, 40.0)):
        q = torch.randn(b, h, t, d, generator=g) * big
        k = torch.randn(b, h, s, d, generator=g) * big
        v = torch.randn(b, h, s, d, generator=g)
        yield q, k, v, tile


def _one_pass_without_rescale(q, k, v, tile):
    """Tiles combined with the max of each tile, never rescaling what was summed before (the classic slip)."""
    scale = 1 / math.sqrt(q.shape[-1])
    acc = torch.zeros_like(q)
    den = torch.zeros(q.shape[:-1] + (1,))
    for j in range(0, k.shape[2], tile):
        s = q @ k[:, :, j:j + tile].transpose(-1, -2) * scale
        p = torch.exp(s - s.amax(-1, keepdim=True))
        acc, den = acc + p @ v[:, :, j:j + tile], den + p.sum(-1, keepdim=True)
    return acc / den


@checked
def check_tiled_attention(fn: Callable) -> Feedback:
    """``fn(q, k, v, tile) -> out``: attention over keys in tiles of ``tile`` with an online softmax, vs SDPA."""
    for q, k, v, tile in _tile_cases():
        got = attempt(fn, q.clone(), k.clone(), v.clone(), tile)
        want = F.scaled_dot_product_attention(q, k, v)
        desc = f"{k.shape[2]} keys in tiles of {tile}"
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return fail(f"the output has q's shape {tuple(q.shape)}; got {getattr(got, 'shape', type(got).__name__)}")
        if torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            continue
        if not torch.isfinite(got).all():
            return fail(f"inf/NaN with large scores ({desc}): exp(score) overflows. Keep a running max m of the "
                        "scores and take exp(score - m), as softmax does")
        if torch.allclose(got, _one_pass_without_rescale(q, k, v, tile), atol=1e-4, rtol=1e-4):
            return fail(f"the tiles are not combined right ({desc}): when a new tile raises the running max from "
                        "m_old to m_new, rescale the running sum and the accumulator by exp(m_old - m_new) first")
        if torch.allclose(got, F.scaled_dot_product_attention(q, k, v, scale=1.0), atol=1e-4, rtol=1e-4):
            return fail(f"divide the scores by sqrt(head_dim) = sqrt({q.shape[-1]})")
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if torch.allclose(got, torch.exp(scores - scores.amax(-1, keepdim=True)) @ v, atol=1e-4, rtol=1e-4):
            return fail(f"almost ({desc}): at the end divide the accumulator by the running sum of exp(score - m)")
        return fail(f"wrong values for {desc}, max difference {(got - want).abs().max().item():.3g} from "
                    "scaled_dot_product_attention. Per tile: scores, new max, rescale old sums, add this tile")
    return ok("Correct: tile by tile, never holding a whole row of scores, you get exactly SDPA's answer. That "
              "running max and rescaled sum is the heart of FlashAttention.")


# The configs the KV-bytes check runs on: each catches a different slip (Gemma-2's head_dim is not
# hidden_size / heads; DeepSeek-V3 caches a latent; Falcon's multi_query flag is trivia and left out).
KV_CASES = ("Llama-2-7B", "Llama-3-8B", "SmolLM2-135M", "Gemma-2-9B", "DeepSeek-V3")


@checked
def check_kv_bytes_per_token(fn: Callable[[dict], float]) -> Feedback:
    """``fn(config) -> bytes`` one token adds to a bf16 KV cache, from a dict of config.json fields."""
    for name in KV_CASES:
        cfg = dict(PUBLISHED[name].config)
        want = kv_layout(cfg).bytes_per_token(16)
        got = attempt(fn, dict(cfg))
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return fail(f"return a number of bytes, got {type(got).__name__}")
        if math.isclose(got, want, rel_tol=1e-9):
            continue
        layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads", heads)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        if "kv_lora_rank" in cfg:
            latent = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
            if math.isclose(got, want * cfg["kv_lora_rank"] / latent):
                return fail(f"{name}: MLA also caches the decoupled RoPE key, qk_rope_head_dim = "
                            f"{cfg['qk_rope_head_dim']} values per layer, beside the kv_lora_rank latent")
            return fail(f"{name} uses multi-head latent attention (it has kv_lora_rank): each layer caches one "
                        f"latent of kv_lora_rank + qk_rope_head_dim = {latent} values per token, shared by all "
                        f"{heads} heads (no separate K and V); got {got:,.0f}, expected {want:,.0f} bytes")
        if math.isclose(got, want / 2):
            return fail(f"{name}: half the expected {want:,.0f} bytes. Count both K and V, and 2 bytes per bf16 value")
        if math.isclose(got, want / 2 / 2):
            return fail(f"{name}: a quarter of the expected bytes: count K *and* V, and 2 bytes per bf16 value")
        if math.isclose(got, want * heads / kv):
            return fail(f"{name}: you counted all {heads} query heads; with GQA only the {kv} key/value heads "
                        "are cached (num_key_value_heads)")
        if math.isclose(got, want / layers):
            return fail(f"{name}: that is one layer's worth; every one of the {layers} layers has its own cache")
        if "head_dim" in cfg and math.isclose(got, want * (cfg["hidden_size"] // heads) / head_dim):
            return fail(f"{name} states head_dim = {head_dim}, which is not hidden_size / heads = "
                        f"{cfg['hidden_size'] // heads}: use head_dim when the config gives it")
        return fail(f"{name}: got {got:,.0f} bytes, expected {want:,.0f} = layers x 2 (K, V) x KV heads x head_dim "
                    "x 2 bytes")
    return ok("Correct: the same three fields decide the cache of every dense model, and MLA replaces them with "
              "one latent. Compare DeepSeek-V3's bytes per token with Llama-2-7B's: a 671B model caches less "
              "per token than a 7B one.")

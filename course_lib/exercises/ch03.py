"""Exercises of notebook 03 (algorithm optimization): the KV cache by hand."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import Feedback, fail, ok


def check_kv_bytes_per_token(answer: float, config, bits: int = 16) -> Feedback:
    """Bytes the KV cache grows by per token: layers x 2 (K and V) x kv_heads x head_dim x bits/8."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads
    want = config.num_hidden_layers * 2 * kv * head_dim * bits / 8
    if abs(answer - want) < 0.5:
        return ok(f"Correct: {want:.0f} bytes per token ({want / 1024:.1f} KiB).")
    if abs(answer - want * config.num_attention_heads / kv) < 0.5:
        return fail("You used the number of *query* heads. With grouped-query attention only "
                    f"num_key_value_heads = {kv} heads of K and V are stored.")
    if abs(answer - want / 2) < 0.5:
        return fail("Half of the right answer: the cache keeps both K *and* V.")
    if abs(answer - want * 8 / bits) < 0.5:
        return fail(f"That is in bits or elements, not bytes: multiply elements by {bits}/8.")
    if abs(answer - want / config.num_hidden_layers) < 0.5:
        return fail("That is one layer's worth: every layer has its own cache.")
    return fail(f"Not quite (you gave {answer:g}). Count: layers x 2 x num_key_value_heads x head_dim x bytes.")


def check_repeat_kv(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Feedback:
    """``fn(x, n_rep)`` must turn (B, n_kv, S, D) into (B, n_kv * n_rep, S, D), each KV head repeated in place."""
    from ..kv_cache import repeat_kv

    x = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4)
    try:
        got = fn(x, 3)
    except Exception as e:  # the learner's code: report any error in words
        return fail(f"Your function raised {type(e).__name__}: {e}")
    want = repeat_kv(x, 3)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return fail(f"Expected shape {tuple(want.shape)}, got {getattr(got, 'shape', type(got).__name__)}.")
    if torch.equal(got, x.repeat(1, 3, 1, 1)):
        return fail("Heads come out in the order 0,1,0,1,0,1. Query heads 0-2 share KV head 0, so the "
                    "order must be 0,0,0,1,1,1: repeat each head in place (expand a new axis after the head axis).")
    if not torch.equal(got, want):
        return fail("Right shape, wrong values: each KV head should appear n_rep times in a row.")
    if not torch.equal(fn(x, 1), x):
        return fail("With n_rep=1 the tensor should come back unchanged.")
    return ok("Correct: each KV head now serves its group of query heads.")


def check_cache_speedup(no_cache_tok_s: float, kv_cache_tok_s: float) -> Feedback:
    """The learner measured both loops: the cache must win, and they should say by how much."""
    if no_cache_tok_s <= 0 or kv_cache_tok_s <= 0:
        return fail("Both speeds must be positive tokens per second; did the timing cell run?")
    ratio = kv_cache_tok_s / no_cache_tok_s
    if ratio < 1:
        return fail(f"The cache came out slower ({ratio:.2f}x). Check that the cached loop feeds only the "
                    "*new* token after the prefill, not the whole sequence.")
    return ok(f"The cache is {ratio:.1f}x faster here; the gap grows with the number of new tokens.")

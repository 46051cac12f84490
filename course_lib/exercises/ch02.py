"""Chapter 02 exercises: count a Llama's parameters from its config; causal attention by hand."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from . import Feedback, attempt, checked, fail, ok


def llama_configs():
    """A few Llama-family configs of varied shape: grouped-query attention, explicit head_dim, tied or not."""
    shapes = [  # hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied
        (256, 768, 6, 8, 2, 32, 4096, True),  # course-tiny's shape
        (576, 1536, 3, 9, 3, 64, 1000, False),
        (320, 1000, 2, 5, 5, 64, 777, True),  # plain multi-head attention
        (512, 1408, 4, 8, 4, 96, 3000, False),  # head_dim * heads != hidden
    ]
    return [LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=a,
                        num_key_value_heads=kv, head_dim=hd, vocab_size=v, tie_word_embeddings=tied)
            for h, i, L, a, kv, hd, v, tied in shapes]


def true_parameter_count(cfg) -> int:
    """The count of the real thing: build the model on the meta device (shapes, no memory) and count."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def _formula(cfg, *, kv_as_q=False, head_dim_from_hidden=False, mlp_mats=3, norms=True, head="as config") -> int:
    """The count with one classic mistake switched on (used to name the mistake)."""
    h, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = h // cfg.num_attention_heads if head_dim_from_hidden else cfg.head_dim
    kv = cfg.num_attention_heads if kv_as_q else cfg.num_key_value_heads
    attn = 2 * h * cfg.num_attention_heads * hd + 2 * h * kv * hd
    per_layer = attn + mlp_mats * h * i + (2 * h if norms else 0)
    has_head = {"as config": not cfg.tie_word_embeddings, "always": True, "never": False}[head]
    return v * h + L * per_layer + (h if norms else 0) + (v * h if has_head else 0)


@checked
def check_parameter_count(fn: Callable) -> Feedback:
    """``fn(config) -> int``: the parameters of a Llama-family model (no biases), from its config alone."""
    for cfg in llama_configs():
        got = attempt(fn, cfg)
        if isinstance(got, bool) or not isinstance(got, (int, float)) or got != got:
            return fail(f"return the count as a number, got {got!r}")
        want = true_parameter_count(cfg)
        if got == want:
            continue
        shape = (f"(hidden {cfg.hidden_size}, {cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} KV "
                 f"heads of {cfg.head_dim}, tied head: {cfg.tie_word_embeddings})")
        if got == _formula(cfg, head="always") and cfg.tie_word_embeddings:
            return fail(f"this config ties the output head to the embedding {shape}: the same vocab x hidden matrix "
                        "serves both, count it once")
        if got == _formula(cfg, head="never") and not cfg.tie_word_embeddings:
            return fail(f"this config has tie_word_embeddings=False {shape}: the output head is its own "
                        "vocab x hidden matrix, on top of the embedding")
        if got == _formula(cfg, kv_as_q=True):
            return fail(f"k_proj and v_proj have num_key_value_heads x head_dim outputs, not one per query head "
                        f"{shape}: grouped-query attention shares each K/V head among several query heads")
        if got == _formula(cfg, head_dim_from_hidden=True):
            return fail(f"use config.head_dim ({cfg.head_dim}); here it is not hidden_size / num_attention_heads "
                        f"({cfg.hidden_size // cfg.num_attention_heads})")
        if got == _formula(cfg, mlp_mats=2):
            return fail("the SwiGLU MLP has three matrices (gate_proj, up_proj, down_proj), each hidden x intermediate")
        if got == _formula(cfg, norms=False):
            return fail("close: add the RMSNorm weights, two vectors of hidden_size per layer and one final norm")
        return fail(f"expected {want:,} parameters for {shape}, {cfg.num_hidden_layers} layers, MLP "
                    f"{cfg.intermediate_size}, vocab {cfg.vocab_size}; got {got:,.0f} ({got - want:+,.0f})")
    return ok("Correct on every config: embedding + per layer (q, k, v, o, gate, up, down, 2 norms) + final norm, "
              "+ a separate head only when it is not tied.")


def _attention_cases():
    g = torch.Generator().manual_seed(2)
    for b, h, t, d in ((1, 2, 5, 8), (2, 3, 7, 16), (1, 1, 1, 4), (2, 4, 12, 32)):
        yield tuple(torch.randn(b, h, t, d, generator=g) for _ in range(3))


def _attend(q, k, v, mask=None, scale=True, dim=-1):
    s = q @ k.transpose(-1, -2)
    if scale:
        s = s / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=dim).nan_to_num(0.0) @ v


@checked
def check_causal_attention(fn: Callable) -> Feedback:
    """``fn(q, k, v) -> out``: softmax(q k^T / sqrt(d), future masked) v, checked against torch's SDPA."""
    for q, k, v in _attention_cases():
        got = attempt(fn, q.clone(), k.clone(), v.clone())
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return fail(f"for q, k, v of shape {tuple(q.shape)} (batch, heads, tokens, head_dim) the output has the "
                        f"same shape; got {getattr(got, 'shape', type(got).__name__)}")
        if torch.allclose(got, want, atol=1e-5):
            continue
        t = q.shape[2]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        if torch.allclose(got, _attend(q, k, v), atol=1e-5):
            return fail("every token attends to the tokens after it too: before the softmax, set the scores of "
                        "future keys (column j > row i) to -inf")
        if torch.allclose(got, _attend(q, k, v, mask=causal.T), atol=1e-5):
            return fail("the mask is flipped: you hid the past and kept the future. Token i may see keys 0..i "
                        "(a lower-triangular mask, torch.tril)")
        if torch.allclose(got, _attend(q, k, v, mask=causal, scale=False), atol=1e-5):
            return fail(f"divide the scores by sqrt(head_dim) = sqrt({q.shape[-1]}) before the softmax")
        if torch.allclose(got, _attend(q, k, v, mask=causal, dim=-2), atol=1e-5):
            return fail("the softmax runs over the wrong axis: each query's weights over the keys (the last axis, "
                        "dim=-1) must sum to 1")
        err = (got - want).abs().max().item()
        return fail(f"right shape, wrong values (max difference {err:.3g} from scaled_dot_product_attention for "
                    f"shape {tuple(q.shape)}): scores = q @ k^T / sqrt(d), mask the future with -inf, softmax "
                    "over the keys, then @ v")
    return ok("Correct: your attention matches torch.nn.functional.scaled_dot_product_attention(is_causal=True).")

"""Exercises of notebook 08 (math model): the article's formula, a roofline prediction, a quantized KV cache's bytes."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..kv_quant import KVQuantConfig, kv_bytes_per_token
from ..models import speed_lab_config
from ..roofline import VENDOR_PRESETS, Hardware, ModelDims, decode_cost, predict
from . import Feedback, attempt, checked, fail, not_done, ok


def check_article_ratio(answer) -> Feedback:
    """V'/V by the article's own formula with its own 'after' values: (1/2)(1/4)/2 = 1/16."""
    if answer is None or answer == "?" or answer is ...:
        return not_done("`my_ratio`")
    try:
        answer = float(answer)
    except (TypeError, ValueError):
        return fail(f"give V'/V as a number, not {answer!r}")
    if abs(answer - 1 / 16) < 1e-3:
        return ok("Correct: the formula itself says the 'optimized' model is 16x *slower*, "
                  "neither the 4x the article prints nor the 5x it claims.")
    if abs(answer - 0.25) < 1e-3:
        return fail("0.25 is what the article's *printed* numbers give (2.5e12 / 1e13). Recompute "
                    "V' = P' C' / H' yourself from P/2, C/4 and 2H.")
    if abs(answer - 4) < 1e-3 or abs(answer - 5) < 1e-3:
        return fail("That is the article's claim. Compute V'/V from the formula: halving P halves V, "
                    "dividing C by 4 divides V by 4, doubling H halves V.")
    if abs(answer - 16) < 1e-3:
        return fail("That is V/V', upside down: the formula's V' is the smaller one.")
    return fail(f"Not quite (you gave {answer:g}). Multiply the three factors: P' / P, C' / C and H / H'.")


def _cases():
    """(model, hardware, batch, context, weight bits, compute dtype): memory-bound and compute-bound steps."""
    laptop = Hardware("a laptop CPU (made up)", 60.0, {"fp32": 300.0, "bf16": 600.0}, "an example")
    h100 = VENDOR_PRESETS["NVIDIA H100 SXM (vendor spec)"]
    t4 = VENDOR_PRESETS["NVIDIA T4 (vendor spec)"]
    return [("smollm2-135m", laptop, 1, 512, 16, "bf16"),
            ("qwen2.5-0.5b", h100, 4, 4096, 16, "bf16"),  # the KV cache is a big share of the bytes
            ("llama-3.2-1b", t4, 8, 1024, 4, "fp16"),
            ("smollm2-360m", laptop, 64, 32, 16, "bf16"),  # a big batch: compute-bound on this slow CPU
            ("smollm2-135m", h100, 1, 8192, 8, "bf16")]


def _simple(dims, hw, batch, context, weight_bits, dtype, *, weights_per_seq=False, kv=True, bits_as_bytes=False,
            flops_per_seq=False, combine=max, kv_once=False, kv_at_weight_bits=False):
    """The counting the exercise asks for, with one classic mistake switched on (used to name it)."""
    per_weight = weight_bits if bits_as_bytes else weight_bits / 8
    weights = dims.decode_params * per_weight * (batch if weights_per_seq else 1)
    per_token = dims.kv_bytes_per_token(weight_bits if kv_at_weight_bits else 16)
    kv_bytes = (1 if kv_once else batch) * per_token * context if kv else 0.0
    flops = 2 * dims.decode_params * (1 if flops_per_seq else batch)
    memory_s = (weights + kv_bytes) / (hw.bandwidth_gbs * 1e9)
    compute_s = flops / (hw.peak(dtype) * 1e9)
    return combine(memory_s, compute_s), memory_s, compute_s


@checked
def check_decode_time(fn: Callable) -> Feedback:
    """``fn(dims, hw, batch, context, weight_bits, dtype) -> (seconds, bound)`` for one decode step.

    Checked against the library's roofline (``predict(decode_cost(...))``, which also counts the activations and
    attention's FLOPs, a few per cent in these cases) within 5 %, and the bound must match.
    """
    for name, hw, batch, context, bits, dtype in _cases():
        dims = ModelDims.from_config(speed_lab_config(name))
        got = attempt(fn, dims, hw, batch, context, bits, dtype)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return fail(f"return (seconds, bound) with bound 'memory' or 'compute'; got {got!r}")
        seconds, bound = got
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            return fail(f"seconds must be a positive number, got {seconds!r}")
        p = predict(decode_cost(dims, batch, context, bits, 16), hw, dtype)
        want = max(p.memory_s, p.compute_s)
        case = f"{name} on {hw.name}, batch {batch}, context {context}, {bits}-bit weights"
        if not math.isclose(seconds, want, rel_tol=0.05):
            variants = [
                (dict(weights_per_seq=True), "the weights are read once per step and shared by the whole batch: "
                                             "do not multiply the weight bytes by the batch"),
                (dict(kv=False), "the KV cache is read too: every sequence reads the keys and values of its "
                                 "whole context each step (batch x kv_bytes_per_token x context)"),
                (dict(bits_as_bytes=True), "bits, not bytes: a weight of b bits takes b / 8 bytes"),
                (dict(flops_per_seq=True), "the FLOPs grow with the batch: 2 per weight for *each* sequence"),
                (dict(combine=lambda a, b: a + b), "the memory traffic and the arithmetic overlap: the step takes "
                                                   "the *larger* of the two times, not their sum"),
                (dict(combine=min), "the step takes the *larger* of the two times: the slower roof sets the pace"),
                (dict(kv_once=True), "every sequence of the batch reads its own KV cache: multiply the cache bytes "
                                     "by the batch (the weights, not the cache, are shared)"),
                (dict(kv_at_weight_bits=True), "the KV cache stays 16-bit when the weights are quantized: "
                                               "dims.kv_bytes_per_token(16), whatever weight_bits is"),
            ]
            for mistake, hint in variants:
                if math.isclose(seconds, _simple(dims, hw, batch, context, bits, dtype, **mistake)[0], rel_tol=1e-3):
                    return fail(f"{case}: {hint}")
            if math.isclose(seconds, 1 / want, rel_tol=0.05) or math.isclose(seconds, batch / want, rel_tol=0.05):
                return fail(f"{case}: that is a rate (tokens/s); return the seconds of one step")
            if math.isclose(seconds, want * 1e3, rel_tol=0.05):
                return fail(f"{case}: that is milliseconds; return seconds")
            return fail(f"{case}: expected about {want * 1e3:.3f} ms (memory {p.memory_s * 1e3:.3f} ms, compute "
                        f"{p.compute_s * 1e3:.3f} ms), got {seconds * 1e3:.4g} ms. Bytes: weights once + the KV "
                        "cache; FLOPs: 2 x weights x batch; GB/s and GFLOP/s are 1e9")
        if str(bound).strip().lower() != p.bound:
            return fail(f"{case}: the time is right but the bound is not. The bound is the side that takes "
                        f"longer: memory {p.memory_s * 1e3:.3f} ms vs compute {p.compute_s * 1e3:.3f} ms")
    return ok("Correct on every case, memory- and compute-bound alike: your roofline agrees with "
              "course_lib.roofline.predict within a few per cent (it also counts activations and attention).")


# --- exercise 3: bytes per token of a quantized KV cache ------------------------------------------------------

def _kv_cases():
    """(model, bits, group_size): float16, int8 per head and in groups, 4-bit in groups, on three GQA shapes."""
    return [("smollm2-135m", 16, None), ("smollm2-135m", 8, None), ("smollm2-135m", 4, 32),
            ("qwen2.5-0.5b", 8, 32), ("qwen2.5-0.5b", 4, 16), ("llama-3.2-1b", 8, None), ("llama-3.2-1b", 4, None)]


def _kv_simple(dims: ModelDims, bits: int, group: int | None, *, k_and_v: int = 2, meta_bytes: int = 2,
               meta_per_group: int | None = None, bits_as_bytes: bool = False) -> float:
    """The counting exercise 3 asks for, with one classic mistake switched on (used to name it)."""
    codes = dims.head_dim * (bits if bits_as_bytes else bits / 8)
    if bits == 16:
        per_vector = codes
    else:
        groups = dims.head_dim // (group or dims.head_dim)
        per_group = meta_per_group if meta_per_group is not None else (1 if bits == 8 else 2)
        per_vector = codes + groups * per_group * meta_bytes
    return dims.layers * k_and_v * dims.kv_heads * per_vector


@checked
def check_kv_bytes(fn: Callable) -> Feedback:
    """``fn(dims, bits, group_size) -> bytes`` of KV cache one token takes in every layer.

    ``bits=16``: a float16 cache. ``bits=8``: int8 codes and one float16 scale per group of ``group_size``
    channels of a head (None: the whole head). ``bits=4``: two codes per byte and a float16 scale and minimum
    per group. Checked exactly against :func:`course_lib.kv_quant.kv_bytes_per_token`.
    """
    for name, bits, group in _kv_cases():
        dims = ModelDims.from_config(speed_lab_config(name))
        got = attempt(fn, dims, bits, group)
        if isinstance(got, bool) or not isinstance(got, (int, float)) or not got > 0:
            return fail(f"return the bytes as a positive number, got {got!r}")
        cfg = None if bits == 16 else KVQuantConfig(bits=bits, group_size=group)
        want = kv_bytes_per_token(speed_lab_config(name), cfg, torch.float16)
        case = f"{name} ({dims.layers} layers, {dims.kv_heads} KV heads of {dims.head_dim}), {bits} bits" + (
            "" if bits == 16 else f", group_size={group}")
        if math.isclose(got, want, rel_tol=1e-9):
            continue
        variants = [
            (dict(k_and_v=1), "a token stores a key *and* a value in every layer: count both"),
            (dict(bits_as_bytes=True), "bits, not bytes: a code of b bits takes b / 8 bytes"),
            (dict(meta_per_group=0), "the codes alone cannot be read back: every group also stores its float16 "
                                     "scale (and, at 4 bits, its minimum)"),
            (dict(meta_bytes=4), "the scales are stored as float16: 2 bytes each, not 4"),
            (dict(meta_per_group=1), "4-bit groups are asymmetric: a scale *and* a minimum each, two float16 numbers"),
            (dict(meta_per_group=2), "int8 groups are symmetric: one float16 scale each, no minimum"),
        ]
        for mistake, hint in variants:
            if math.isclose(got, _kv_simple(dims, bits, group, **mistake), rel_tol=1e-9):
                return fail(f"{case}: {hint}")
        if math.isclose(got, want / dims.layers, rel_tol=1e-9):
            return fail(f"{case}: that is one layer; every layer keeps its own keys and values")
        return fail(f"{case}: expected {want:,} bytes, got {got:,}. Per layer: K and V x KV heads x (codes of "
                    "head_dim channels + the float16 numbers of each group)")
    return ok("Correct on every shape and format: int8 with one scale per head stores a token in about half the "
              "bytes of float16, 4-bit in groups of 32 in about 30%.")

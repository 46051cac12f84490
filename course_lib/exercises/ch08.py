"""Exercises of notebook 08 (math model): the article's formula, and a roofline prediction by hand."""

from __future__ import annotations

import math
from collections.abc import Callable

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

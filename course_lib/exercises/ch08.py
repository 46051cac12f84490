"""Exercises of notebook 08 (math model): the roofline by hand."""

from __future__ import annotations

from . import Feedback, fail, ok


def check_decode_weight_bytes(answer: float, n_params: float, bits: float) -> Feedback:
    """One decode step reads every weight once: n_params x bits / 8 bytes (whatever the batch size)."""
    want = n_params * bits / 8
    if abs(answer - want) <= 0.01 * want:
        return ok(f"Correct: {want / 1e6:.1f} MB per step.")
    if abs(answer - n_params * bits) <= 0.01 * want * 8:
        return fail("That is in bits: divide by 8 for bytes.")
    if abs(answer - n_params) <= 0.01 * n_params:
        return fail(f"That is the parameter count; each weight takes {bits}/8 bytes.")
    return fail(f"Not quite (you gave {answer:g}). Bytes = parameters x bits / 8.")


def check_bound(answer: str, memory_s: float, compute_s: float) -> Feedback:
    """Which limit binds: 'memory' when bytes/bandwidth > FLOPs/peak, else 'compute'."""
    want = "memory" if memory_s >= compute_s else "compute"
    got = str(answer).strip().lower()
    if got not in ("memory", "compute"):
        return fail("Answer 'memory' or 'compute'.")
    if got != want:
        return fail(f"Compare the two times: memory {memory_s * 1e3:.3g} ms vs compute {compute_s * 1e3:.3g} ms; "
                    "the larger one sets the step time.")
    return ok(f"Correct: {want}-bound ({max(memory_s, compute_s) / min(memory_s, compute_s):.0f}x apart).")


def check_article_ratio(answer: float) -> Feedback:
    """V'/V by the article's own formula with its own 'after' values: (1/2)(1/4)/2 = 1/16."""
    if abs(answer - 1 / 16) < 1e-3:
        return ok("Correct: the formula itself says the 'optimized' model is 16x *slower*, "
                  "neither the 4x the article prints nor the 5x it claims.")
    if abs(answer - 0.25) < 1e-3:
        return fail("0.25 is what the article's *printed* numbers give (2.5e12 / 1e13). Recompute "
                    "V' = P' C' / H' yourself from P/2, C/4 and 2H.")
    if abs(answer - 4) < 1e-3 or abs(answer - 5) < 1e-3:
        return fail("That is the article's claim. Compute V'/V from the formula: halving P halves V, "
                    "dividing C by 4 divides V by 4, doubling H halves V.")
    return fail(f"Not quite (you gave {answer:g}). Multiply the three factors: P' / P, C' / C and H / H'.")

"""Exercises of notebook 09 (project practice): the article's code, the Pareto front, stacking savings."""

from __future__ import annotations

from . import Feedback, fail, ok


def check_fixed_snippet(v_before: float, v_after: float, ratio: float) -> Feedback:
    """The article's snippet with legal names (``P2`` for ``P'``) prints V = 1e11, V' = 6.25e9, ratio 0.0625."""
    want_v, want_v2 = 1e8 * 1e9 / 1e6, (1e8 / 2) * (1e9 / 4) / (1e6 * 2)
    if abs(v_before - 1e13) < 1e9:
        return fail("1e13 is what the article's prose says, but 10^8 x 10^9 / 10^6 = 10^11: run the code, "
                    "do not copy the text.")
    if abs(v_before - want_v) > 1e-6 * want_v:
        return fail(f"V should be P * C / H with P=1e8, C=1e9, H=1e6; you gave {v_before:g}.")
    if abs(v_after - 2.5e10) < 1e6 or abs(v_after - 2.5e12) < 1e8:
        return fail("That is the article's printed V'. Compute P2 * C2 / H2 with P2 = P/2, C2 = C/4, H2 = 2H.")
    if abs(v_after - want_v2) > 1e-6 * want_v2:
        return fail(f"V' = (P/2)(C/4)/(2H) = {want_v2:g}; you gave {v_after:g}.")
    if abs(ratio - 4) < 1e-6 or abs(ratio - 5) < 1e-6:
        return fail("The article prints 4.0 and claims 5x; your own V' / V says otherwise. Print it.")
    if abs(ratio - want_v2 / want_v) > 1e-9:
        return fail(f"ratio should be V' / V = {want_v2 / want_v:g}; you gave {ratio:g}.")
    return ok("Correct: the fixed code runs and prints V'/V = 0.0625. By its own formula the 'optimized' model "
              "is 16x slower - the formula, not the optimisation, is wrong (notebook 08).")


def check_pareto(fn) -> Feedback:
    """``fn(points)`` takes [(tokens_per_s, ppl), ...] and returns the points no other point beats on both."""
    cases = [
        ([(10, 5.0), (30, 5.1), (5, 6.0), (40, 7.0)], {(10, 5.0), (30, 5.1), (40, 7.0)}),
        ([(10, 5.0)], {(10, 5.0)}),
        ([(10, 5.0), (10, 5.0), (9, 5.0)], {(10, 5.0)}),  # ties: a duplicate does not beat its twin
        ([(20, 4.0), (10, 5.0)], {(20, 4.0)}),  # one point dominates: faster *and* better
    ]
    for pts, want in cases:
        try:
            got = {tuple(p) for p in fn(list(pts))}
        except Exception as e:  # the learner's code: report, don't crash
            return fail(f"your function raised {type(e).__name__}: {e}")
        if got != want:
            extra, missing = got - want, want - got
            if any(p[0] == 5 for p in extra):
                return fail("(5 tok/s, ppl 6.0) is slower *and* worse than (10, 5.0): it is dominated.")
            if (10, 5.0) in missing and len(pts) > 1 and (20, 4.0) not in pts:
                return fail("Lower perplexity is better: (10, 5.0) has the best quality, so nothing dominates it.")
            return fail(f"for {pts} expected {sorted(want)}, got {sorted(got)}. A point is dominated when another "
                        "is at least as fast AND at least as good, and strictly better in one of the two.")
    return ok("Correct: that is the Pareto front the report draws.")


def check_stacked_bytes(answer: float, fp32_bytes: float, keep_frac: float, bits: int) -> Feedback:
    """Prune to ``keep_frac`` of the weights, then store them at ``bits``: fp32_bytes x keep_frac x bits / 32."""
    want = fp32_bytes * keep_frac * bits / 32
    if abs(answer - want) <= 0.01 * want:
        return ok(f"Correct: {want / 1e6:.1f} MB. Savings multiply - which is why the pipeline stacks them.")
    if abs(answer - fp32_bytes * (keep_frac + bits / 32) / 2) <= 0.01 * want:
        return fail("Savings multiply, they do not average.")
    if abs(answer - fp32_bytes * bits / 32) <= 0.01 * want:
        return fail("You applied the bits but not the pruning: multiply by the fraction of weights kept too.")
    if abs(answer - fp32_bytes * keep_frac) <= 0.01 * want:
        return fail("You applied the pruning but not the bits: fp32 is 32 bits, so multiply by bits / 32 too.")
    return fail(f"Not quite (you gave {answer:g}). bytes = fp32 bytes x fraction kept x bits / 32.")

"""Chapter 01 exercises: reading a token timeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from . import Feedback, fail, ok

# Timestamps (seconds since the request) of 6 tokens: a slow first token, then steady steps.
_TIMES = (0.200, 0.250, 0.300, 0.350, 0.400, 0.450)


def decode_tokens_per_second(token_times: Sequence[float]) -> float:
    """Reference: decode speed counts only the steps after the first token."""
    return (len(token_times) - 1) / (token_times[-1] - token_times[0])


def check_decode_tokens_per_second(fn: Callable[[Sequence[float]], float]) -> Feedback:
    """The learner's ``fn(token_times) -> decode tokens/s``."""
    try:
        got = float(fn(list(_TIMES)))
    except Exception as e:  # a learner's bug is feedback, not a crash
        return fail(f"your function raised {type(e).__name__}: {e}")
    want = decode_tokens_per_second(_TIMES)  # 20 tokens/s
    if abs(got - want) < 1e-6 * want:
        return ok(f"Correct: {want:.1f} tokens/s. The first token's wait is TTFT, reported separately.")
    if abs(got - len(_TIMES) / _TIMES[-1]) < 1e-6:
        return fail("you divided all tokens by the total time, so the prefill (first token) is mixed in; "
                    "decode speed uses the gaps after the first token")
    if abs(got - 1 / want) < 1e-6:
        return fail("you computed seconds per token; invert it to get tokens per second")
    return fail(f"expected {want:.1f} tokens/s for timestamps {_TIMES}, got {got:.3g}")


def check_prefill_prediction(prediction: str, prefill_s: float, decode_step_s: float, n_tokens: int) -> Feedback:
    """Was the prediction ("faster" or "slower") right about prefill vs ``n_tokens`` decode steps?"""
    if prediction not in ("faster", "slower"):
        return fail("answer 'faster' or 'slower'")
    actual = "faster" if prefill_s < n_tokens * decode_step_s else "slower"
    ratio = n_tokens * decode_step_s / prefill_s
    if prediction == actual:
        return ok(f"Right: prefilling {n_tokens} tokens at once was {ratio:.1f}x quicker than {n_tokens} "
                  "decode steps, because one pass reads the weights once for all the tokens.")
    return fail(f"measured: prefill of {n_tokens} tokens took {prefill_s * 1e3:.1f} ms, {n_tokens} decode steps "
                f"{n_tokens * decode_step_s * 1e3:.1f} ms. Think about how often the weights are read.")

"""Chapter 01 exercises: reading a token timeline, and a prediction about prefill."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence

from ..timing import stream_timing
from . import Feedback, attempt, checked, fail, not_done, ok


def _timelines(seed: int = 1) -> list[tuple[float, ...]]:
    """Token timestamps (seconds since the request): a wait for the first token, steady steps, one hiccup."""
    rng = random.Random(seed)
    out = []
    for n in (6, 9, 12, 16):
        ttft = rng.uniform(0.05, 1.5)
        gap = rng.uniform(0.005, 0.12)
        gaps = [gap * rng.uniform(0.9, 1.1) for _ in range(n - 1)]
        gaps[rng.randrange(1, n - 1)] *= 6  # one slow step (another job took the core for a moment)
        times = [ttft]
        for g in gaps:
            times.append(times[-1] + g)
        out.append(tuple(times))
    return out


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


@checked
def check_stream_timing(fn: Callable[[Sequence[float]], tuple[float, float]]) -> Feedback:
    """``fn(token_times) -> (ttft_s, decode_tokens_per_s)``, as :func:`course_lib.timing.stream_timing` reports."""
    for times in _timelines():
        got = attempt(fn, list(times))
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return fail(f"return two numbers, (ttft_s, tokens_per_s); got {got!r}")
        try:
            ttft, tps = float(got[0]), float(got[1])
        except (TypeError, ValueError):
            return fail(f"return two numbers, (ttft_s, tokens_per_s); got {got!r}")
        want = stream_timing(times, prompt_tokens=0)
        n, gaps = len(times), [b - a for a, b in zip(times, times[1:])]
        if not _close(ttft, want.ttft_s):
            if _close(ttft, gaps[0]) or _close(ttft, times[1]):
                return fail("TTFT is the time of the *first* token, token_times[0]: the wait before anything appears")
            return fail(f"TTFT should be {want.ttft_s:.3f} s (the first timestamp) for {n} tokens, got {ttft:.4g}")
        if _close(tps, want.tokens_per_s):
            continue
        if _close(tps, 1 / want.tokens_per_s):
            return fail("that is seconds per token (TPOT); invert it to get tokens per second")
        if _close(tps, n / times[-1]) or _close(tps, (n - 1) / times[-1]):
            return fail("you divided by the time since the request, so the prefill (the wait for the first token) "
                        "is mixed into the decode speed: use only the gaps after the first token")
        if _close(tps, n / (times[-1] - times[0])):
            return fail(f"{n} tokens have {n - 1} gaps between them: count the gaps, not the tokens")
        if _close(tps, (n - 1) / (times[-1] - times[0])) or _close(tps, 1 / statistics.fmean(gaps)):
            return fail("that is the *average* rate: the one slow step in this timeline drags it down. Take the "
                        "median gap between consecutive tokens (1 / median gap), as course_lib.timing does")
        if _close(tps, 1 / min(gaps)):
            return fail("that is the fastest single step: report the typical one, 1 / the median gap")
        return fail(f"for {n} tokens from {times[0]:.3f} s to {times[-1]:.3f} s expected {want.tokens_per_s:.2f} "
                    f"tokens/s (1 / the median gap), got {tps:.4g}")
    return ok("Correct: TTFT is the first timestamp, decode speed 1 / the median gap, which one slow step "
              "does not move (it is what course_lib.timing.stream_timing reports).")


def check_prefill_prediction(prediction: str, prefill_s: float, steps_s: float, n_tokens: int) -> Feedback:
    """Was ``prediction`` ("faster"/"slower") right about one prefill of ``n_tokens`` vs ``n_tokens`` one-token passes?

    ``prefill_s`` and ``steps_s`` are the measured medians (seconds) of the two, timed interleaved.
    """
    answer = str(prediction).strip().lower()
    if answer in ("", "?"):
        return not_done("`prediction` (\"faster\" or \"slower\")")
    if answer not in ("faster", "slower"):
        return fail(f"answer 'faster' or 'slower', not {prediction!r}")
    actual = "faster" if prefill_s < steps_s else "slower"
    ratio = steps_s / prefill_s
    measured = (f"measured here: one pass over {n_tokens} tokens {prefill_s * 1e3:.1f} ms, {n_tokens} one-token "
                f"passes {steps_s * 1e3:.1f} ms")
    if answer == actual == "faster":
        return ok(f"Right: {measured} ({ratio:.1f}x). One pass reads every weight once for all the tokens; "
                  "each decode step reads them all again for a single token.")
    if answer == actual:
        return ok(f"Right for this machine: {measured}. (Usually prefill wins: it reads the weights once for all "
                  "the tokens; here something else - overhead, a busy machine - dominated.)")
    return fail(f"{measured}. Think about how often each way reads the weights.")

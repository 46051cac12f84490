"""Exercises of notebook 04 (hardware acceleration): timing done right."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from . import Feedback, fail, ok


def check_timer(timer: Callable[[Callable[[], object]], float]) -> Feedback:
    """``timer(fn)`` should return the typical seconds of ``fn``: warm up, repeat, take the median."""
    calls: list[float] = []  # how long each call really took (a busy machine stretches them)

    def work():  # the first call costs 30 ms (a "cold start"), then 10 ms each, with one 60 ms hiccup
        n = len(calls)
        dur = 0.030 if n == 0 else (0.060 if n == 3 else 0.010)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < dur:
            pass
        calls.append(time.perf_counter() - t0)

    try:
        got = timer(work)
    except Exception as e:  # the learner's code: report any error in words
        return fail(f"Your timer raised {type(e).__name__}: {e}")
    if not isinstance(got, (int, float)):
        return fail(f"Return seconds as a float, got {type(got).__name__}.")
    if len(calls) < 5:
        return fail(f"Your timer called fn only {len(calls)} time(s). Warm up, then repeat several times.")
    steady = statistics.median(c for i, c in enumerate(calls) if i not in (0, 3))
    if got > 1.3 * steady:
        return fail(f"You reported {got * 1e3:.1f} ms; the steady cost is {steady * 1e3:.1f} ms. A cold first "
                    "call or an outlier is in your number: skip warm-up calls and use the median, not the mean.")
    if got < 0.009:
        return fail(f"You reported {got * 1e3:.1f} ms, faster than the work itself: are you timing the right "
                    "thing, in seconds?")
    return ok(f"Correct: {got * 1e3:.1f} ms, the steady-state cost.")


def check_bandwidth_estimate(answer_gbs: float, n_bytes: int, seconds: float) -> Feedback:
    """A copy of ``n_bytes`` took ``seconds``: a copy reads and writes, so it moved 2 x n_bytes."""
    want = 2 * n_bytes / seconds / 1e9
    if abs(answer_gbs - want) <= 0.02 * want:
        return ok(f"Correct: {want:.1f} GB/s.")
    if abs(answer_gbs - want / 2) <= 0.02 * want:
        return fail("Half the right answer: a copy *reads* every byte and *writes* it again.")
    if abs(answer_gbs - want * 1e9) <= 0.02 * want * 1e9 or abs(answer_gbs - want * 1e9 / 2**30) <= 0.05 * want * 1e9:
        return fail("Check the units: GB/s means bytes / seconds / 1e9.")
    return fail(f"Not quite (you gave {answer_gbs:g}). Bandwidth = bytes moved / seconds / 1e9.")

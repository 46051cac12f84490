"""Exercises of notebook 10 (applications): budgets, streaming arithmetic, batch size."""

from __future__ import annotations

from ..applications import e2e_seconds
from . import Feedback, fail, ok


def check_e2e(fn) -> Feedback:
    """``fn(ttft_s, tpot_s, n_tokens)``: seconds until the last of ``n_tokens`` streamed tokens exists."""
    for args in ((0.5, 0.1, 11), (1.0, 0.05, 1), (0.2, 0.02, 200)):
        try:
            got = float(fn(*args))
        except Exception as e:
            return fail(f"your function raised {type(e).__name__}: {e}")
        want = e2e_seconds(*args)
        if abs(got - want) > 1e-9:
            ttft, tpot, n = args
            if abs(got - (ttft + n * tpot)) < 1e-9:
                return fail("Off by one token: the first token arrives at TTFT, so only n - 1 gaps follow.")
            if abs(got - n * tpot) < 1e-9:
                return fail("You forgot the wait for the first token (TTFT).")
            return fail(f"for TTFT={ttft}, TPOT={tpot}, n={n} expected {want:g} s, got {got:g}.")
    return ok("Correct: e2e = TTFT + (n - 1) x TPOT.")


def check_max_batch(answer: int, sweep_rows: list[dict], tpot_target_ms: float) -> Feedback:
    """The largest measured batch whose time per output token stays within ``tpot_target_ms``."""
    fits = [r["batch"] for r in sweep_rows if r["tpot_ms"] <= tpot_target_ms]
    want = max(fits) if fits else 0
    if answer == want:
        return ok(f"Correct: batch {want} is the largest that keeps each user's TPOT within {tpot_target_ms} ms."
                  if want else "Correct: no batch size meets that target on this machine.")
    row = next((r for r in sweep_rows if r["batch"] == answer), None)
    if row is None:
        return fail(f"batch {answer} was not measured; choose one of {[r['batch'] for r in sweep_rows]}.")
    if row["tpot_ms"] > tpot_target_ms:
        return fail(f"batch {answer} takes {row['tpot_ms']:.1f} ms per token: over the {tpot_target_ms} ms target.")
    return fail(f"batch {answer} fits, but a bigger one does too: more users per step for free.")


def check_required_tokens_per_s(answer: float, words_per_min: float, tokens_per_word: float = 1.3) -> Feedback:
    """Streaming must keep up with a speaker: tokens/s = words per minute / 60 x tokens per word."""
    want = words_per_min / 60 * tokens_per_word
    if abs(answer - want) <= 0.02 * want:
        return ok(f"Correct: {want:.2f} tokens/s; any faster is invisible to the listener.")
    if abs(answer - words_per_min * tokens_per_word) <= 0.02 * want * 60:
        return fail("That is per minute: divide by 60 for per second.")
    if abs(answer - words_per_min / 60) <= 0.02 * want:
        return fail("That is words per second; a word is about 1.3 tokens.")
    return fail(f"Not quite (you gave {answer:g}). tokens/s = words/min / 60 x tokens/word.")

"""Exercises of notebook 10 (applications): a scheduler step, streaming arithmetic, batch size, budgets."""

from __future__ import annotations

import random

from ..applications import e2e_seconds
from ..serving import schedule_step
from . import Feedback, attempt, checked, fail, not_done, ok


@checked
def check_e2e(fn) -> Feedback:
    """``fn(ttft_s, tpot_s, n_tokens)``: seconds until the last of ``n_tokens`` streamed tokens exists."""
    for args in ((0.5, 0.1, 11), (1.0, 0.05, 1), (0.2, 0.02, 200)):
        got = attempt(fn, *args)
        try:
            got = float(got)
        except (TypeError, ValueError):
            return fail(f"return a number of seconds, got {type(got).__name__}")
        want = e2e_seconds(*args)
        if abs(got - want) > 1e-9:
            ttft, tpot, n = args
            if abs(got - (ttft + n * tpot)) < 1e-9:
                return fail("Off by one token: the first token arrives at TTFT, so only n - 1 gaps follow.")
            if abs(got - n * tpot) < 1e-9:
                return fail("You forgot the wait for the first token (TTFT).")
            return fail(f"for TTFT={ttft}, TPOT={tpot}, n={n} expected {want:g} s, got {got:g}.")
    return ok("Correct: e2e = TTFT + (n - 1) x TPOT.")


def check_max_batch(answer, sweep_rows: list[dict], tpot_target_ms: float) -> Feedback:
    """The largest measured batch whose time per output token stays within ``tpot_target_ms``."""
    if answer == "?":
        return not_done("`my_batch` (a batch size from the sweep)")
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        return fail(f"give the batch size as a number (like {sweep_rows[-1]['batch']}), not {answer!r}")
    fits = [r["batch"] for r in sweep_rows if r["tpot_ms"] <= tpot_target_ms]
    want = max(fits) if fits else 0
    if answer == want:
        return ok(f"Correct: batch {want} is the largest that keeps each user's TPOT within {tpot_target_ms:.1f} ms."
                  if want else "Correct: no batch size meets that target on this machine.")
    row = next((r for r in sweep_rows if r["batch"] == answer), None)
    if row is None:
        return fail(f"batch {answer} was not measured; choose one of {[r['batch'] for r in sweep_rows]}.")
    if row["tpot_ms"] > tpot_target_ms:
        return fail(f"batch {answer} takes {row['tpot_ms']:.1f} ms per token: over the {tpot_target_ms:.1f} ms target.")
    return fail(f"batch {answer} fits, but a bigger one does too: more users per step for free.")


def check_required_tokens_per_s(answer, words_per_min: float, tokens_per_word: float = 1.3) -> Feedback:
    """Streaming must keep up with a speaker: tokens/s = words per minute / 60 x tokens per word."""
    if answer == "?":
        return not_done("`tokens_per_s`")
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        return fail(f"give tokens per second as a number (a Python expression is fine), not {answer!r}")
    want = words_per_min / 60 * tokens_per_word
    if abs(answer - want) <= 0.02 * want:
        return ok(f"Correct: {want:.2f} tokens/s; any faster is invisible to the listener.")
    if abs(answer - words_per_min * tokens_per_word) <= 0.02 * want * 60:
        return fail("That is per minute: divide by 60 for per second.")
    if abs(answer - words_per_min / 60) <= 0.02 * want:
        return fail("That is words per second; a word is about 1.3 tokens.")
    return fail(f"Not quite (you gave {answer:g}). tokens/s = words/min / 60 x tokens/word.")


# --- the scheduler step ---------------------------------------------------------------

def _no_free(running, waiting, max_batch, free):
    return schedule_step([(r, d, w, 0) for r, d, w, _ in running], waiting, max_batch, free)


def _overtake(running, waiting, max_batch, free):
    batch = [r for r, d, w, _ in running if d < w]
    free += sum(h for _, d, w, h in running if d >= w)
    left = []
    for rid, need in waiting:
        if len(batch) < max_batch and need <= free:
            batch.append(rid)
            free -= need
        else:
            left.append(rid)
    return batch, left, free


def _keep_finished(running, waiting, max_batch, free):
    batch, left, free = schedule_step([(r, 0, 1, 0) for r, _, _, _ in running], waiting, max_batch, free)
    return batch, left, free


def _ignore_limit(running, waiting, max_batch, free):
    return schedule_step(running, waiting, 10**9, free)


_MISTAKES = (
    (_keep_finished, "finished requests (tokens done >= wanted) must leave the batch before anyone joins"),
    (_no_free, "a finished request's blocks go back to the pool: add them to the free blocks before admitting"),
    (_ignore_limit, "the batch may hold at most max_batch rows"),
    (_overtake, "first come, first served: stop at the first waiting request whose blocks do not fit; a later, "
                "smaller one must not overtake it"),
)


def _cases():
    yield [(0, 5, 5, 3), (1, 2, 9, 2)], [(7, 3)], 4, 0  # only the finished request's blocks make room
    yield [(0, 1, 9, 2)], [(5, 6), (6, 1)], 4, 3  # the head does not fit; the next one would
    yield [(0, 1, 9, 1), (1, 1, 9, 1)], [(2, 1), (3, 1), (4, 1)], 3, 10  # the batch limit
    rng = random.Random(10)
    for _ in range(40):
        running = [(i, d, rng.randint(1, 9), rng.randint(1, 4)) for i in range(rng.randint(0, 5))
                   for d in [rng.randint(0, 9)]]
        waiting = [(10 + j, rng.randint(1, 5)) for j in range(rng.randint(0, 5))]
        yield running, waiting, rng.randint(1, 6), rng.randint(0, 8)


@checked
def check_schedule_step(fn) -> Feedback:
    """``fn(running, waiting, max_batch, free_blocks) -> (batch rids, waiting rids, free blocks)``."""
    for running, waiting, max_batch, free in _cases():
        want = schedule_step(running, waiting, max_batch, free)
        out = attempt(fn, [tuple(r) for r in running], [tuple(w) for w in waiting], max_batch, free)
        if not (isinstance(out, tuple) and len(out) == 3):
            return fail(f"return three things: (batch rids, still-waiting rids, free blocks); got {out!r}")
        got = (list(out[0]), list(out[1]), out[2])
        if got[0] == want[0] and got[1] == want[1] and got[2] == want[2]:
            continue
        case = f"running={running}, waiting={waiting}, max_batch={max_batch}, free_blocks={free}"
        for wrong, hint in _MISTAKES:
            w = wrong(running, waiting, max_batch, free)
            if (got[0], got[1], got[2]) == (list(w[0]), list(w[1]), w[2]) and w != want:
                return fail(f"{hint} (case {case})")
        if any(isinstance(r, (tuple, list)) for r in got[1]):
            return fail(f"return the still-waiting request *ids*, not their (rid, blocks_needed) pairs (case {case})")
        if len(got[0]) > max_batch:
            return fail(f"the batch may hold at most max_batch = {max_batch} rows; you returned {len(got[0])} "
                        f"(case {case})")
        joined = dict(waiting)
        taken = sum(joined[r] for r in want[0] if r in joined)  # the blocks the newcomers took from the pool
        if got[0] == want[0] and got[1] == want[1] and got[2] == want[2] + taken:
            return fail(f"a newcomer takes its blocks from the pool: subtract its blocks_needed from the free blocks "
                        f"when it joins (case {case})")
        if sorted(got[0]) == sorted(want[0]) and got[0] != want[0]:
            return fail(f"right requests, wrong order: keep the running ones first, in order, then the newcomers in "
                        f"arrival order (case {case})")
        return fail(f"case {case}: expected {want}, got {got}")
    return ok("your scheduler makes the same decisions as the paged server's: finished rows leave and free their "
              "blocks, newcomers join in arrival order while rows and blocks last")

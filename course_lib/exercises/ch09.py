"""Exercises of notebook 09 (project practice): the article's code, the Pareto front, choosing under a budget.

1. ``check_fixed_snippet(v_before, v_after, ratio)`` - the article's snippet run with legal names.
2. ``check_pareto(fn)`` - ``fn(points)`` keeps the (tokens/s, perplexity) points no other point beats on both.
3. ``check_pick_under_budget(fn)`` - ``fn(rows, budget_ms)`` picks the variant to ship: the best quality among
   those whose *slow* tokens (p90 time per token) still meet a latency budget.

Function checks call the learner's code through :func:`attempt` on several cases (fixed seed): a stub gives
"not done yet", a wrong answer says what is wrong.
"""

from __future__ import annotations

import random

from . import Feedback, attempt, checked, fail, not_done, ok


def check_fixed_snippet(v_before: float | None, v_after: float | None, ratio: float | None = None) -> Feedback:
    """The article's snippet with legal names (``P2`` for ``P'``) prints V = 1e11, V' = 6.25e9, ratio 0.0625."""
    if v_before is None or v_after is None:
        return not_done("`my_V` and `my_V2`")
    if ratio is None:
        ratio = v_after / v_before if v_before else float("nan")
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


@checked
def check_pareto(fn) -> Feedback:
    """``fn(points)`` takes [(tokens_per_s, ppl), ...] and returns the points no other point beats on both."""
    cases = [
        ([(10, 5.0), (30, 5.1), (5, 6.0), (40, 7.0)], {(10, 5.0), (30, 5.1), (40, 7.0)}),
        ([(10, 5.0)], {(10, 5.0)}),
        ([(10, 5.0), (10, 5.0), (9, 5.0)], {(10, 5.0)}),  # ties: a duplicate does not beat its twin
        ([(20, 4.0), (10, 5.0)], {(20, 4.0)}),  # one point dominates: faster *and* better
    ]
    for pts, want in cases:
        out = attempt(fn, list(pts))
        try:
            got = {tuple(p) for p in out}
        except TypeError:
            return fail(f"return a list of (tokens_per_s, ppl) points, got {type(out).__name__}")
        if got != want:
            extra, missing = got - want, want - got
            if any(p[0] == 5 for p in extra):
                return fail("(5 tok/s, ppl 6.0) is slower *and* worse than (10, 5.0): it is dominated.")
            if (10, 5.0) in missing and pts.count((10, 5.0)) > 1:
                return fail("two equal points (10, 5.0) do not beat each other: a point is dominated only by one "
                            "at least as good on both axes *and strictly better* on one, so keep one copy of it.")
            if (10, 5.0) in missing and len(pts) > 1 and (20, 4.0) not in pts:
                return fail("Lower perplexity is better: (10, 5.0) has the best quality, so nothing dominates it.")
            return fail(f"for {pts} expected {sorted(want)}, got {sorted(got)}. A point is dominated when another "
                        "is at least as fast AND at least as good, and strictly better in one of the two.")
    return ok("Correct: that is the Pareto front the report draws.")


def pick_under_budget(rows: list[dict], budget_ms: float) -> str | None:
    """The reference: the lowest-perplexity row whose p90 ms/token meets the budget (ties: lower median); else None."""
    fits = [r for r in rows if r["p90_ms"] <= budget_ms]
    if not fits:
        return None
    return min(fits, key=lambda r: (r["ppl"], r["median_ms"]))["method"]


def _budget_cases() -> list[tuple[list[dict], float]]:
    rng = random.Random(9)
    cases = []
    # a hand-made case where every shortcut picks something else: the median fits, the p90 does not
    cases.append(([dict(method="baseline", median_ms=40.0, p90_ms=48.0, ppl=10.0),
                   dict(method="int8", median_ms=29.0, p90_ms=36.0, ppl=10.2),
                   dict(method="int4", median_ms=20.0, p90_ms=24.0, ppl=12.5),
                   dict(method="prune", median_ms=33.0, p90_ms=34.0, ppl=11.0)], 35.0))
    cases.append((cases[0][0], 10.0))  # nothing fits
    cases.append((cases[0][0], 34.0))  # prune's p90 equals the budget: it meets it
    cases.append(([dict(method="a", median_ms=20.0, p90_ms=22.0, ppl=9.0),  # a tie in quality: the faster one
                   dict(method="b", median_ms=15.0, p90_ms=21.0, ppl=9.0)], 30.0))
    for _ in range(5):
        rows = []
        for i in range(rng.randint(3, 7)):
            med = rng.uniform(10, 60)
            rows.append(dict(method=f"v{i}", median_ms=round(med, 2), p90_ms=round(med * rng.uniform(1.02, 1.5), 2),
                             ppl=round(rng.uniform(5, 15), 2)))
        cases.append((rows, round(rng.uniform(15, 60), 1)))
    return cases


@checked
def check_pick_under_budget(fn) -> Feedback:
    """``fn(rows, budget_ms)`` returns the method name to ship, or None when no row meets the budget."""
    for rows, budget in _budget_cases():
        got = attempt(fn, [dict(r) for r in rows], budget)
        want = pick_under_budget(rows, budget)
        if got == want:
            continue
        if isinstance(got, dict):
            return fail("return the row's name (row['method']), not the row itself")
        if want is None:
            return fail(f"with a budget of {budget} ms no row's p90 fits; return None (ship nothing, say so) "
                        f"instead of {got!r}")
        by_name = {r["method"]: r for r in rows}
        if got is None:
            return fail(f"with a budget of {budget} ms, {want!r} fits (p90 {by_name[want]['p90_ms']} ms): "
                        "do not return None when a row meets it")
        if got not in by_name:
            return fail(f"{got!r} is not one of the rows' methods {sorted(by_name)}")
        g = by_name[got]
        if g["p90_ms"] > budget and g["median_ms"] <= budget:
            return fail(f"{got!r} meets {budget} ms only at its median ({g['median_ms']} ms); one token in ten takes "
                        f"{g['p90_ms']} ms or more. A latency budget must hold for the slow tokens: compare p90_ms.")
        if g["p90_ms"] > budget:
            return fail(f"{got!r} does not meet the budget: its p90 is {g['p90_ms']} ms > {budget} ms")
        if by_name[want]["p90_ms"] == budget:
            return fail(f"{want!r} has a p90 of exactly {budget} ms, the budget: it meets it (p90_ms <= budget_ms, "
                        "not <)")
        fastest = min((r for r in rows if r["p90_ms"] <= budget), key=lambda r: r["median_ms"])["method"]
        if got == fastest and g["ppl"] > by_name[want]["ppl"]:
            return fail(f"{got!r} is the fastest that fits, but {want!r} also fits and has lower perplexity: "
                        "among the rows that meet the budget, ship the best quality (lowest ppl)")
        if g["ppl"] == by_name[want]["ppl"]:
            return fail(f"{got!r} and {want!r} tie on perplexity; break the tie with the faster median")
        return fail(f"with budget {budget} ms expected {want!r} (lowest ppl among rows with p90_ms <= budget), "
                    f"got {got!r}")
    return ok("Correct: filter by the slow tokens (p90), then take the best quality; faster than needed buys "
              "nothing the user feels, better answers do.")

"""Exercise checks of notebook 09: the reference passes, a wrong answer gets its specific hint, a stub is not done."""

from __future__ import annotations

from course_lib.bench.report import pareto_front
from course_lib.exercises import ch09


def stub(*args):
    raise NotImplementedError


def test_ch09_fixed_snippet():
    P, C, H = 10**8, 10**9, 10**6
    P2, C2, H2 = P / 2, C / 4, H * 2
    V, V2 = P * C / H, P2 * C2 / H2
    assert ch09.check_fixed_snippet(V, V2, V2 / V)
    assert ch09.check_fixed_snippet(V, V2)  # the ratio follows from the two
    assert "prose" in ch09.check_fixed_snippet(1e13, V2, V2 / V).message
    assert "printed" in ch09.check_fixed_snippet(V, 2.5e10, 4.0).message
    assert "claims 5x" in ch09.check_fixed_snippet(V, V2, 4.0).message
    blank = ch09.check_fixed_snippet(None, None)
    assert not blank and not blank.done


def test_ch09_pareto_reference_is_the_library():
    def ref(points):
        rows = [dict(decode_tok_s=s, ppl=p) for s, p in points]
        return {(r["decode_tok_s"], r["ppl"]) for r in pareto_front(rows)}

    assert ch09.check_pareto(ref)
    assert "dominated" in ch09.check_pareto(lambda pts: pts).message
    assert "raised" in ch09.check_pareto(lambda pts: 1 / 0).message
    assert not ch09.check_pareto(lambda pts: [max(pts)])  # fastest only
    assert "list of" in ch09.check_pareto(lambda pts: None).message

    def equal_dominates(pts):  # "at least as good on both" without "strictly better on one": twins kill each other
        return [p for i, p in enumerate(pts)
                if not any(o[0] >= p[0] and o[1] <= p[1] for j, o in enumerate(pts) if j != i)]
    twins = ch09.check_pareto(equal_dominates)
    assert not twins and "strictly better" in twins.message
    s = ch09.check_pareto(stub)
    assert not s and not s.done


def test_ch09_pick_under_budget():
    assert ch09.check_pick_under_budget(ch09.pick_under_budget)

    def ref_loop(rows, budget):  # a learner's version written differently must pass too
        best = None
        for r in sorted(rows, key=lambda r: r["median_ms"]):
            if r["p90_ms"] <= budget and (best is None or r["ppl"] < best["ppl"]):
                best = r
        return best and best["method"]
    assert ch09.check_pick_under_budget(ref_loop)

    def by_median(rows, b):
        fits = [r for r in rows if r["median_ms"] <= b]
        return min(fits, key=lambda r: (r["ppl"], r["median_ms"]))["method"] if fits else None
    assert "p90" in ch09.check_pick_under_budget(by_median).message

    def fastest(rows, b):
        fits = [r for r in rows if r["p90_ms"] <= b]
        return min(fits, key=lambda r: r["median_ms"])["method"] if fits else None
    assert "best quality" in ch09.check_pick_under_budget(fastest).message

    def whole_row(rows, b):
        fits = [r for r in rows if r["p90_ms"] <= b]
        return min(fits, key=lambda r: (r["ppl"], r["median_ms"])) if fits else None
    assert "name" in ch09.check_pick_under_budget(whole_row).message

    def never_none(rows, b):  # right when a row fits, else "the fastest anyway"
        return ch09.pick_under_budget(rows, b) or min(rows, key=lambda r: r["p90_ms"])["method"]
    assert "return None" in ch09.check_pick_under_budget(never_none).message

    def slower_tie(rows, b):
        fits = [r for r in rows if r["p90_ms"] <= b]
        return min(fits, key=lambda r: (r["ppl"], -r["median_ms"]))["method"] if fits else None
    assert "tie" in ch09.check_pick_under_budget(slower_tie).message
    def strictly_under(rows, b):  # p90 < budget: a row exactly at the budget is wrongly left out
        fits = [r for r in rows if r["p90_ms"] < b]
        return min(fits, key=lambda r: (r["ppl"], r["median_ms"]))["method"] if fits else None
    edge = ch09.check_pick_under_budget(strictly_under)
    assert not edge and "not <" in edge.message
    s = ch09.check_pick_under_budget(stub)
    assert not s and not s.done and "Not done yet" in s.message

"""Applications as latency budgets: what "fast enough" means for a product.

A user does not feel "tokens per second"; they feel two waits:

* **TTFT** (time to first token) - the silence before anything appears (or is spoken);
* **TPOT** (time per output token) - how fast the answer then streams. Text that
  streams faster than people read (or faster than a voice speaks) is fast enough.

With streaming, end-to-end latency for an answer of ``n`` tokens is
``TTFT + (n - 1) * TPOT``. Each product sets its own targets. The presets
below take the article's own example numbers (chapter 6) where it gives them,
and human reading / speaking rates for the streaming speed; every target is
written down with its reason so a learner can argue with it. ``BUDGETS`` is the
course's one source of these numbers: every notebook that judges a latency
reads them from here (:func:`budget_targets` gives the short form).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ._checks import check_int, check_number
from .decode_speed import time_generation
from .roofline import decode_cost, predict, prefill_cost
from .timing import interleaved


@dataclass(frozen=True)
class LatencyBudget:
    """Service-level targets of one application (seconds, tokens)."""

    name: str
    ttft_s: float  # the longest acceptable wait before the first token
    tpot_s: float  # the longest acceptable gap between streamed tokens
    answer_tokens: int  # a typical answer length
    e2e_s: float  # the longest acceptable time for the whole typical answer
    why: str = ""

    def __post_init__(self):
        for name in ("ttft_s", "tpot_s", "e2e_s"):  # NaN passed "<= 0" and then met no target and failed none
            check_number(name, getattr(self, name), "> 0 and finite (seconds)", lambda v: 0 < v < math.inf)
        check_int("answer_tokens", self.answer_tokens, 1, " (a typical answer length)")

    @property
    def min_tokens_per_s(self) -> float:
        """Decode speed the TPOT target asks for."""
        return 1.0 / self.tpot_s


# People read roughly 4-5 English words (~6 tokens) per second and speak ~150 words per
# minute (~3.5 tokens/s); streaming faster than that is invisible to them.
BUDGETS: dict[str, LatencyBudget] = {
    "customer service": LatencyBudget(
        "customer service", ttft_s=1.0, tpot_s=1 / 8, answer_tokens=120, e2e_s=15.0,
        why="the article's example: average response time cut from 3 s to 1 s; the answer streams "
            "faster than a customer reads (~6 tokens/s), with margin"),
    "voice assistant": LatencyBudget(
        "voice assistant", ttft_s=0.5, tpot_s=1 / 4, answer_tokens=40, e2e_s=10.0,
        why="the article's example: response time cut from 2 s to 1 s, of which speech recognition and "
            "synthesis take part; a pause over ~0.5 s feels broken in conversation; text must be ready "
            "faster than speech plays (~3.5 tokens/s)"),
    "text generation": LatencyBudget(
        "text generation", ttft_s=5.0, tpot_s=0.3, answer_tokens=400, e2e_s=120.0,
        why="the article's example: a 300-character advert written in 2 minutes instead of 5 "
            "(~400 tokens); nobody watches it stream, so only the total counts"),
}


def budget_targets(budgets: dict[str, LatencyBudget] | None = None) -> dict[str, tuple[float, float]]:
    """{application: (max TTFT in ms, min decode tokens/s)} of the presets: the two numbers a quick check needs."""
    return {name: (b.ttft_s * 1e3, b.min_tokens_per_s) for name, b in (budgets or BUDGETS).items()}


def interleaved_generation(models: dict, prompt, new_tokens: int, rounds: int = 3) -> dict[str, dict]:
    """TTFT and TPOT of several models, timed **interleaved** (one generation each per round, after a warm-up).

    Returns {name: {"ttft": BenchResult, "tpot": BenchResult, "timing": GenerationTiming}}: the medians and
    p10-p90 spreads over ``rounds`` (each round's TPOT is that run's median gap), ready for
    :func:`course_lib.timing.speed_verdict`, and the last run's timing (for its token stamps).
    """
    check_int("rounds", rounds, 1)
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict {name: model}")

    def generation(model, n: int):
        return functools.partial(time_generation, model, None, prompt, max_new_tokens=n, warmup=0, repeat=1)

    res = interleaved({name: generation(m, new_tokens) for name, m in models.items()}, rounds, warmup=0,
                      timed=False, prepare={name: generation(m, 2) for name, m in models.items()})
    return {name: dict(ttft=res.result(name, lambda t: t.ttft_s, "perf_counter"),
                       tpot=res.result(name, lambda t: t.tpot_s, "perf_counter"), timing=ts[-1])
            for name, ts in res.samples.items()}


def e2e_seconds(ttft_s: float, tpot_s: float, answer_tokens: int) -> float:
    """End-to-end time of a streamed answer: first token, then ``answer_tokens - 1`` gaps."""
    _check_measured(ttft_s, tpot_s)
    check_int("answer_tokens", answer_tokens, 1)
    return ttft_s + (answer_tokens - 1) * tpot_s


def _check_measured(ttft_s: float, tpot_s: float) -> None:
    for name, v in (("ttft_s", ttft_s), ("tpot_s", tpot_s)):
        check_number(name, v, ">= 0 and finite (measured seconds)", lambda x: 0 <= x < math.inf)


def _ratio(target: float, got: float) -> float:
    # a measured 0 (a one-token answer has no gap between tokens) is infinitely fast, not a ZeroDivisionError
    return target / got if got else math.inf


def check_budget(budget: LatencyBudget | str, ttft_s: float, tpot_s: float) -> dict:
    """Does a measured (TTFT, TPOT) meet ``budget``? One row: each target, met or not, and the margin."""
    b = BUDGETS[budget] if isinstance(budget, str) and budget in BUDGETS else budget
    if not isinstance(b, LatencyBudget):
        raise ValueError(f"unknown budget {budget!r}; use a LatencyBudget or one of {sorted(BUDGETS)}")
    e2e = e2e_seconds(ttft_s, tpot_s, b.answer_tokens)
    ok = dict(ttft=ttft_s <= b.ttft_s, tpot=tpot_s <= b.tpot_s, e2e=e2e <= b.e2e_s)
    return dict(application=b.name, ttft_s=ttft_s, ttft_target_s=b.ttft_s, tpot_s=tpot_s,
                tpot_target_s=b.tpot_s, e2e_s=e2e, e2e_target_s=b.e2e_s,
                meets_ttft=ok["ttft"], meets_tpot=ok["tpot"], meets_e2e=ok["e2e"], meets_all=all(ok.values()),
                # > 1 means faster than needed; the tightest target sets the headroom
                headroom=min(_ratio(b.ttft_s, ttft_s), _ratio(b.tpot_s, tpot_s), _ratio(b.e2e_s, e2e)))


def budget_table(ttft_s: float, tpot_s: float, budgets: dict[str, LatencyBudget] | None = None) -> list[dict]:
    """``check_budget`` against every preset (or the given budgets)."""
    return [check_budget(b, ttft_s, tpot_s) for b in (budgets or BUDGETS).values()]


def roofline_timing(config, hw, weight_bits: float = 16, prompt_len: int = 256, context: int = 512,
                    batch: int = 1, overhead_s: float = 0.0) -> tuple[float, float]:
    """Predicted (TTFT, TPOT) on hardware ``hw`` from the roofline model of :mod:`course_lib.roofline`.

    TTFT ~ one prefill of ``prompt_len`` tokens; TPOT ~ one decode step at
    ``context`` cached tokens, through :func:`course_lib.roofline.predict` - the
    model notebook 08 checks against measurements: with a measured machine
    (:func:`course_lib.roofline.measure_machine`) the weights stream at the rate
    its GEMV achieved, and ``overhead_s`` (:func:`course_lib.roofline.measure_step_overhead`)
    adds the per-step cost the roofline leaves out. With vendor figures and no
    overhead it is a best case.
    """
    # Compute in the narrowest float type the hardware has a figure for (int weights run in bf16).
    prefs = ("bf16", "fp16", "fp32") if weight_bits <= 16 else ("fp32",)
    compute = next((d for d in prefs if d in hw.gflops), "fp32")
    pre = predict(prefill_cost(config, batch, prompt_len, weight_bits), hw, compute, overhead_s)
    dec = predict(decode_cost(config, batch, context, weight_bits), hw, compute, overhead_s)
    return pre.seconds, dec.seconds

"""Exercises of notebook 04 (hardware acceleration): a correct timing loop, and a fair comparison.

Both checks run the learner's code against a *simulated* machine - a clock that only moves when simulated
work runs - so a check takes a millisecond, gives the same verdict every time, and can stage the exact
traps real hardware sets: a slow first call, a hiccup, a device that queues work and returns at once
(a GPU), a machine that slows down halfway through (a neighbour starts a job).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable

from . import Feedback, attempt, checked, fail, ok

LAUNCH_S = 2e-6  # what queueing one call on the simulated device costs (the work runs later)


class SimulatedDevice:
    """An asynchronous device: ``work()`` queues ``durations[i]`` seconds of work, ``sync()`` waits for it."""

    def __init__(self, durations: list[float]):
        self.durations = durations
        self.now = 0.0
        self.pending = 0.0
        self.calls = 0
        self.syncs = 0
        self.reads = 0

    def clock(self) -> float:
        self.reads += 1
        return self.now

    def work(self) -> None:
        self.pending += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1
        self.now += LAUNCH_S

    def sync(self) -> None:
        self.now += self.pending
        self.pending = 0.0
        self.syncs += 1


def _timer_cases(seed: int = 4):
    rng = random.Random(seed)
    for warmup, repeat in ((2, 7), (1, 5), (3, 9)):
        d = rng.uniform(1e-3, 5e-3)
        durations = [d * rng.uniform(0.8, 1.2) for _ in range(warmup + repeat + 20)]
        durations[0] = 40 * d  # cold start: allocation, kernel choice, lazy initialisation
        durations[warmup + rng.randrange(repeat)] = 8 * d  # a hiccup during the timed calls
        yield warmup, repeat, durations


@checked
def check_timer(fn: Callable) -> Feedback:
    """``fn(work, sync, clock, warmup, repeat) -> seconds``: warm up, time ``repeat`` synchronized calls, median."""
    for warmup, repeat, durations in _timer_cases():
        dev = SimulatedDevice(durations)
        got = attempt(fn, dev.work, dev.sync, dev.clock, warmup, repeat)
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return fail(f"return the median in seconds as a number, got {got!r}")
        timed = [t + LAUNCH_S for t in durations[warmup:warmup + repeat]]  # what clock() sees around each call
        want = statistics.median(timed)
        if math.isclose(got, want, rel_tol=1e-7):
            continue
        if dev.reads == 0:
            return fail("read the time with the `clock` argument (the check passes a simulated clock; in the "
                        "notebook you pass time.perf_counter), not with a clock of your own")
        if dev.calls < warmup + repeat:
            if dev.calls == repeat:
                return fail(f"you called work {repeat} times: the first, cold call (40x slower here) was timed. "
                            f"Call it `warmup` ({warmup}) times untimed first")
            return fail(f"work was called {dev.calls} times; expected warmup + repeat = {warmup + repeat}")
        if got < 10 * LAUNCH_S:
            return fail(f"{got * 1e3:.4f} ms is the time to *queue* the work, not to do it: the device runs "
                        "asynchronously (like a GPU). Call sync() before reading the clock at the end of each call")
        leftover = [sum(durations[:warmup]) + timed[0]] + timed[1:]  # no sync after the warm-up
        if math.isclose(got, statistics.median(leftover), rel_tol=1e-7):
            return fail("call sync() after the warm-up too: its queued work landed in your first timed sample")
        if math.isclose(got, want * 1e3, rel_tol=1e-7):
            return fail("that is milliseconds: return seconds")
        if math.isclose(got, statistics.fmean(timed), rel_tol=1e-7):
            return fail("that is the mean: the one hiccup among the timed calls pulls it up. Report the median")
        if math.isclose(got, min(timed), rel_tol=1e-7):
            return fail("that is the fastest sample, a lucky one: report the median, the typical call")
        if math.isclose(got, sum(timed), rel_tol=1e-7):
            return fail(f"that is the total of the {repeat} timed calls: report the median of the samples")
        return fail(f"expected the median of the {repeat} timed calls, {want * 1e3:.3f} ms; got {got * 1e3:.3f} ms. "
                    "Per call: t0 = clock(); work(); sync(); sample = clock() - t0")
    return ok("Correct: warm-up calls untimed, every sample synchronized, the median reported - the three things "
              "course_lib.timing.benchmark does.")


class DriftingMachine:
    """A CPU-like machine (no queue) that slows down steadily, to a third of its speed by the last call."""

    def __init__(self, costs: dict[str, float], total_calls: int, slowdown: float = 3.0):
        self.costs = costs
        self.total_calls = total_calls
        self.slowdown = slowdown
        self.now = 0.0
        self.calls = dict.fromkeys(costs, 0)
        self.reads = 0

    def clock(self) -> float:
        self.reads += 1
        return self.now

    def fn(self, name: str) -> Callable[[], None]:
        def run() -> None:
            done = min(sum(self.calls.values()), self.total_calls)
            factor = 1.0 + (self.slowdown - 1.0) * done / self.total_calls  # a neighbour's job ramps up
            first = 5.0 if self.calls[name] == 0 else 1.0  # a cold first call
            self.now += self.costs[name] * factor * first
            self.calls[name] += 1

        run.__name__ = name
        return run


@checked
def check_compare(fn: Callable) -> Feedback:
    """``fn(fns, clock, rounds) -> {name: median seconds}``: time several functions interleaved, round by round."""
    for costs, rounds in (({"a": 2e-3, "b": 1e-3}, 9), ({"fp32": 3e-3, "bf16": 1.5e-3, "int8": 1e-3}, 7)):
        machine = DriftingMachine(costs, total_calls=len(costs) * (rounds + 1))
        fns = {name: machine.fn(name) for name in costs}
        got = attempt(fn, fns, machine.clock, rounds)
        if not isinstance(got, dict) or set(got) != set(costs):
            return fail(f"return a dict with one median per name {sorted(costs)}, got {got!r}")
        if machine.reads == 0:
            return fail("read the time with the `clock` argument (the check passes a simulated clock), "
                        "not with a clock of your own")
        if min(machine.calls.values()) < rounds:
            return fail(f"each function should run at least `rounds` = {rounds} times; counts: {machine.calls}")
        try:
            medians = {k: float(v) for k, v in got.items()}
        except (TypeError, ValueError):
            return fail(f"the values should be seconds (numbers), got {got!r}")
        if any(not v > 0 for v in medians.values()):
            return fail(f"every median must be a positive time in seconds, got {medians}")
        names = list(costs)
        base = names[0]
        for other in names[1:]:
            true_ratio = costs[base] / costs[other]
            ratio = medians[base] / medians[other]
            if abs(ratio / true_ratio - 1) > 0.15:
                return fail(f"your medians say {base} takes {ratio:.2f}x the time of {other}; on a steady machine "
                            f"it is {true_ratio:.2f}x. This machine slows down while you measure (another job is "
                            "starting): timed one after the other, one function got the fast start and the other "
                            "the slow end. Interleave: each round, call every function once")
    return ok("Correct: interleaved, every function saw the slowdown alike, so the ratios held - what "
              "course_lib.timing.compare does before speed_verdict calls a difference real.")

"""Timing statistics measured against functions of known duration."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from course_lib import timing
from course_lib.timing import (
    BenchResult,
    benchmark,
    first_call_cost,
    interleaved,
    quantile,
    supported_dtypes,
    thread_scaling,
    time_once,
    time_tokens,
    torch_timer_median,
)
from tests.conftest import requires_cuda

TARGET = 0.020  # seconds

# The functions timed here busy-wait for a known duration and also record how long each call
# really took by their own clock. On a loaded machine the OS may preempt a call and stretch it;
# a correct timer must then report the stretched time, so we compare against the recorded time
# (within a few percent) and against the nominal duration only from below.


class KnownWork:
    """Busy-wait ``seconds`` per call (the first call ``first_factor`` times longer); record each call."""

    def __init__(self, seconds: float = TARGET, first_factor: float = 1.0):
        self.seconds, self.first_factor, self.durations = seconds, first_factor, []

    def __call__(self) -> None:
        t0 = time.perf_counter()
        end = t0 + self.seconds * (self.first_factor if not self.durations else 1.0)
        while time.perf_counter() < end:
            pass
        self.durations.append(time.perf_counter() - t0)


def test_benchmark_measures_known_duration():
    work = KnownWork()
    res = benchmark(work, warmup=1, repeat=7)
    assert isinstance(res, BenchResult)
    assert res.count == 7 and len(res.times) == 7 and res.method == "perf_counter"
    assert len(work.durations) == 8  # warm-up + repeats
    for measured, real in zip(res.times, work.durations[1:]):  # warm-up calls are not in the times
        assert measured == pytest.approx(real, rel=0.03)
    assert res.p10 >= TARGET  # a busy wait cannot finish early
    assert res.median == pytest.approx(statistics.median(work.durations[1:]), rel=0.03)
    assert res.p10 <= res.median <= res.p90


def test_benchmark_sleep_is_never_shorter_than_asked():
    res = benchmark(lambda: time.sleep(TARGET), warmup=0, repeat=5)
    assert res.p10 >= TARGET and res.median < 10 * TARGET


def test_quantiles_from_known_samples():
    res = BenchResult.from_times([5.0, 1.0, 4.0, 2.0, 3.0], "perf_counter")
    assert res.median == 3.0 and res.p10 == pytest.approx(1.4) and res.p90 == pytest.approx(4.6)
    assert res.mean == 3.0 and res.count == 5
    assert "median 3000.000 ms" in str(res)


def test_benchmark_counts_warmup_and_repeat_calls():
    calls = []
    benchmark(lambda: calls.append(1), warmup=2, repeat=4)
    assert len(calls) == 6
    with pytest.raises(ValueError, match="repeat"):
        benchmark(lambda: None, repeat=0)
    with pytest.raises(ValueError, match="warmup"):
        benchmark(lambda: None, warmup=-1)


def test_time_once_and_first_call_cost():
    work = KnownWork()
    assert time_once(work) == pytest.approx(work.durations[-1], rel=0.03)
    made = []

    def make():
        made.append(KnownWork(first_factor=3.0))  # a function whose first call is 3x dearer
        return made[-1]

    out = first_call_cost(make, repeat=3)
    work = made[0]
    assert out["first_s"] == pytest.approx(work.durations[0], rel=0.03)
    assert out["first_s"] >= 3 * TARGET
    assert out["steady_median_s"] == pytest.approx(statistics.median(work.durations[2:]), rel=0.03)
    assert out["ratio"] == pytest.approx(out["first_s"] / out["steady_median_s"])


def test_torch_timer_agrees_on_known_work():
    work = KnownWork()
    t = torch_timer_median(work, min_run_time=0.2)
    # Timer reports per-call means of blocks of calls: it must lie between the fastest and the
    # slowest call it made (a per-block total, or a missed division, would not).
    assert min(work.durations) >= TARGET  # KnownWork spins for at least TARGET
    assert min(work.durations) * 0.99 <= t <= max(work.durations) * 1.03


def test_thread_scaling_restores_threads():
    before = torch.get_num_threads()
    work = KnownWork()
    rows = thread_scaling(work, [1, 2], warmup=0, repeat=3)
    assert [r["threads"] for r in rows] == [1, 2]
    for r, real in zip(rows, (work.durations[:3], work.durations[3:])):
        assert r["median_s"] == pytest.approx(statistics.median(real), rel=0.03)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        thread_scaling(work, [0])


def test_supported_dtypes_on_cpu():
    assert supported_dtypes("cpu")["fp32"] is True


@pytest.mark.gpu
@requires_cuda
def test_cuda_events_measure_known_gpu_work():
    """torch.cuda._sleep spins the GPU for a number of cycles; events must see it, perf_counter without sync not."""
    dev = torch.device("cuda")
    cycles = int(torch.cuda.get_device_properties(dev).clock_rate * 1e3 * TARGET)  # clock_rate is in kHz
    res = benchmark(lambda: torch.cuda._sleep(cycles), warmup=1, repeat=5, device=dev)
    assert res.method == "cuda-events"
    assert res.median == pytest.approx(TARGET, rel=0.25)  # the clock may boost: a loose bound
    launch_only = time_once(lambda: torch.cuda._sleep(cycles), sync=False, device=dev)
    torch.cuda.synchronize()
    assert launch_only < res.median / 2


@pytest.mark.parametrize("bad", [dict(repeat=True), dict(repeat=0), dict(repeat=2.5), dict(repeat="3"),
                                 dict(warmup=-1), dict(warmup=False), dict(warmup=1.0), dict(warmup=None)])
def test_benchmark_refuses_bad_counts(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):  # repeat=True used to run once, silently
        benchmark(lambda: None, **bad)


def test_benchmark_refuses_what_is_not_a_function():
    with pytest.raises(ValueError, match="callable"):
        benchmark(3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("timer", [lambda d: benchmark(lambda: None, device=d),
                                   lambda d: time_once(lambda: None, device=d),
                                   lambda d: first_call_cost(lambda: (lambda: None), device=d)])
def test_cuda_without_gpu_is_a_clear_error(timer):
    for device in ("cuda", torch.device("cuda:0")):  # was "RuntimeError: Tried to instantiate dummy base class Event"
        with pytest.raises(ValueError, match="no CUDA GPU"):
            timer(device)


@requires_cuda
def test_cuda_index_past_the_last_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA GPU"):
        benchmark(lambda: None, device=f"cuda:{torch.cuda.device_count()}")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="cpu"):
        benchmark(lambda: None, device="gpu")


def test_other_timers_check_their_counts():
    with pytest.raises(ValueError, match="threads"):
        thread_scaling(lambda: None, [True])
    for n in (1, True, 2.5):  # n = 1 has no decode step: it reported 0 tokens/s
        with pytest.raises(ValueError, match="n must"):
            time_tokens(lambda p, k: None, torch.tensor([[1, 2]]), n)


def test_compare_times_interleaved_and_verdict_reads_the_spread():
    from course_lib.timing import BenchResult, compare, speed_verdict

    order = []
    res = compare({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, warmup=1)
    assert order == ["a", "b"] * 4  # warm-up round, then interleaved rounds
    assert set(res) == {"a", "b"} and all(r.count == 3 for r in res.values())
    fast = BenchResult.from_times([1.0, 1.1, 1.2], "perf_counter")
    slow = BenchResult.from_times([2.0, 2.1, 2.2], "perf_counter")
    assert speed_verdict(("x", fast), ("y", slow)).startswith("x is 1.91x faster than y")
    assert "slower" in speed_verdict(("y", slow), ("x", fast))
    close = BenchResult.from_times([1.05, 1.5, 2.1], "perf_counter")
    assert speed_verdict(("x", fast), ("z", close)).startswith("no measurable difference here")
    import pytest
    with pytest.raises(ValueError, match="non-empty dict"):
        compare({})
    with pytest.raises(ValueError):
        compare({"a": lambda: None}, rounds=0)



def test_interleaved_prepares_warms_up_then_calls_round_after_round():
    order = []

    def entry(name):
        def call():
            order.append(name)
            return len(order)
        return call

    res = interleaved({"a": entry("a"), "b": entry("b")}, rounds=2, warmup=1, timed=False,
                      prepare={"b": lambda: order.append("prep b") or "built"})
    assert order == ["prep b", "a", "b", "a", "b", "a", "b"]
    assert res.samples == {"a": (4, 6), "b": (5, 7)} and res.prepared == {"b": "built"} and not res.errors
    assert res.method == "returned" and res.result("b", lambda v: v * 2, "perf_counter").median == 12
    work = {"x": KnownWork(0.010), "y": KnownWork(0.020)}
    timed = interleaved(work, rounds=3, warmup=1)
    assert timed.method == "perf_counter"
    for name, w in work.items():  # the warm-up call is not a sample; every sample is the call's own duration
        assert len(w.durations) == 4 and timed.result(name).count == 3
        for measured, real in zip(timed.samples[name], w.durations[1:]):
            assert measured == pytest.approx(real, rel=0.03)
    assert interleaved({}, rounds=1).samples == {}


def test_interleaved_keeps_one_entry_s_error_and_the_others_samples():
    calls = {"ok": 0, "bad": 0}

    def ok():
        calls["ok"] += 1
        return 1.0

    def bad():
        calls["bad"] += 1
        if calls["bad"] == 3:  # warm-up and the first round pass, the second round fails
            raise RuntimeError("kernel exploded\nsecond line")
        return 2.0

    with pytest.raises(RuntimeError, match="exploded"):  # by default a failure ends the measurement
        interleaved({"ok": ok, "bad": bad}, rounds=3, timed=False)
    calls.update(ok=0, bad=0)
    res = interleaved({"ok": ok, "bad": bad}, rounds=3, timed=False, keep_errors=True)
    assert res.errors == {"bad": "RuntimeError: kernel exploded"} and res.samples == {"ok": (1.0, 1.0, 1.0)}
    assert calls == {"ok": 4, "bad": 3}  # bad is not called after it failed
    res = interleaved({"ok": ok}, rounds=1, timed=False, keep_errors=True, prepare={"ok": lambda: 1 / 0})
    assert res.errors == {"ok": "ZeroDivisionError: division by zero"} and res.samples == {}


def test_interleaved_drops_slow_entries_after_round_one_and_repeats_fast_calls():
    seen = []
    res = interleaved({"fast": lambda: seen.append("fast") or 1.0, "slow": lambda: seen.append("slow") or 5.0},
                      rounds=3, warmup=0, timed=False, drop_slower=2.0)
    assert res.samples == {"fast": (1.0, 1.0, 1.0), "slow": (5.0,)} and seen.count("slow") == 1
    work = KnownWork(0.001)
    res = interleaved({"w": work}, rounds=2, warmup=1, min_sample_s=0.01)
    per_sample = (len(work.durations) - 2) // 2  # warm-up, one call that sets the count, then 2 samples
    assert 1 <= per_sample <= 10 and len(work.durations) == 2 + 2 * per_sample
    assert all(t >= 0.001 for t in res.samples["w"])  # seconds per call, not per sample
    for bad, match in ((dict(rounds=0), "rounds"), (dict(warmup=-1), "warmup"), (dict(min_sample_s=2), "min_sample"),
                       (dict(drop_slower=0.5), "drop_slower"), (dict(prepare={"zz": print}), "prepare")):
        with pytest.raises(ValueError, match=match):
            interleaved({"w": work}, **{"rounds": 1, **bad})
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and quantile([7.0], 0.9) == 7.0


def test_busy_check_flags_threads_that_stall_and_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    # measured on 2 shared cores: a 4 MB copy 0.09 ms with 1 thread, 11 ms with 2
    monkeypatch.setattr(timing, "_probe_times", lambda threads, rounds: (0.09e-3, 11e-3))
    check = timing.busy_check()
    assert check.busy and check.ratio == pytest.approx(11 / 0.09)
    text = str(check)
    assert text.startswith("BUSY MACHINE") and "with 2" in text
    assert "Close other work" in text and "torch.set_num_threads(1)" in text


def test_busy_check_calls_an_idle_machine_quiet(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(timing, "_probe_times", lambda threads, rounds: (0.09e-3, 0.06e-3))
    check = timing.busy_check()
    assert not check.busy and str(check).startswith("quiet")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one thread has nobody to wait for
    assert not timing.busy_check().busy


def test_busy_check_measures_and_restores_the_thread_count():
    old = torch.get_num_threads()
    check = timing.busy_check(rounds=3)
    assert torch.get_num_threads() == old
    assert check.threads == old and 0 < check.one_thread_s < 1 and 0 < check.all_threads_s < 1
    with pytest.raises(ValueError, match="rounds"):
        timing.busy_check(rounds=0)

"""Honest timing: warm-up, synchronize, many samples, median and spread.

Three classic mistakes make speed numbers lie:

1. **no warm-up** - the first call pays for memory allocation, kernel
   selection, lazy initialisation (and compilation, with ``torch.compile``);
2. **no synchronize** - a GPU runs asynchronously: ``time.perf_counter()``
   around a CUDA call measures how long it took to *queue* the work. CUDA
   events recorded on the stream measure the work itself;
3. **one sample** - timings are noisy; report the median and a spread
   (p10 / p90), not the best or a single run.

``benchmark`` avoids all three. ``interleaved`` is the course's one comparison loop: several entries, round
after round (a, b, c, a, b, c, ...), with warm-up, device sync, errors kept per entry and every sample kept;
every measuring module runs on it (``compare`` times plain functions with it) and ``speed_verdict`` says
whether a difference is more than the spread. ``time_tokens`` turns a generator into (TTFT, tokens/s) and
``GenerationTiming`` / ``stream_timing`` hold what a user of a chat model feels. ``busy_check`` measures
whether other work on the machine stalls torch's threads, which makes every multi-threaded timing meaningless.

This module is a leaf: it imports torch, the standard library and course_lib's ``_checks`` / ``device`` only,
never a model or a decode loop, so anything may time itself with it. The decode-speed experiments that run
models (``time_generation``, ``decode_speed``, ``measure_decode_step``) live above it, in
:mod:`course_lib.decode_speed`.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ._checks import check_int as _check_count  # a bool is refused: repeat=True is a slip, not a 1
from .device import pick_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchResult:
    """Seconds per call of a timed function."""

    times: tuple[float, ...] = field(repr=False)
    median: float
    p10: float
    p90: float
    mean: float
    count: int
    method: str  # "cuda-events" or "perf_counter"

    @classmethod
    def from_times(cls, times: list[float], method: str) -> BenchResult:
        s = sorted(times)
        return cls(tuple(times), statistics.median(s), quantile(s, 0.1), quantile(s, 0.9),
                   statistics.fmean(s), len(s), method)

    def __str__(self) -> str:
        return (f"median {self.median * 1e3:.3f} ms (p10 {self.p10 * 1e3:.3f}, "
                f"p90 {self.p90 * 1e3:.3f}, n={self.count}, {self.method})")


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (``q`` in [0, 1]) of an already sorted, non-empty sequence."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for queued work on an asynchronous device (no-op on CPU)."""
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(dev)
    elif dev is not None and dev.type == "mps":
        torch.mps.synchronize()


def _timing_device(device: str | torch.device | None) -> torch.device:
    """The device to time on (None = CPU), refused with a ValueError when this machine does not have it.

    Without the check, ``device="cuda"`` on a machine without a GPU fails deep in torch ("Tried to
    instantiate dummy base class Event"). :mod:`course_lib.device` depends on torch only, so timing stays a leaf.
    """
    return torch.device("cpu") if device is None else pick_device(device)


MAX_CALLS_PER_SAMPLE = 100  # min_sample_s repeats a fast call at most this often per sample


def error_text(e: BaseException) -> str:
    """``"TypeName: first line of the message"`` (200 characters at most): how a kept error is reported."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


@dataclass(frozen=True)
class Rounds:
    """What :func:`interleaved` measured: each entry's samples in round order, and the entries that failed."""

    samples: dict[Hashable, tuple]  # name -> one sample per round: seconds per call, or what the entry returned
    errors: dict[Hashable, str]  # name -> error_text of the call that raised (the entry's samples are dropped)
    prepared: dict[Hashable, object]  # name -> what the entry's ``prepare`` call returned
    method: str  # "perf_counter" (interleaved timed each call) or "returned" (each entry measured itself)

    def result(self, name: Hashable, value: Callable[[object], float] | None = None,
               method: str | None = None) -> BenchResult:
        """Median and p10 / p90 of one entry's samples; ``value`` picks the number out of a sample that is not one."""
        values = [value(s) for s in self.samples[name]] if value else list(self.samples[name])
        return BenchResult.from_times(values, method or self.method)


def _seconds(fn: Callable[[], object], calls: int, dev: torch.device) -> float:
    """Seconds per call of ``calls`` calls of ``fn``, the device synchronized before and after."""
    synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(dev)
    return (time.perf_counter() - t0) / calls


def interleaved(entries: dict[Hashable, Callable[[], object]], rounds: int, *, warmup: int = 1,
                prepare: dict[Hashable, Callable[[], object]] | None = None, timed: bool = True,
                device: str | torch.device | None = None, min_sample_s: float = 0.0,
                drop_slower: float | None = None, keep_errors: bool = False,
                progress: Callable[[Iterable, str], Iterable] | None = None) -> Rounds:
    """Call every entry once per round, round after round (a, b, c, a, b, c, ...): the course's comparison loop.

    A drift of the machine (another job, a clock change) then lands on every entry alike, so their ratios hold
    where absolute numbers do not. In order: each entry's ``prepare`` call once (build, compile; what it returns
    is kept in ``prepared``), ``warmup`` untimed rounds of the entries themselves, then ``rounds`` rounds.

    * ``timed=True``: a sample is the seconds of a call, ``device`` synchronized before and after. With
      ``min_sample_s`` a fast call is repeated until a sample takes about that long (the count is set by one
      more timed call after the warm-up) and the sample is the seconds per call.
      ``timed=False``: a sample is what the call returns (an entry that measures itself: tokens/s, a report).
    * ``drop_slower``: after the first round, entries slower than this many times the fastest keep that one
      sample and are not called again (numeric samples).
    * ``keep_errors``: an entry whose call raises leaves the remaining rounds with its message in ``errors`` and
      its samples dropped; the others go on. Otherwise the exception ends the whole measurement.
    * ``progress(iterable, "warm-up" | "rounds")`` wraps the two loops (a progress bar).

    No grad mode is set here: the caller chooses (inference mode for plain functions, no_grad for kernels).
    """
    if not isinstance(entries, dict) or not all(callable(f) for f in entries.values()):
        raise ValueError("entries must be a dict {name: callable taking no arguments} (none: nothing measured)")
    prepare = prepare or {}
    if not isinstance(prepare, dict) or set(prepare) - set(entries) or not all(map(callable, prepare.values())):
        raise ValueError("prepare must be a dict {name: callable} whose names are among the entries' names")
    _check_count("rounds", rounds, 1)
    _check_count("warmup", warmup, 0)
    if not (isinstance(min_sample_s, (int, float)) and 0 <= min_sample_s < 1):
        raise ValueError(f"min_sample_s must be seconds in [0, 1) (0: one call per sample), got {min_sample_s!r}")
    if drop_slower is not None and not (isinstance(drop_slower, (int, float)) and drop_slower >= 1):
        raise ValueError(f"drop_slower must be a factor >= 1 (e.g. 2.0), or None to time every entry, "
                         f"got {drop_slower!r}")
    dev = _timing_device(device)
    wrap = progress or (lambda it, _what: it)
    live = list(entries)
    samples: dict[Hashable, list] = {name: [] for name in entries}
    errors: dict[Hashable, str] = {}
    prepared: dict[Hashable, object] = {}
    calls = dict.fromkeys(entries, 1)

    def attempt(name: Hashable, fn: Callable[[], object], keep: Callable[[object], object] | None = None) -> None:
        try:
            out = fn()
        except Exception as e:
            if not keep_errors:
                raise
            errors[name] = error_text(e)
            log.warning("%s failed: %s", name, errors[name])
            live.remove(name)
            return
        if keep is not None:
            keep(out)

    def calibrate(name: Hashable, seconds: float) -> None:
        calls[name] = max(1, min(MAX_CALLS_PER_SAMPLE, int(min_sample_s / max(seconds, 1e-7))))

    def sample(name: Hashable) -> Callable[[], object]:
        return functools.partial(_seconds, entries[name], calls[name], dev) if timed else entries[name]

    for name in wrap(list(live), "warm-up"):
        if name in prepare:
            attempt(name, prepare[name], functools.partial(prepared.__setitem__, name))
    for _ in range(warmup):
        for name in list(live):
            attempt(name, entries[name])
    if timed and min_sample_s:  # one timed call says how many calls make a sample of about min_sample_s
        for name in list(live):
            attempt(name, sample(name), functools.partial(calibrate, name))
    for r in wrap(range(rounds), "rounds"):
        for name in list(live):
            attempt(name, sample(name), samples[name].append)
        if r == 0 and drop_slower is not None and len(live) > 1:
            best = min(samples[name][0] for name in live)
            live[:] = [name for name in live if samples[name][0] <= drop_slower * best]
    return Rounds({name: tuple(s) for name, s in samples.items() if name not in errors}, errors, prepared,
                  "perf_counter" if timed else "returned")


def benchmark(fn: Callable[[], object], warmup: int = 3, repeat: int = 10,
              device: str | torch.device | None = None) -> BenchResult:
    """Time ``fn()`` ``repeat`` times after ``warmup`` untimed calls, under inference mode.

    On a CUDA ``device`` each call is timed with CUDA events; otherwise with
    ``time.perf_counter`` (after synchronizing, so queued work is counted).
    """
    if not callable(fn):
        raise ValueError(f"fn must be a callable taking no arguments (e.g. lambda: model(x)), got {fn!r}")
    _check_count("warmup", warmup, 0)
    _check_count("repeat", repeat, 1)
    dev = _timing_device(device)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        synchronize(dev)
        if dev.type == "cuda":
            for _ in range(repeat):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return BenchResult.from_times(times, "cuda-events")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            synchronize(dev)
            times.append(time.perf_counter() - t0)
    return BenchResult.from_times(times, "perf_counter")


def compare(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1,
            device: str | torch.device | None = None) -> dict[str, BenchResult]:
    """Time several functions **interleaved** (a, b, c, a, b, c, ...): one :class:`BenchResult` each.

    Interleaving puts a change in the machine's state (another job, a clock change) on every
    function alike, so their ratio means something even on a shared machine.
    """
    if not isinstance(fns, dict) or not fns or not all(callable(f) for f in fns.values()):
        raise ValueError("fns must be a non-empty dict {name: callable taking no arguments}")
    with torch.inference_mode():
        res = interleaved(fns, rounds, warmup=warmup, device=device)
    return {name: res.result(name) for name in fns}


def speed_verdict(fast: tuple[str, BenchResult], slow: tuple[str, BenchResult]) -> str:
    """One sentence a notebook can print: the measured speed-up, or "no measurable difference here".

    A difference counts only when the p10-p90 ranges of the two timings do not overlap; otherwise
    the ratio of medians is noise on this machine and the sentence says so, with both spreads.
    """
    (na, a), (nb, b) = fast, slow
    spread = (f"{na}: median {a.median * 1e3:.2f} ms (p10-p90 {a.p10 * 1e3:.2f}-{a.p90 * 1e3:.2f}), "
              f"{nb}: {b.median * 1e3:.2f} ms ({b.p10 * 1e3:.2f}-{b.p90 * 1e3:.2f}), {min(a.count, b.count)} samples")
    if a.p90 < b.p10:
        return f"{na} is {b.median / a.median:.2f}x faster than {nb} here ({spread})"
    if b.p90 < a.p10:
        return f"{na} is {a.median / b.median:.2f}x slower than {nb} here ({spread})"
    return f"no measurable difference here between {na} and {nb} (the spreads overlap; {spread})"


@dataclass(frozen=True)
class GenerationTiming:
    """What a user of a streaming chat model feels."""

    ttft_s: float  # time to first token: the prompt's prefill plus one sampling step
    tpot_s: float  # time per output token after the first (median gap)
    tokens_per_s: float  # decode speed: 1 / tpot
    new_tokens: int
    total_s: float
    prompt_tokens: int
    token_times: tuple[float, ...] = field(repr=False)  # seconds from start, one per token


def time_tokens(gen: Callable[[torch.Tensor, int], object], prompt: torch.Tensor, n: int,
                device: str | torch.device | None = None, repeat: int = 1, warmup: int = 0) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s) of a greedy generator ``gen(prompt, n)``.

    Times 1 token (prefill and the first token), then ``n``: the difference is ``n - 1`` decode steps, for a
    generator that cannot report each token as it comes (a compiled loop, ``model.generate``).
    """
    _check_count("n", n, 2)  # n = 1 has no decode step to time: it would report 0 tokens/s
    first = benchmark(lambda: gen(prompt, 1), warmup=warmup, repeat=repeat, device=device).median
    total = benchmark(lambda: gen(prompt, n), warmup=0, repeat=repeat, device=device).median
    return first, (n - 1) / max(total - first, 1e-9)


# --- the wrong ways, kept so notebooks can show them side by side -----------------

def time_once(fn: Callable[[], object], sync: bool = True, device: str | torch.device | None = None) -> float:
    """One ``perf_counter`` sample of ``fn()``: no warm-up, and no synchronize if ``sync=False``.

    This is how timing usually goes wrong. On a GPU with ``sync=False`` it
    measures how long the launch took, not the work.
    """
    dev = _timing_device(device)
    with torch.inference_mode():
        if sync:
            synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if sync:
            synchronize(dev)
        return time.perf_counter() - t0


def first_call_cost(make_fn: Callable[[], Callable[[], object]], repeat: int = 5,
                    device: str | torch.device | None = None) -> dict:
    """Time the first call of a freshly built ``fn`` against its steady state.

    ``make_fn`` builds the function from scratch (new tensors, a new model...),
    so the first call pays for allocation, lazy initialisation, kernel choice.
    """
    fn = make_fn()
    first = time_once(fn, sync=True, device=device)
    steady = benchmark(fn, warmup=1, repeat=repeat, device=device)
    return {"first_s": first, "steady_median_s": steady.median, "ratio": first / steady.median}


def thread_scaling(fn: Callable[[], object], threads: list[int], warmup: int = 2, repeat: int = 5) -> list[dict]:
    """Median time of ``fn`` for each CPU thread count (the old thread count is restored)."""
    if (not isinstance(threads, (list, tuple)) or not threads
            or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in threads)):
        raise ValueError(f"threads must be a non-empty list of positive ints, got {threads!r}")
    old = torch.get_num_threads()
    rows = []
    try:
        for n in threads:
            torch.set_num_threads(n)
            res = benchmark(fn, warmup=warmup, repeat=repeat, device="cpu")  # CPU threads: CPU work
            rows.append({"threads": n, "median_s": res.median, "p10_s": res.p10, "p90_s": res.p90})
    finally:
        torch.set_num_threads(old)
    return rows


def torch_timer_median(fn: Callable[[], object], min_run_time: float = 1.0,
                       num_threads: int | None = None) -> float:
    """Median seconds per call according to ``torch.utils.benchmark.Timer`` (an independent referee)."""
    from torch.utils import benchmark as tb

    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=num_threads or torch.get_num_threads())
    with torch.inference_mode():
        return timer.blocked_autorange(min_run_time=min_run_time).median


def supported_dtypes(device: str | torch.device = "cpu") -> dict[str, bool]:
    """Which of fp32 / bf16 / fp16 can run a matmul on ``device`` (tried, not guessed)."""
    dev = torch.device(device)
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        try:
            a = torch.ones(8, 8, device=dev, dtype=dt)
            (a @ a).sum().item()
            out[name] = True
        except (RuntimeError, TypeError):
            out[name] = False
    return out


def stream_timing(token_times: Sequence[float], prompt_tokens: int) -> GenerationTiming:
    """TTFT and TPOT of *one* streamed answer, from each token's seconds since the call started.

    For a real answer as a user saw it (no warm-up, no repeats; :func:`course_lib.decode_speed.time_generation`
    measures those).
    With a single token there is no decode gap: TPOT and tokens/s are NaN.
    """
    if not token_times:
        raise ValueError("no tokens were generated: nothing to time")
    times = tuple(float(t) for t in token_times)
    gaps = [b - a for a, b in zip(times, times[1:])]
    tpot = statistics.median(gaps) if gaps else float("nan")
    rate = 1.0 / tpot if gaps and tpot > 0 else float("nan")
    return GenerationTiming(ttft_s=times[0], tpot_s=tpot, tokens_per_s=rate, new_tokens=len(times),
                            total_s=times[-1], prompt_tokens=prompt_tokens, token_times=times)


# --- is the machine busy? -------------------------------------------------------------

# A multi-threaded torch op ends when its slowest thread does. When other processes hold the cores, one thread
# waits for a time slice (milliseconds) at every parallel region, so the op runs many times slower than with one
# thread (docs/decode.md, "A busy machine", has the measurement). An idle machine gives a ratio near or below 1.
BUSY_RATIO = 3.0
PROBE_FLOATS = 1 << 20  # a 4 MB copy: large enough that ATen splits it over the threads, quick enough to repeat


def _probe_times(threads: int, rounds: int) -> tuple[float, float]:
    """Median seconds of a 4 MB tensor copy with 1 thread and with ``threads`` threads, interleaved.

    The median, not the mean: a stall at most calls is the machine's state, a stall at one call is not.
    """
    src, dst = torch.ones(PROBE_FLOATS), torch.empty(PROBE_FLOATS)
    old = torch.get_num_threads()

    def copy_with(n: int) -> float:
        torch.set_num_threads(n)
        t0 = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t0

    try:  # the warm-up round runs both thread counts once
        res = interleaved({n: functools.partial(copy_with, n) for n in (1, threads)}, rounds, timed=False)
    finally:
        torch.set_num_threads(old)
    return res.result(1).median, res.result(threads).median


@dataclass(frozen=True)
class BusyCheck:
    """How much other work on this machine stalls torch's threads, measured (see :func:`busy_check`)."""

    threads: int
    one_thread_s: float
    all_threads_s: float
    load_per_core: float | None  # the 1-minute load average over the cores (None where the OS has none)

    @property
    def ratio(self) -> float:
        return self.all_threads_s / self.one_thread_s

    @property
    def busy(self) -> bool:
        return self.threads > 1 and self.ratio >= BUSY_RATIO

    def __str__(self) -> str:
        load = f"; load average {self.load_per_core:.1f} per core" if self.load_per_core is not None else ""
        if self.threads == 1:
            return (f"torch runs 1 thread: no thread waits for another "
                    f"(a 4 MB copy took {self.one_thread_s * 1e3:.3f} ms{load})")
        probe = (f"a 4 MB copy took {self.one_thread_s * 1e3:.3f} ms with 1 thread and "
                 f"{self.all_threads_s * 1e3:.3f} ms with {self.threads} ({self.ratio:.1f}x){load}")
        if not self.busy:
            return f"quiet: torch's {self.threads} threads run together ({probe})"
        return (f"BUSY MACHINE: {probe}. Other processes hold the cores, so every multi-threaded torch operation "
                f"waits for its slowest thread: timings with {self.threads} threads come out several times too "
                f"slow and small ops (attention, copies, norms) look far more expensive than they are. Close "
                f"other work, or run torch.set_num_threads(1) before timing.")


def busy_check(rounds: int = 15) -> BusyCheck:
    """Time a small multi-threaded op with 1 thread and with torch's thread count, interleaved.

    On an idle machine more threads are as fast or faster; a ratio of ``BUSY_RATIO`` or more means the threads
    stall behind other processes, and timings taken with them measure the machine's load.
    """
    _check_count("rounds", rounds, 1)
    threads = torch.get_num_threads()
    one, many = _probe_times(threads, rounds)  # with 1 thread both are the same samples
    load = os.getloadavg()[0] / (os.cpu_count() or 1) if hasattr(os, "getloadavg") else None
    return BusyCheck(threads, one, many, load)

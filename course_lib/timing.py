"""Honest timing: warm-up, synchronize, many samples, median and spread.

Three classic mistakes make speed numbers lie:

1. **no warm-up** - the first call pays for memory allocation, kernel
   selection, lazy initialisation (and compilation, with ``torch.compile``);
2. **no synchronize** - a GPU runs asynchronously: ``time.perf_counter()``
   around a CUDA call measures how long it took to *queue* the work. CUDA
   events recorded on the stream measure the work itself;
3. **one sample** - timings are noisy; report the median and a spread
   (p10 / p90), not the best or a single run.

``benchmark`` avoids all three. ``time_generation`` measures what a user of a
chat model feels: time to first token and time per output token.
``decode_speed`` compares several models fairly: interleaved, round after round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ._checks import check_int as _check_count  # a bool is refused: repeat=True is a slip, not a 1
from .device import device_of, pick_device


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
        return cls(tuple(times), statistics.median(s), _quantile(s, 0.1), _quantile(s, 0.9),
                   statistics.fmean(s), len(s), method)

    def __str__(self) -> str:
        return (f"median {self.median * 1e3:.3f} ms (p10 {self.p10 * 1e3:.3f}, "
                f"p90 {self.p90 * 1e3:.3f}, n={self.count}, {self.method})")


def _quantile(sorted_times: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    if len(sorted_times) == 1:
        return sorted_times[0]
    pos = q * (len(sorted_times) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_times) - 1)
    return sorted_times[lo] + (sorted_times[hi] - sorted_times[lo]) * (pos - lo)


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
    _check_count("rounds", rounds, 1)
    _check_count("warmup", warmup, 0)
    dev = _timing_device(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(time_once(fn, device=dev))
    # time_once synchronizes around each call, so perf_counter counts the queued GPU work too
    return {name: BenchResult.from_times(t, "perf_counter") for name, t in times.items()}


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


def time_generation(model, tokenizer, prompt: str | torch.Tensor, max_new_tokens: int = 32,
                    warmup: int = 1, repeat: int = 3, generate_fn=None) -> GenerationTiming:
    """Greedy-generate ``max_new_tokens`` and time each token as it is produced.

    ``generate_fn`` is a streaming generator like :func:`course_lib.generation.stream_generate`
    (the default); the median over ``repeat`` runs of TTFT and TPOT is reported.
    """
    from .generation import stream_generate

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be an int >= 2 to time the decode phase, got {max_new_tokens!r}")
    _check_count("warmup", warmup, 0)
    _check_count("repeat", repeat, 1)
    gen = generate_fn or stream_generate
    device = device_of(model)
    runs = []
    for i in range(warmup + repeat):
        stamps: list[float] = []
        synchronize(device)
        t0 = time.perf_counter()
        n_prompt = 0
        for step in gen(model, tokenizer, prompt, max_new_tokens=max_new_tokens, stop_at_eos=False):
            synchronize(device)  # the token must exist before we stamp it
            stamps.append(time.perf_counter() - t0)
            n_prompt = step.prompt_tokens
        if i >= warmup:
            runs.append((stamps, n_prompt))
    ttfts = [s[0] for s, _ in runs]
    gaps = [b - a for s, _ in runs for a, b in zip(s, s[1:])]
    tpot = statistics.median(gaps)
    best = runs[len(runs) // 2][0]
    return GenerationTiming(
        ttft_s=statistics.median(ttfts), tpot_s=tpot, tokens_per_s=1.0 / tpot,
        new_tokens=len(best), total_s=statistics.median(s[-1] for s, _ in runs),
        prompt_tokens=runs[0][1], token_times=tuple(best),
    )


def time_tokens(gen: Callable[[torch.Tensor, int], object], prompt: torch.Tensor, n: int,
                device: str | torch.device | None = None, repeat: int = 1, warmup: int = 0) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s) of a greedy generator ``gen(prompt, n)``.

    Times 1 token (prefill and the first token), then ``n``: the difference is ``n - 1`` decode steps, for a
    generator that cannot report each token as it comes (a compiled loop, ``model.generate``).
    """
    _check_count("n", n, 2)  # n = 1 has no decode step to time: it reported 0 tokens/s
    first = benchmark(lambda: gen(prompt, 1), warmup=warmup, repeat=repeat, device=device).median
    total = benchmark(lambda: gen(prompt, n), warmup=0, repeat=repeat, device=device).median
    return first, (n - 1) / max(total - first, 1e-9)


def decode_speed(models: dict, prompt: torch.Tensor, new_tokens: int = 16, rounds: int = 3,
                 errors: dict | None = None, compiled: bool = False) -> dict[str, tuple[float, float]]:
    """Decode tokens/s and prefill ms of several models, timed **interleaved**; median over ``rounds``.

    Round after round, each model in turn: a change in the machine's state during the run (clock, a neighbour on
    the host) then lands on every model alike, so the ratios between them hold even when absolute numbers drift.
    Timing one model after another does not: two idle sequential runs measured the same bf16 model at 11.6 and
    18.5 tokens/s. Each model gets one untimed warm-up first.

    ``compiled=False`` times the course's streaming generator (Hugging Face forward, dynamic cache: what a
    notebook runs). ``compiled=True`` times :class:`course_lib.generation.CompiledDecoder` instead (static cache,
    ``torch.compile``; the warm-up compiles, tens of seconds per model on a CPU): with the per-step Python
    overhead gone, speed follows the bytes each step reads.

    With ``errors`` (a dict), a model that raises is dropped from the remaining rounds and its message stored
    under its name, instead of ending the whole measurement.
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an int >= 2 to time the decode phase, got {new_tokens!r}")
    _check_count("rounds", rounds, 1)
    models = dict(models)
    samples: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in models}
    decoders: dict[str, Callable[[torch.Tensor, int], object]] = {}
    ids = prompt.view(1, -1)

    def once(name: str, warm: bool) -> None:
        m = models[name]
        try:
            dev = device_of(m)
            ids_m = ids.to(dev)  # the prompt goes where the model is; each timing synchronizes that device
            if compiled:
                if warm:  # build and compile; one cache size for every call, so it compiles once
                    from .generation import CompiledDecoder

                    dec = CompiledDecoder(m)
                    decoders[name] = lambda p, n: dec(p, n, max_len=ids.shape[1] + new_tokens)
                    decoders[name](ids_m, 2)
                    synchronize(dev)
                    return
                first, tok_s = time_tokens(decoders[name], ids_m, new_tokens, device=dev)
                samples[name][0].append(tok_s)
                samples[name][1].append(first)
                return
            t = time_generation(m, None, ids_m, max_new_tokens=2 if warm else new_tokens, warmup=0, repeat=1)
            if not warm:
                pre = benchmark(lambda: m(input_ids=ids_m), warmup=0, repeat=1, device=dev).median
                samples[name][0].append(t.tokens_per_s)
                samples[name][1].append(pre)
        except Exception as e:
            if errors is None:
                raise
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            del models[name]

    for name in list(models):
        once(name, warm=True)
    for _ in range(rounds):
        for name in list(models):
            once(name, warm=False)
    return {k: (statistics.median(samples[k][0]), statistics.median(samples[k][1]) * 1e3) for k in models}


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

    For a real answer as a user saw it (no warm-up, no repeats; :func:`time_generation` measures those).
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

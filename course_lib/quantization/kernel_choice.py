"""Choose a layer's kernel by measuring it: correct first, then fastest, once per shape per process.

Which matmul is fastest depends on the machine: on a CPU with AVX-512-BF16 a bf16 matrix-vector product can be
2x faster than fp32, on an AVX2 one without bf16 arithmetic 10x slower; ``torch._weight_int8pack_mm`` is fast
with bf16 activations and slow with fp32 ones on some CPUs; on a GPU in eager mode a float matmul usually beats
converting int8 weights on every call. So nothing here assumes a machine: a packed layer offers its candidate
kernels (:class:`Candidate`), and :func:`choose` keeps the fastest of those whose output matches the layer's
reference, measured on this machine, at the decode shape (one row of activations).

* **Correct first.** Each candidate runs on random inputs of several row counts (kernels tile rows: one row
  passing proves nothing about a batch) and is compared with the reference output; one that raises, returns
  inf / NaN or differs by more than ``tol`` is rejected, with the reason kept. A kernel that *crashes the
  process* cannot be caught, so the layers never offer one on a shape where it is known to (see
  ``quantization.kernels.INT8_KERNEL_K_MULTIPLE``).
* **Then fastest.** The correct candidates are timed interleaved (every candidate once per round, so a change
  in the machine's state lands on all alike), a few rounds, median; candidates far slower than the best after
  the first round are dropped, so a shape costs well under a second even for a vocabulary-sized head.
* **A tie keeps the preferred one.** A candidate marked ``preferred`` (one that keeps the weights packed) wins
  unless another is at least :data:`MARGIN` faster: memory is saved for sure, a few percent of speed is noise.
* **Cold or hot.** A decode step streams the whole model from memory, so a kernel timed alone, repeatedly, sits
  in the last-level cache and looks 2-3x faster than it is there; cache-hot timings can pick the wrong kernel.
  Inside :func:`timed_cold` (``quantize_`` enters it for a model bigger than the last-level cache) every timed
  call finds the weights in memory: :func:`time_cold` reads a buffer twice the cache's size before each one.
  The choice records which (``Choice.timing``).
* **Once per process.** The choice is cached by a key the layer builds (its type, shape, dtypes, device), so a
  model with 30 identical blocks measures each shape once; :func:`kernel_choices` lists what was chosen and
  every candidate's time - the table the ``engines`` benchmark prints.

Tests assert that the choice is one of the correct candidates and that a broken one is never chosen, never a
timing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import statistics
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import torch

from ..timing import interleaved, synchronize

log = logging.getLogger(__name__)

PROBE_ROWS = (1, 2, 7, 16, 33)  # the kernel tiles rows: one row passing proves nothing about a batch
MARGIN = 1.1  # a non-preferred candidate must be this much faster to win
ROUNDS = 3  # interleaved timing rounds (median)
TARGET_SAMPLE_S = 2e-4  # each timed sample repeats a fast call until it takes about this long
DROP_FACTOR = 2.0  # after round one, candidates this much slower than the best are not timed further
COLD_SAMPLES = 3  # cold timing: single calls per candidate per round, each after the caches were flushed
WARMUP = 3  # untimed calls of each candidate first: an operator's first calls pay for its lookup and thread start-up
LLC_FALLBACK_BYTES = 32 << 20  # where the last-level cache's size cannot be read
TIMINGS = ("hot", "cold")


@dataclass(frozen=True)
class Candidate:
    """One way to compute a layer: ``run(x)`` maps (rows, in_features) activations to (rows, out_features).

    ``prepare`` (optional) builds what ``run`` needs (a repacked weight, a float copy) just before it is
    probed, so a candidate that is never tried costs nothing.
    """

    name: str  # what is reported, e.g. "aten._weight_int8pack_mm bfloat16"
    kernel: str
    dtype: torch.dtype
    run: Callable[[torch.Tensor], torch.Tensor]
    preferred: bool = True
    prepare: Callable[[], None] | None = None
    probe_rows: tuple[int, ...] = PROBE_ROWS  # plain torch ops (dequantize + F.linear) need fewer than a kernel


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` picked, and why: every candidate's median time (µs, one row) or why it was rejected."""

    name: str
    kernel: str
    dtype: torch.dtype
    times_us: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    timing: str = "hot"  # "cold": each timed call read its weights from memory (:func:`timed_cold`)

    def as_row(self) -> dict:
        return {"chosen": self.name, "times_us": dict(self.times_us), "rejected": dict(self.rejected),
                "timing": self.timing}


_CHOICES: dict[Hashable, Choice] = {}
_TIMING = ["hot"]  # a stack: the innermost timed_cold() wins


def timing() -> str:
    """How choices made now are timed: "hot" (the default) or "cold" (inside :func:`timed_cold`)."""
    return _TIMING[-1]


@contextlib.contextmanager
def timed_cold(cold: bool = True) -> Iterator[None]:
    """Time the choices made inside with cold caches (``cold=False``: hot), as a decode step that streams a model
    bigger than the last-level cache runs them. Choices already cached keep the timing they were made with."""
    if not isinstance(cold, bool):
        raise ValueError(f"cold must be True or False, got {cold!r}")
    _TIMING.append("cold" if cold else "hot")
    try:
        yield
    finally:
        _TIMING.pop()


def last_level_cache_bytes(device: torch.device | None = None) -> int:
    """The last-level cache's size: the GPU's L2, or the CPU's largest cache (Linux sysfs); 32 MiB if unknown."""
    if device is not None and device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or LLC_FALLBACK_BYTES)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or LLC_FALLBACK_BYTES


def kernel_choices() -> dict[Hashable, Choice]:
    """Every choice made in this process so far: key -> :class:`Choice`."""
    return dict(_CHOICES)


def clear_kernel_choices() -> None:
    """Forget the cached choices (the next layer of each shape measures again)."""
    _CHOICES.clear()


class Probes:
    """Random inputs of each row count and the reference's output for them, made once and shared by candidates."""

    def __init__(self, reference: Callable[[torch.Tensor], torch.Tensor], in_features: int, device: torch.device):
        self.reference, self.in_features, self.device = reference, in_features, device
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._gen = torch.Generator().manual_seed(0)

    def __call__(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rows not in self._cache:
            x = torch.randn(rows, self.in_features, generator=self._gen).to(self.device)
            with torch.no_grad():
                self._cache[rows] = (x, self.reference(x).float())
        return self._cache[rows]


def check(cand: Candidate, probes: Probes, tol: float, rows: tuple[int, ...] | None = None) -> str | None:
    """Why ``cand`` is wrong on random inputs of ``rows`` rows (raised, non-finite, too far off), or None.

    ``rows`` defaults to the candidate's own ``probe_rows``. The reference (``probes.reference(x)``) returns the
    float32 output for the first columns it covers (it may cover only some output channels, so a
    vocabulary-sized head needs no float copy); ``cand.run(x)`` is compared on those columns.
    """
    try:
        if cand.prepare is not None:
            cand.prepare()
        for n in rows or cand.probe_rows:
            x, ref = probes(n)
            with torch.no_grad():
                y = cand.run(x.to(cand.dtype)).float()
            if not torch.isfinite(y).all():
                return f"non-finite output with {n} rows"
            err = float((y[:, : ref.shape[1]] - ref).norm() / ref.norm().clamp_min(1e-12))
            if not err <= tol:  # also catches NaN
                return f"output differs from the reference with {n} rows (relative error {err:.3g})"
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    return None


def time_candidates(cands: list[Candidate], in_features: int, device: torch.device,
                    rounds: int = ROUNDS) -> dict[str, float]:
    """Median seconds of one call at one row for each candidate, timed in interleaved rounds (cold inside
    :func:`timed_cold`)."""
    if timing() == "cold":
        return time_cold(cands, in_features, device, rounds)
    xs = {c.name: torch.randn(1, in_features, generator=torch.Generator().manual_seed(1)).to(device).to(c.dtype)
          for c in cands}
    with torch.no_grad():
        res = interleaved({c.name: functools.partial(c.run, xs[c.name]) for c in cands}, rounds, warmup=WARMUP,
                          device=device, min_sample_s=TARGET_SAMPLE_S, drop_slower=DROP_FACTOR)
    return {name: statistics.median(s) for name, s in res.samples.items() if s}


def time_cold(cands: list[Candidate], in_features: int, device: torch.device,
              rounds: int = ROUNDS) -> dict[str, float]:
    """Like :func:`time_candidates`, with every timed call finding its weights in memory, not in a cache.

    Before each call a buffer twice the last-level cache's size is read (evicting whatever a candidate left
    there, its weights and any another candidate shares), then the one call is timed alone; each candidate
    gets ``rounds`` x :data:`COLD_SAMPLES` such calls, interleaved call by call, and the median is kept. This is
    the time a layer costs inside a decode step, which streams the whole model from memory.
    """
    flush = torch.ones(2 * last_level_cache_bytes(device) // 4, device=device)
    xs = {c.name: torch.randn(1, in_features, generator=torch.Generator().manual_seed(1)).to(device).to(c.dtype)
          for c in cands}

    def cold_call(c: Candidate) -> float:
        flush.sum()  # reads every byte: the weights are out of the caches afterwards
        synchronize(device)
        t = time.perf_counter()
        c.run(xs[c.name])
        synchronize(device)
        return time.perf_counter() - t

    with torch.no_grad():  # each sample is one cold call; the rounds interleave the candidates call by call
        res = interleaved({c.name: functools.partial(cold_call, c) for c in cands}, rounds * COLD_SAMPLES,
                          warmup=WARMUP, timed=False, device=device, drop_slower=DROP_FACTOR)
    return {name: statistics.median(s) for name, s in res.samples.items() if s}


def choose(key: Hashable, cands: list[Candidate], reference: Callable[[torch.Tensor], torch.Tensor] | Probes,
           in_features: int, device: torch.device, tol: float = 0.05) -> Choice:
    """The fastest correct candidate for ``key`` (measured once per process, then cached).

    Raises ``RuntimeError`` when no candidate is correct (the layer then says what it falls back to).
    """
    if key in _CHOICES:
        return _CHOICES[key]
    probes = reference if isinstance(reference, Probes) else Probes(reference, in_features, device)
    rejected: dict[str, str] = {}
    good: list[Candidate] = []
    for c in cands:
        why = check(c, probes, tol)
        if why is None:
            good.append(c)
        else:
            rejected[c.name] = why
            log.info("%s: %s rejected (%s)", key, c.name, why)
    if not good:
        raise RuntimeError(f"no correct kernel among {[c.name for c in cands]}: {rejected}")
    times = time_candidates(good, in_features, device) if len(good) > 1 else {good[0].name: float("nan")}
    timed = [c for c in good if c.name in times]
    best = min(timed, key=lambda c: times[c.name]) if len(timed) > 1 else timed[0]
    if not best.preferred:
        pref = [c for c in timed if c.preferred]
        if pref:
            runner_up = min(pref, key=lambda c: times[c.name])
            if times[runner_up.name] <= MARGIN * times[best.name]:
                best = runner_up
    choice = Choice(best.name, best.kernel, best.dtype, {n: t * 1e6 for n, t in times.items()}, rejected, timing())
    _CHOICES[key] = choice
    log.info("%s: chose %s (%s, %s)", key, best.name, choice.timing,
             ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in sorted(times.items(), key=lambda kv: kv[1])))
    return choice

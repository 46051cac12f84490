"""Why servers batch: a small in-process serving simulation on a real model.

Decode is memory-bound (see :mod:`course_lib.roofline`): one step reads every
weight once whether it serves one sequence or sixteen. So a server that runs
many requests in the *same* forward pass gets more tokens per second out of
the same weight traffic. What it costs is per-request latency: a bigger batch
makes each step a little slower, and a request may wait for a slot.

Two scheduling policies, run on the same requests and the same model:

* **static batching** - take the requests that are waiting, run them together
  until the *longest* is done, then take the next group. Finished rows keep
  their slot (and their compute) until the whole batch ends; newcomers wait.
* **continuous batching** (Orca, vLLM) - after *every* decode step finished
  requests leave and waiting ones join. Slots never idle while work waits.

Everything runs for real: each prefill and decode step is a forward pass of
the model (the from-scratch :class:`~course_lib.scratch_llama.ScratchLlama`), timed
with ``perf_counter``. Only the *clock* is virtual: requests "arrive" on a
simulated timeline and the clock advances by the measured duration of each
forward pass, so a run of a few seconds can simulate a busy minute without
sleeping. Greedy tokens do not depend on the policy (tested), only timings do.

How one batched KV cache serves requests that joined at different times: each
row of the cache belongs to one request; all rows write their next token into
the same slot, and a per-row key mask hides slots that do not belong to the
row (gaps, a previous occupant's tokens). RoPE positions are tracked per row,
so a request sees exactly the positions it would see alone.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import random
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .._checks import check_flag, check_int, check_number
from ..generation import hf_forward
from ..kv_cache import KVCache
from ..kv_quant import KVQuantConfig
from ..scratch_llama import ScratchLlama
from ..timing import BenchResult, compare, interleaved, quantile
from .scheduler import PagedBatch, Row, blocks_needed

log = logging.getLogger(__name__)

POLICIES = ("static", "continuous")
KV_LAYOUTS = ("contiguous", "paged")


@dataclass(frozen=True)
class Request:
    """One user request: a prompt arriving at ``arrival_s`` that wants ``max_new_tokens`` tokens."""

    rid: int
    arrival_s: float
    prompt_ids: tuple[int, ...]
    max_new_tokens: int

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError(f"request {self.rid}: prompt_ids is empty; give at least one token")
        check_int(f"request {self.rid}: max_new_tokens", self.max_new_tokens, 1)
        # NaN would pass "< 0" and then sort anywhere in the arrival queue
        check_number(f"request {self.rid}: arrival_s", self.arrival_s, ">= 0 and finite (seconds)",
                     lambda v: 0 <= v < math.inf)


@dataclass(frozen=True)
class ServeConfig:
    """How the simulated server schedules: ``policy`` in POLICIES, at most ``max_batch`` rows at once.

    ``kv="paged"`` (continuous batching only) stores the KV cache in blocks of ``block_size`` tokens
    (:mod:`course_lib.paged_kv`; ``kv_blocks`` of them, default: enough for ``max_batch`` requests of the
    longest length), with ``prefix_cache`` reusing the blocks of a shared prompt prefix and
    ``prefill_chunk`` splitting each prompt's prefill into chunks of that many tokens, one chunk between
    two decode steps (None: a prompt is prefilled whole as soon as it is admitted), and ``kv_quant`` storing
    the blocks in 8 or 4 bits (:mod:`course_lib.kv_quant`: more tokens in the same ``kv_blocks`` bytes).
    """

    policy: str = "continuous"
    max_batch: int = 8
    kv: str = "contiguous"
    block_size: int = 16
    kv_blocks: int | None = None
    prefix_cache: bool = False
    prefill_chunk: int | None = None
    kv_quant: KVQuantConfig | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        check_int("max_batch", self.max_batch, 1, " (the most rows decoded at once)")  # True is not a batch of 1
        if self.kv not in KV_LAYOUTS:
            raise ValueError(f"kv must be one of {KV_LAYOUTS}, got {self.kv!r}")
        check_int("block_size", self.block_size, 1, " (tokens per KV block)")
        if self.kv_blocks is not None:
            check_int("kv_blocks", self.kv_blocks, 1, " (KV blocks in the pool), or None for enough")
        if self.prefill_chunk is not None:
            check_int("prefill_chunk", self.prefill_chunk, 1, " (prompt tokens per chunk), or None for whole")
        check_flag("prefix_cache", self.prefix_cache)
        if self.kv_quant is not None and not isinstance(self.kv_quant, KVQuantConfig):
            raise ValueError(f"kv_quant must be a KVQuantConfig (e.g. KVQuantConfig(bits=8)) or None, got "
                             f"{self.kv_quant!r}")
        paged_only = [n for n, on in (("prefix_cache", self.prefix_cache), ("prefill_chunk", self.prefill_chunk),
                                      ("kv_blocks", self.kv_blocks), ("kv_quant", self.kv_quant)) if on]
        if self.kv != "paged" and paged_only:
            raise ValueError(f"{', '.join(paged_only)} need the paged KV cache: ServeConfig(kv='paged', ...)")
        if self.kv == "paged" and self.policy != "continuous":
            raise ValueError("the paged KV cache runs under continuous batching: use policy='continuous'")


@dataclass(frozen=True)
class Finished:
    """What happened to one request (times on the simulated clock, seconds)."""

    rid: int
    arrival_s: float
    start_s: float  # prefill began
    first_token_s: float
    finish_s: float
    tokens: tuple[int, ...]
    token_times: tuple[float, ...] = field(default=(), repr=False)  # clock of each token (paged server)
    prefill_skipped: int = 0  # prompt tokens whose K/V came from the prefix cache

    @property
    def ttft_s(self) -> float:
        """Time to first token, queueing included: what the user waits before text appears."""
        return self.first_token_s - self.arrival_s

    @property
    def latency_s(self) -> float:
        """End-to-end: arrival to last token."""
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first."""
        n = len(self.tokens)
        return (self.finish_s - self.first_token_s) / (n - 1) if n > 1 else 0.0

    @property
    def max_gap_s(self) -> float:
        """The longest wait between two consecutive tokens: the stall a user sees mid-answer."""
        t = self.token_times
        return max((b - a for a, b in zip(t, t[1:])), default=0.0)


@dataclass(frozen=True)
class ServeReport:
    """A whole run: every request, plus the forward passes the server made."""

    policy: str
    max_batch: int
    finished: tuple[Finished, ...]
    steps: int  # decode forward passes
    busy_rows: int  # sum over decode steps of rows that still needed a token
    computed_rows: int  # sum over decode steps of rows computed (static batching computes finished rows too)
    makespan_s: float  # first arrival to last token
    batch_trace: tuple[tuple[float, int], ...] = field(repr=False)  # (clock, rows in the step)
    kv: dict = field(default_factory=dict, repr=False)  # paged server: memory and prefix-cache figures

    @property
    def tokens(self) -> int:
        return sum(len(f.tokens) for f in self.finished)

    @property
    def throughput_tok_s(self) -> float:
        """Generated tokens per second of simulated time, over the whole run."""
        return self.tokens / self.makespan_s if self.makespan_s > 0 else 0.0

    @property
    def wasted_frac(self) -> float:
        """Fraction of computed rows that produced nothing (finished requests kept in a static batch)."""
        return 1 - self.busy_rows / self.computed_rows if self.computed_rows else 0.0

    def summary(self) -> dict:
        """One row for a table: throughput, TTFT and latency median / p90, mean batch."""
        ttft = sorted(f.ttft_s for f in self.finished)
        lat = sorted(f.latency_s for f in self.finished)
        return dict(policy=self.policy, max_batch=self.max_batch, requests=len(self.finished),
                    tokens=self.tokens, throughput_tok_s=self.throughput_tok_s,
                    ttft_p50_s=quantile(ttft, 0.5), ttft_p90_s=quantile(ttft, 0.9),
                    latency_p50_s=quantile(lat, 0.5), latency_p90_s=quantile(lat, 0.9),
                    tpot_p50_s=statistics.median(f.tpot_s for f in self.finished),
                    mean_batch=self.computed_rows / self.steps if self.steps else 0.0,
                    wasted_frac=self.wasted_frac, **self.kv)


def poisson_requests(n: int, rate_per_s: float, vocab: int, prompt_len: tuple[int, int] = (8, 32),
                     new_tokens: tuple[int, int] = (4, 32), seed: int = 0, shared_prefix: int = 0) -> list[Request]:
    """``n`` requests with exponential gaps (a Poisson process at ``rate_per_s``) and random lengths.

    Real traffic is bursty and answer lengths vary a lot; that variety is what
    makes static batching waste slots. Lengths are uniform in the given
    inclusive ranges; prompt tokens are random ids below ``vocab``. With
    ``shared_prefix`` > 0 every prompt starts with the same that many tokens
    (a system prompt), followed by its own ``prompt_len`` tokens.
    """
    check_int("n", n, 1, " (the number of requests)")
    check_number("rate_per_s", rate_per_s, "> 0 and finite (requests per second)", lambda v: 0 < v < math.inf)
    check_int("vocab", vocab, 1, " (prompt ids are drawn below it: the model's vocab_size)")
    for name, rng_ in (("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if (not isinstance(rng_, (tuple, list)) or len(rng_) != 2
                or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in rng_)
                or rng_[0] < 1 or rng_[1] < rng_[0]):
            raise ValueError(f"{name} must be (lo, hi) ints with 1 <= lo <= hi, got {rng_!r}")
    check_int("shared_prefix", shared_prefix, 0, " (tokens of a system prompt every request starts with)")
    rng = random.Random(seed)
    system = tuple(rng.randrange(vocab) for _ in range(shared_prefix))
    t, out = 0.0, []
    for i in range(n):
        prompt = system + tuple(rng.randrange(vocab) for _ in range(rng.randint(*prompt_len)))
        out.append(Request(i, t, prompt, rng.randint(*new_tokens)))
        t += rng.expovariate(rate_per_s)
    return out


class _BatchState:
    """The server's rows: a shared KV cache, a key mask per row, a RoPE position per row.

    Active rows are kept at the front (rows 0..n-1), so a decode step runs on a
    *view* of the first n rows: no copies, and idle rows cost nothing.
    """

    def __init__(self, scratch: ScratchLlama, max_batch: int, max_len: int):
        self.scratch = scratch
        self.cache = scratch.new_cache(max_batch, max_len)
        self.key_mask = torch.zeros(max_batch, max_len, dtype=torch.bool, device=scratch.device)
        self.next_pos = torch.zeros(max_batch, 1, dtype=torch.long, device=scratch.device)
        self.last_tok = torch.zeros(max_batch, 1, dtype=torch.long, device=scratch.device)
        self.rows: list[dict] = []  # per active row: request, tokens so far, times

    @property
    def length(self) -> int:
        return self.cache.length

    def _view(self, n: int) -> KVCache:
        """A KVCache over rows [0, n) of the shared tensors (views: writes land in the big cache)."""
        view = KVCache.__new__(KVCache)
        view.k = [t[:n] for t in self.cache.k]
        view.v = [t[:n] for t in self.cache.v]
        view.max_len, view.length = self.cache.max_len, self.cache.length
        return view

    def add(self, req: Request, clock: float) -> float:
        """Prefill ``req`` alone (batch 1) and copy its K/V into a free row. Returns the seconds it took."""
        r = len(self.rows)
        p = len(req.prompt_ids)
        if max(self.length, p) + req.max_new_tokens > self.cache.max_len:
            self.compact()
        ids = torch.tensor([req.prompt_ids], device=self.scratch.device)
        t0 = time.perf_counter()
        solo = self.scratch.new_cache(1, p)
        logits = self.scratch(ids, solo, last_only=True)
        tok = logits[:, -1].argmax(-1)
        first = int(tok.item())  # .item() waits for the device: the token exists now
        dt = time.perf_counter() - t0
        for layer in range(len(self.cache.k)):  # the prompt's K/V go to slots [0, p) of row r
            self.cache.k[layer][r, :, :p] = solo.k[layer][0]
            self.cache.v[layer][r, :, :p] = solo.v[layer][0]
        self.key_mask[r] = False
        self.key_mask[r, :p] = True
        self.next_pos[r] = p
        self.last_tok[r] = first
        self.cache.length = max(self.cache.length, p)  # later slots of a shorter row stay masked
        self.rows.append(dict(req=req, tokens=[first], start=clock, first=clock + dt, done=req.max_new_tokens == 1))
        return dt

    def step(self, n_compute: int) -> float:
        """One decode forward pass over rows [0, n_compute); returns the seconds it took."""
        if self.length + 1 > self.cache.max_len:
            self.compact()
        slot = self.length
        self.key_mask[:n_compute, slot] = True
        view = self._view(n_compute)
        t0 = time.perf_counter()
        logits = self.scratch(self.last_tok[:n_compute], view, self.next_pos[:n_compute],
                              self.key_mask[:n_compute], last_only=True)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        toks = nxt.view(-1).tolist()  # synchronizes
        dt = time.perf_counter() - t0
        self.cache.length = view.length
        self.last_tok[:n_compute] = nxt
        self.next_pos[:n_compute] += 1
        for row, tok in zip(self.rows[:n_compute], toks):
            if not row["done"]:
                row["tokens"].append(tok)
                row["done"] = len(row["tokens"]) >= row["req"].max_new_tokens
        return dt

    def remove_done(self) -> list[dict]:
        """Take finished rows out; the last active row moves into each hole so active rows stay in front."""
        out = []
        r = 0
        while r < len(self.rows):
            if self.rows[r]["done"]:
                out.append(self.rows[r])
                last = len(self.rows) - 1
                if r != last:
                    self._move(last, r)
                    self.rows[r] = self.rows[last]
                self.rows.pop()
            else:
                r += 1
        if not self.rows:
            self.cache.length = 0  # nobody left: reuse the cache from slot 0
        return out

    def _move(self, src: int, dst: int) -> None:
        n = self.length
        for layer in range(len(self.cache.k)):
            self.cache.k[layer][dst, :, :n] = self.cache.k[layer][src, :, :n]
            self.cache.v[layer][dst, :, :n] = self.cache.v[layer][src, :, :n]
        self.key_mask[dst] = self.key_mask[src]
        self.next_pos[dst] = self.next_pos[src]
        self.last_tok[dst] = self.last_tok[src]

    def compact(self) -> None:
        """Squeeze out masked gaps: each row's real slots move to the left, in order."""
        new_len = 0
        for r in range(len(self.rows)):
            idx = self.key_mask[r].nonzero().view(-1)
            n = idx.numel()
            for layer in range(len(self.cache.k)):
                self.cache.k[layer][r, :, :n] = self.cache.k[layer][r, :, idx]
                self.cache.v[layer][r, :, :n] = self.cache.v[layer][r, :, idx]
            self.key_mask[r] = False
            self.key_mask[r, :n] = True
            new_len = max(new_len, n)
        self.cache.length = new_len
        log.debug("compacted the KV cache to %d slots", new_len)


@torch.inference_mode()
def serve(model, requests: list[Request], cfg: ServeConfig, progress: bool = False) -> ServeReport:
    """Run ``requests`` through a simulated server with ``cfg``'s policy; greedy decoding.

    ``model`` is a Hugging Face Llama-family model (or a ScratchLlama). Every
    prefill and decode step is a real forward pass, timed; the simulated clock
    advances by those times and jumps over idle gaps to the next arrival.
    """
    if not requests:
        raise ValueError("requests is empty; make some with poisson_requests(...)")
    if len({r.rid for r in requests}) != len(requests):
        raise ValueError("request ids (rid) must be unique")
    scratch = model if isinstance(model, ScratchLlama) else ScratchLlama(model)
    if cfg.kv == "paged":
        return _serve_paged(scratch, requests, cfg, progress)
    queue = sorted(requests, key=lambda r: (r.arrival_s, r.rid))
    max_len = 2 * max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    state = _BatchState(scratch, cfg.max_batch, max_len)
    clock = queue[0].arrival_s
    done: list[Finished] = []
    steps = busy = computed = 0
    trace: list[tuple[float, int]] = []
    static_width = 0  # rows in the current static batch (finished ones included)
    bar = tqdm(total=len(requests), desc=f"serve ({cfg.policy})", disable=not progress)

    def admit() -> None:
        nonlocal clock
        while queue and queue[0].arrival_s <= clock and len(state.rows) < cfg.max_batch:
            clock += state.add(queue.pop(0), clock)

    def collect() -> None:
        for row in state.remove_done():
            # A row finished at the clock of the step that produced its last token.
            finish = row["first"] if len(row["tokens"]) == 1 else row.get("finish", clock)
            done.append(Finished(row["req"].rid, row["req"].arrival_s, row["start"], row["first"],
                                 finish, tuple(row["tokens"])))
            bar.update(1)

    while queue or state.rows:
        if not state.rows and queue and queue[0].arrival_s > clock:
            clock = queue[0].arrival_s  # idle: jump to the next arrival
        if cfg.policy == "continuous" or not state.rows:
            admit()
            static_width = len(state.rows)
            if cfg.policy == "continuous":
                collect()  # one-token requests are done after prefill: free their rows at once
        active = sum(not r["done"] for r in state.rows)
        if active:
            n = static_width if cfg.policy == "static" else len(state.rows)
            clock += state.step(n)
            steps += 1
            busy += active
            computed += n
            trace.append((clock, n))
        for row in state.rows:  # stamp rows that got their last token in this step
            if row["done"] and "finish" not in row and len(row["tokens"]) > 1:
                row["finish"] = clock
        if cfg.policy == "continuous" or all(r["done"] for r in state.rows):
            collect()  # static batching frees its rows only when the whole batch is done
    bar.close()
    done.sort(key=lambda f: f.rid)
    makespan = max(f.finish_s for f in done) - min(r.arrival_s for r in requests)
    return ServeReport(cfg.policy, cfg.max_batch, tuple(done), steps, busy, computed, makespan, tuple(trace))


def _serve_paged(scratch: ScratchLlama, requests: list[Request], cfg: ServeConfig, progress: bool) -> ServeReport:
    """Continuous batching over a paged KV cache, with optional prefix caching and chunked prefill.

    The batch is :class:`~course_lib.serving.scheduler.PagedBatch`, the engine behind the HTTP server: the
    same scheduler and admission rule (:func:`schedule_step`), driven here by the virtual clock. Requests
    join the scheduler's queue when the clock passes their arrival.
    """
    queue = sorted(requests, key=lambda r: (r.arrival_s, r.rid))
    bs = cfg.block_size
    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    n_blocks = cfg.kv_blocks or cfg.max_batch * blocks_needed(longest, bs)
    if n_blocks < blocks_needed(longest, bs):
        raise ValueError(f"kv_blocks={n_blocks} cannot hold the longest request ({longest} tokens = "
                         f"{blocks_needed(longest, bs)} blocks of {bs}); give the cache more blocks")
    clock = queue[0].arrival_s
    done: list[Finished] = []
    peaks = dict(paged=0, contiguous=0, stored=0)
    bar = tqdm(total=len(requests), desc="serve (paged)", disable=not progress)

    def advance(dt: float) -> float:
        nonlocal clock
        clock += dt
        return clock

    def finished(row: Row) -> None:
        done.append(Finished(row.rid, row.arrival, row.start, row.times[0], row.times[-1], tuple(row.tokens),
                             tuple(row.times), row.skipped))
        bar.update(1)

    batch = PagedBatch(scratch, cfg.max_batch, n_blocks, bs, cfg.prefix_cache, cfg.prefill_chunk, advance,
                       on_free=finished, kv_quant=cfg.kv_quant)
    cache = batch.cache

    def measure() -> None:
        rows = batch.rows.values()
        stored = sum(cache.stored_tokens(r.rid) for r in rows) * cache.bytes_per_token
        peaks["paged"] = max(peaks["paged"], cache.used_bytes())
        # a contiguous cache reserves the longest length for every admitted request, whatever it will use
        peaks["contiguous"] = max(peaks["contiguous"], len(rows) * longest * cache.bytes_per_token)
        peaks["stored"] = max(peaks["stored"], stored)

    while queue or batch.busy:
        if not batch.active and queue and queue[0].arrival_s > clock:
            clock = queue[0].arrival_s  # idle: jump to the next arrival
        while queue and queue[0].arrival_s <= clock:
            r = queue.pop(0)
            batch.add(Row(r.rid, r.prompt_ids, r.max_new_tokens, arrival=r.arrival_s))
        batch.step()
        measure()
    bar.close()
    done.sort(key=lambda f: f.rid)
    makespan = max(f.finish_s for f in done) - min(r.arrival_s for r in requests)
    busy = sum(n for _, n in batch.trace)
    mb = 1e6
    kv = dict(kv_paged_peak_mb=peaks["paged"] / mb, kv_contiguous_peak_mb=peaks["contiguous"] / mb,
              kv_stored_peak_mb=peaks["stored"] / mb, prefix_hit_blocks=cache.alloc.hits,
              prefill_tokens_skipped=sum(f.prefill_skipped for f in done),
              prefill_tokens_computed=batch.prefill_tokens_computed, blocks_in_use_at_end=cache.alloc.used)
    return ServeReport(cfg.policy, cfg.max_batch, tuple(done), batch.steps, busy, busy, makespan,
                       tuple(batch.trace), kv)


# --- measuring the paged server's features: interleaved runs, one long prompt ---------

def interleaved_runs(model, requests: list[Request], configs: dict[str, ServeConfig],
                     rounds: int = 3) -> dict[str, list[ServeReport]]:
    """Serve the same ``requests`` under each config, round after round (a, b, a, b, ...): the reports per name.

    A drift of the machine (another job, a clock change) then lands on every config alike
    (:func:`course_lib.timing.interleaved`); one untimed warm-up run per config first.
    """
    check_int("rounds", rounds, 1)
    if not isinstance(configs, dict) or not configs or not all(isinstance(c, ServeConfig) for c in configs.values()):
        raise ValueError("configs must be a non-empty dict {name: ServeConfig(...)}")
    scratch = model if isinstance(model, ScratchLlama) else ScratchLlama(model)
    res = interleaved({name: functools.partial(serve, scratch, requests, cfg) for name, cfg in configs.items()},
                      rounds, warmup=0, timed=False,
                      prepare={name: functools.partial(serve, scratch, requests[: min(len(requests), 2)], cfg)
                               for name, cfg in configs.items()})
    return {name: list(reports) for name, reports in res.samples.items()}


def spread(values: list[float]):
    """Median and p10-p90 of per-round values (seconds on the simulated clock) as a timing BenchResult,
    so :func:`course_lib.timing.speed_verdict` can judge them."""
    return BenchResult.from_times(list(values), "simulated clock")


def with_long_prompt(n_short: int, vocab: int, long_len: int, short_new: int = 24, short_prompt: int = 16,
                     seed: int = 0) -> tuple[list[Request], int]:
    """``n_short`` requests that arrive together and decode ``short_new`` tokens, then one ``long_len``-token
    prompt arriving while they decode: (requests, the long one's rid). What chunked prefill is for."""
    for name, v in (("n_short", n_short), ("vocab", vocab), ("long_len", long_len), ("short_new", short_new),
                    ("short_prompt", short_prompt)):
        check_int(name, v, 1)
    rng = random.Random(seed)
    reqs = [Request(i, 0.0, tuple(rng.randrange(vocab) for _ in range(short_prompt)), short_new)
            for i in range(n_short)]
    # arrives "just after" the others were admitted: the clock jumps past it during their prefill
    reqs.append(Request(n_short, 1e-9, tuple(rng.randrange(vocab) for _ in range(long_len)), 2))
    return reqs, n_short


def others_latency(report: ServeReport, rid: int) -> dict:
    """How the requests other than ``rid`` fared: median TPOT and median worst gap between two tokens."""
    rest = [f for f in report.finished if f.rid != rid]
    if not rest:
        raise ValueError(f"no request other than {rid} in this report")
    return dict(tpot_p50_s=statistics.median(f.tpot_s for f in rest),
                max_gap_p50_s=statistics.median(f.max_gap_s for f in rest))


# --- batch size vs latency vs throughput -------------------------------------------

def batch_sweep(model, batch_sizes: list[int], context: int = 64, warmup: int = 2,
                repeat: int = 5) -> list[dict]:
    """Decode step time at each batch size: throughput (tokens/s, all rows) vs latency per token.

    The batch sizes are timed **interleaved** (:func:`course_lib.timing.compare`, ``repeat`` rounds), so
    their ratios hold on a shared machine; each row carries the median and p10-p90 of the step and the
    BenchResult itself (``result``) for :func:`course_lib.timing.speed_verdict`.

    One decode step reads every weight once for the whole batch, so while the step stays memory-bound,
    doubling the batch nearly doubles throughput. Each user's time per output token does not stay flat,
    though: at batch 1 every linear layer is a matrix-vector product (GEMV), from batch 2 on a
    matrix-matrix product (GEMM) with another kernel, and per-row work (attention over each row's cache,
    activations, the output head's logits) grows with the batch.
    """
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1
                              for b in batch_sizes):
        raise ValueError(f"batch_sizes must be a non-empty list of positive ints, got {batch_sizes!r}")
    check_int("context", context, 1, " (tokens in the cache before the timed step)")
    dev = next(model.parameters()).device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    fns = {}
    for b in batch_sizes:
        prompt = torch.randint(0, vocab, (b, context), generator=g).to(dev)
        tok = torch.randint(0, vocab, (b, 1), generator=g).to(dev)
        with torch.inference_mode():
            _, past = hf_forward(model, prompt)

        def step(tok=tok, past=past):
            hf_forward(model, tok, past)
            past.crop(-1)  # drop the token just added: every sample sees the same context

        fns[b] = step
    res = compare(fns, rounds=repeat, warmup=warmup, device=dev)
    return [dict(batch=b, step_ms=r.median * 1e3, tpot_ms=r.median * 1e3, throughput_tok_s=b / r.median,
                 p10_ms=r.p10 * 1e3, p90_ms=r.p90 * 1e3, result=r) for b, r in res.items()]

"""An OpenAI-API load generator: streaming requests at a rate or a concurrency, TTFT / TPOT / ITL, goodput.

It speaks only the OpenAI chat-completions API over HTTP (httpx, streaming), so it measures any
OpenAI-compatible server the same way: the course's (:mod:`.server`), llama.cpp's, or vLLM / SGLang on a
GPU box. Two ways to load a server, as vLLM's and SGLang's ``bench_serving`` do:

* **open loop** (``rate``): requests arrive as a Poisson process, whether or not the server keeps up -
  the way real users arrive. Past the server's capacity the queue, and so TTFT, grows without bound:
  that knee is what a latency-against-load plot shows;
* **closed loop** (``concurrency``): a fixed number of clients, each sending its next request when the
  last one is answered.

Per request: TTFT (send to first content), TPOT (mean gap after the first token), the inter-token
latencies (ITL; one "token" is one streamed chunk, which is one token on both servers measured here).
Per run: p50 / p90 / p99, request and token throughput, and **goodput**: requests per second that met a
latency budget of chapter 10 (:data:`course_lib.applications.BUDGETS`: TTFT and TPOT within its targets).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import httpx

from .._checks import check_int, check_number
from ..applications import BUDGETS, LatencyBudget
from ..prompts import KINDS, prompts

SYSTEM_PROMPT = ("You are a helpful, concise assistant for an online shop. Answer in a few sentences, politely, "
                 "and say so when you do not know.")


@dataclass(frozen=True)
class LoadConfig:
    """One load run: ``requests`` requests at ``rate`` per second (Poisson) or from ``concurrency`` clients."""

    requests: int = 32
    rate: float | None = None  # requests per second (open loop); None: closed loop
    concurrency: int | None = None
    max_tokens: int = 64
    kinds: tuple[str, ...] = KINDS
    system_prompt: str | None = SYSTEM_PROMPT
    seed: int = 0
    timeout_s: float = 300.0

    def __post_init__(self):
        check_int("requests", self.requests, 1)
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (requests per second, open loop) and concurrency "
                             "(clients, closed loop)")
        if self.rate is not None:
            check_number("rate", self.rate, "> 0 and finite (requests per second)", lambda v: 0 < v < math.inf)
        if self.concurrency is not None:
            check_int("concurrency", self.concurrency, 1, " (clients sending at once)")
        check_int("max_tokens", self.max_tokens, 1)
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds!r}")
        check_number("timeout_s", self.timeout_s, "> 0 (seconds per request)", lambda v: 0 < v < math.inf)


@dataclass
class RequestResult:
    """What one client saw (seconds from the run's start)."""

    kind: str
    sent_s: float
    ttft_s: float | None = None
    latency_s: float | None = None
    tokens: int = 0
    itl_s: list[float] = field(default_factory=list, repr=False)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        return (self.latency_s - self.ttft_s) / (self.tokens - 1) if self.tokens > 1 else None

    def meets(self, budget: LatencyBudget) -> bool:
        """Answered, first token within the budget's TTFT, and streamed at least as fast as its TPOT."""
        return (self.error is None and self.ttft_s is not None and self.ttft_s <= budget.ttft_s
                and (self.tpot_s is None or self.tpot_s <= budget.tpot_s))


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]) of ``values``; None when empty."""
    v = sorted(values)
    if not v:
        return None
    pos = q / 100 * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _workload(cfg: LoadConfig) -> list[tuple[str, list[dict]]]:
    """(kind, messages) per request: the course's prompts in a seeded order, behind the shared system prompt."""
    pool = prompts(kinds=cfg.kinds)
    rng = random.Random(cfg.seed)
    out = []
    for _ in range(cfg.requests):
        kind, text = rng.choice(pool)
        msgs = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        out.append((kind, msgs + [{"role": "user", "content": text}]))
    return out


async def _one(client: httpx.AsyncClient, url: str, model: str, kind: str, messages: list[dict], cfg: LoadConfig,
               t0: float, headers: dict) -> RequestResult:
    body = dict(model=model, messages=messages, max_tokens=cfg.max_tokens, temperature=0.0, stream=True)
    res = RequestResult(kind, time.perf_counter() - t0)
    sent = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message", obj["error"]))[:200]
                    return res
                content = "".join((c.get("delta") or {}).get("content") or "" for c in obj.get("choices", []))
                if not content:
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft_s = now - sent
                else:
                    res.itl_s.append(now - last)
                last = now
                res.tokens += 1
        if last is None:
            res.error = "the stream ended without any content"
        else:
            res.latency_s = last - sent
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
    return res


async def _run(url: str, model: str, cfg: LoadConfig, api_key: str | None) -> tuple[list[RequestResult], float]:
    work = _workload(cfg)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits) as client:
        t0 = time.perf_counter()
        if cfg.rate is not None:
            rng = random.Random(cfg.seed + 1)
            tasks, at = [], 0.0
            for kind, msgs in work:
                delay = at - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_one(client, url, model, kind, msgs, cfg, t0, headers)))
                at += rng.expovariate(cfg.rate)
            results = list(await asyncio.gather(*tasks))
        else:
            todo = list(enumerate(work))
            results: list[RequestResult | None] = [None] * len(work)

            async def client_loop():
                while todo:
                    i, (kind, msgs) = todo.pop(0)
                    results[i] = await _one(client, url, model, kind, msgs, cfg, t0, headers)

            await asyncio.gather(*(client_loop() for _ in range(cfg.concurrency)))
        return results, time.perf_counter() - t0


def summarize(results: list[RequestResult], duration_s: float,
              budget: LatencyBudget | str = "customer service") -> dict:
    """One row: p50 / p90 / p99 of TTFT, TPOT and ITL (ms), throughput, goodput under ``budget``."""
    b = BUDGETS[budget] if isinstance(budget, str) else budget
    ok = [r for r in results if r.error is None]
    row = dict(requests=len(results), errors=len(results) - len(ok), duration_s=duration_s,
               throughput_req_s=len(ok) / duration_s if duration_s > 0 else 0.0,
               throughput_tok_s=sum(r.tokens for r in ok) / duration_s if duration_s > 0 else 0.0,
               budget=b.name, met_budget=sum(r.meets(b) for r in results))
    row["goodput_req_s"] = row["met_budget"] / duration_s if duration_s > 0 else 0.0
    series = dict(ttft=[r.ttft_s for r in ok], tpot=[r.tpot_s for r in ok if r.tpot_s is not None],
                  itl=[x for r in ok for x in r.itl_s])
    for name, vals in series.items():
        for q in (50, 90, 99):
            p = percentile(vals, q)
            row[f"{name}_p{q}_ms"] = None if p is None else p * 1e3
    if row["errors"]:
        row["first_error"] = next(r.error for r in results if r.error)
    return row


def run_load(url: str, cfg: LoadConfig, model: str | None = None, api_key: str | None = None,
             budget: LatencyBudget | str = "customer service") -> dict:
    """Load the OpenAI-compatible server at ``url`` (``http://host:port``, without ``/v1``) as ``cfg`` says.

    ``model``: the name to send (None: the first of the server's ``/v1/models``). Returns the summary row
    (:func:`summarize`) with the per-request results under ``"results"``.
    """
    if not isinstance(cfg, LoadConfig):
        raise ValueError(f"cfg must be a LoadConfig, got {type(cfg).__name__}")
    if isinstance(budget, str) and budget not in BUDGETS:
        raise ValueError(f"budget must be one of {list(BUDGETS)} or a LatencyBudget, got {budget!r}")
    url = url.rstrip("/").removesuffix("/v1")
    if model is None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise ValueError(f"cannot list the models of {url} ({e}); is an OpenAI-compatible server there? "
                             "Name the model with model=...") from None
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no event loop here: run one
        results, duration = asyncio.run(_run(url, model, cfg, api_key))
    else:  # inside Jupyter's running loop: run ours in a thread of its own
        with ThreadPoolExecutor(1) as pool:
            results, duration = pool.submit(asyncio.run, _run(url, model, cfg, api_key)).result()
    row = summarize(results, duration, budget)
    row.update(model=model, rate=cfg.rate, concurrency=cfg.concurrency, max_tokens=cfg.max_tokens,
               results=[asdict(r) for r in results])
    return row

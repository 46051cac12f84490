"""Benchmark suite ``serve-real``: the course's server beside llama.cpp's server, the same load, the same weights.

Two OpenAI-compatible servers on 127.0.0.1, each on a free port:

* the course's (:func:`course_lib.serving.start_server`): continuous batching over the paged KV cache, in
  this process, on SmolLM2-135M-Instruct as float32 (the float copy of the shipped GGUF, the one
  :func:`course_lib.bench.engines.load_engine_model` loads);
* llama.cpp's (``python -m llama_cpp.server``, from ``llama-cpp-python[server]``) as a subprocess, on the F32
  GGUF llama.cpp makes from that same shipped file (:func:`course_lib.bench.engines.gguf_variant`): the same
  floats, computed at the same precision. ``--interrupt_requests False``: by default that server *ends* a
  running stream as soon as another request waits, which would count cut answers as served ones.

Both get the same number of CPU threads: one by default (``threads=N`` for more). The comparison is about
scheduling, not about how kernels scale with threads; and on a CPU shared with other work, threads that wait
for each other at every step collapse (llama.cpp with 2 threads on a busy 2-core machine took minutes for what
1 thread did in seconds: see docs/serving.md). The load (:mod:`course_lib.serving.loadgen`: Poisson arrivals,
streaming chat requests from the course's prompts behind a shared system prompt) runs at each rate against one
server, then the other, rate after rate (A r1, B r1, A r2, ...), so a change in the machine's load lands on
both alike. The rates are multiples of llama.cpp's *serial capacity* (one over its time for one whole answer,
measured first), so the sweep crosses the knee on any machine: slow CPU or GPU box.

Rows (``suite="serve-real"``), one per engine and rate: TTFT / TPOT / ITL p50-p90-p99 (ms), throughput
(requests/s and tokens/s), goodput under the customer-service budget (requests/s whose TTFT and TPOT met it).
A run *meets* the budget when at least :data:`MEETS_SHARE` of its requests did. The goal
(``machine["serve_real_goal"]``): each engine's **sustained goodput** is its goodput at the highest rate where
it meets the budget; the course's must be at least :data:`GOAL_RATIO` times llama.cpp's. (At one and the same
rate two servers that both meet the budget have nearly the same goodput, the rate itself: the lever is how
far the load can grow before the budget breaks.)

Cost: ``--quick`` (2 rates, 6 requests of at most 16 tokens) about a minute on 2 cores; the full run (4 rates,
16 requests of at most 64 tokens) ten minutes or more. Without ``llama-cpp-python`` the llama.cpp rows say
how to install it and the course's rows still run.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .._checks import check_flag
from ..real_model import gguf_path as shipped_gguf
from ..serving import start_server
from ..serving.loadgen import LoadConfig, run_load
from .engines import LLAMA_INSTALL_HINT, MODEL_NAME, gguf_variant, load_engine_model

log = logging.getLogger(__name__)

SUITE = "serve-real"
COURSE, LLAMA = "course_lib", "llama.cpp"
BUDGET = "customer service"
MEETS_SHARE = 0.9  # a run meets the budget when this share of its requests did
GOAL_RATIO = 2.0  # the course's sustained goodput over llama.cpp's
QUICK = dict(factors=(0.5, 2.0), requests=6, max_tokens=16)
FULL = dict(factors=(0.5, 1.0, 2.0, 4.0), requests=16, max_tokens=64)
LATENCY_COLUMNS = tuple(f"{m}_p{q}_ms" for m in ("ttft", "tpot", "itl") for q in (50, 90, 99))
COLUMNS = ("suite", "method", "engine", "model", "weights", "rate_req_s", "requests", "errors", "max_tokens",
           *LATENCY_COLUMNS, "throughput_req_s", "throughput_tok_s", "met_budget", "goodput_req_s",
           "meets_budget", "threads", "note", "error")

# A server factory: a context manager that yields the server's base URL and stops it on exit, whatever happened.
ServerFactory = Callable[[], contextlib.AbstractContextManager]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the OS picks it); a subprocess server is told to bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, so a killed kernel leaves no server behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@contextlib.contextmanager
def llama_server(gguf: Path, threads: int, n_ctx: int = 2048, model_alias: str = MODEL_NAME,
                 host: str = "127.0.0.1", start_timeout_s: float = 120.0) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server on ``gguf`` as a subprocess; yields its URL, stops it on exit.

    Waits until ``GET /v1/models`` answers; a server that exits or never answers raises RuntimeError with
    the end of its log. On exit (an error included) it gets SIGTERM, then SIGKILL after 10 s.
    """
    import httpx

    if not Path(gguf).is_file():
        raise ValueError(f"gguf {gguf} is not a file; give the path of a GGUF model file")
    port = free_port(host)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model_alias,
           "--host", host, "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--n_ctx", str(n_ctx), "--interrupt_requests", "False", "--verbose", "False"]
    url = f"http://{host}:{port}"
    with tempfile.TemporaryFile() as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)

        def tail() -> str:
            logf.seek(0)
            return logf.read().decode(errors="replace")[-1500:]

        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llama.cpp's server exited with code {proc.returncode}: {tail()}")
                try:
                    if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama.cpp's server did not answer within {start_timeout_s:.0f} s: {tail()}")
                time.sleep(0.25)
            yield url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


@contextlib.contextmanager
def course_server(model, tokenizer, model_name: str = MODEL_NAME, config=None) -> Iterator[str]:
    """The course's server in this process on a free port; yields its URL, stops it on exit."""
    with start_server(model, tokenizer, port=0, model_name=model_name, config=config) as h:
        yield h.url


def serial_seconds(url: str, max_tokens: int, requests: int = 2) -> float:
    """Median seconds for one whole answer, one request at a time (the first, a warm-up, not counted)."""
    row = run_load(url, LoadConfig(requests=requests + 1, concurrency=1, max_tokens=max_tokens, seed=99))
    if row["errors"]:
        raise RuntimeError(f"{url}: {row['errors']} of {requests + 1} requests failed: {row.get('first_error')}")
    times = sorted(r["latency_s"] for r in row["results"][1:])
    return times[len(times) // 2]


def meets(row: dict) -> bool:
    """A run meets the budget when at least :data:`MEETS_SHARE` of its requests did (errors count as misses)."""
    return row["requests"] > 0 and row["met_budget"] >= MEETS_SHARE * row["requests"]


def side_by_side(urls: dict[str, str], rates: list[float], requests: int, max_tokens: int,
                 budget: str = BUDGET, seed: int = 0, keep_results: bool = False) -> list[dict]:
    """Load every server at every rate, interleaved (A r1, B r1, A r2, ...): one summary row per pair.

    Each rate gets its own seed, the same for every server: they all answer the same requests at the same
    moments. ``keep_results`` keeps each request's own figures (``"results"``) to judge other budgets later.
    """
    rows = []
    for i, rate in enumerate(rates):
        for name, url in urls.items():
            log.info("%s at %.3g requests/s", name, rate)
            cfg = LoadConfig(requests=requests, rate=rate, max_tokens=max_tokens, seed=seed + i)
            row = run_load(url, cfg, budget=budget)
            if not keep_results:
                row.pop("results")
            rows.append(dict(engine=name, rate_req_s=rate, **row))
    return rows


def goal(rows: list[dict]) -> dict:
    """Each engine's sustained goodput (at its highest rate that met the budget) and the course's ratio."""
    out: dict = {"budget": BUDGET, "meets_share": MEETS_SHARE, "goal": GOAL_RATIO}
    for eng in (COURSE, LLAMA):
        ran = [r for r in rows if r["engine"] == eng and r.get("error") is None and r.get("requests")]
        ok = [r for r in ran if r["meets_budget"]]
        best = max(ok, key=lambda r: r["rate_req_s"]) if ok else None
        out[eng] = {"highest_rate_met": best["rate_req_s"] if best else None,
                    "sustained_goodput_req_s": best["goodput_req_s"] if best else None,
                    "met_at_highest_rate_tried": bool(ran) and best is not None
                    and best["rate_req_s"] == max(r["rate_req_s"] for r in ran)}
    ours, theirs = out[COURSE]["sustained_goodput_req_s"], out[LLAMA]["sustained_goodput_req_s"]
    if theirs is None or not theirs:
        out.update(met=None, why=f"not measured: {LLAMA} met the budget at no rate tried (or did not run)")
    elif ours is None:
        out.update(ratio=0.0, met=False, why=f"{COURSE} met the budget at no rate tried")
    else:
        out.update(ratio=ours / theirs, met=ours / theirs >= GOAL_RATIO)
        if out[COURSE]["met_at_highest_rate_tried"]:
            out["why"] = f"a lower bound: {COURSE} still met the budget at the highest rate tried"
    return out


def verdicts(rows: list[dict]) -> list[str]:
    """One line per rate: which engine met the budget there, with its goodput and p90 TTFT."""
    out = []
    for rate in sorted({r["rate_req_s"] for r in rows}):
        parts = []
        for r in (r for r in rows if r["rate_req_s"] == rate):
            if r.get("error"):
                parts.append(f"{r['engine']}: did not run")
                continue
            ttft = r["ttft_p90_ms"]
            parts.append(f"{r['engine']} {'meets' if r['meets_budget'] else 'misses'} the budget "
                         f"({r['met_budget']}/{r['requests']} requests, goodput {r['goodput_req_s']:.2f}/s, "
                         f"TTFT p90 {'-' if ttft is None else f'{ttft:.0f} ms'})")
        out.append(f"{rate:.3g} req/s: " + "; ".join(parts))
    return out


def _row(engine: str, weights: str, threads: int, max_tokens: int, **kw) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(suite=SUITE, engine=engine, model=MODEL_NAME, weights=weights, threads=threads,
               max_tokens=max_tokens, **kw)
    rate = row["rate_req_s"]
    row["method"] = f"{engine} @ {rate:.3g} req/s" if rate else engine
    return row


def run(quick: bool = False, *, loader: Callable[[], tuple] | None = None,
        servers: dict[str, ServerFactory] | None = None, rates: list[float] | None = None,
        requests: int | None = None, max_tokens: int | None = None, threads: int | None = None,
        gguf: Path | None = None) -> dict:
    """Run the suite with ``threads`` CPU threads per server (default 1). ``servers`` (engine name -> server
    factory) and ``loader`` replace the real servers and model for tests; ``rates`` (requests/s) replace the ones
    derived from llama.cpp's serial capacity."""
    check_flag("quick", quick)  # before loading anything
    size = QUICK if quick else FULL
    requests = requests or size["requests"]
    max_tokens = max_tokens or size["max_tokens"]
    before = torch.get_num_threads()
    threads = threads or 1
    torch.set_num_threads(threads)  # the course's engine computes in this process
    try:
        return _run(quick, loader, servers, rates, requests, max_tokens, threads, gguf, size)
    finally:
        torch.set_num_threads(before)


def _run(quick, loader, servers, rates, requests, max_tokens, threads, gguf, size) -> dict:
    weights = {COURSE: "float32 (the shipped Q4_1, dequantized)", LLAMA: "F32 GGUF made from the shipped Q4_1"}
    rows: list[dict] = []
    if servers is None:
        servers, skipped = _real_servers(loader, threads, gguf)
        rows += [_row(eng, weights[eng], threads, max_tokens, note="skipped", error=why)
                 for eng, why in skipped.items()]
    if not servers:
        return {"machine": {"serve_real_goal": goal(rows)}, "rows": rows}
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:  # every server started is stopped, whatever fails after it
        urls = {}
        for name, factory in servers.items():
            try:
                urls[name] = stack.enter_context(factory())
            except Exception as e:  # one server that will not start: its row says why, the other still runs
                log.warning("%s did not start: %s", name, e)
                rows.append(_row(name, weights.get(name, ""), threads, max_tokens, error=str(e)[:500]))
        if not urls:
            return {"machine": {"serve_real_goal": goal(rows)}, "rows": rows}
        serial = {name: serial_seconds(url, max_tokens) for name, url in urls.items()}
        base = serial.get(LLAMA) or min(serial.values())
        rates = list(rates) if rates else [f / base for f in size["factors"]]
        for r in side_by_side(urls, rates, requests, max_tokens):
            eng = r.pop("engine")
            keep = {k: v for k, v in r.items() if k in COLUMNS and k not in ("max_tokens", "model")}
            rows.append(_row(eng, weights.get(eng, ""), threads, max_tokens, **keep, meets_budget=meets(r)))
    for r in rows:
        r["weights"] = r["weights"] or weights.get(r["engine"], "")
    log.info("serve-real suite took %.0f s", time.perf_counter() - t0)
    return {"machine": {"serve_real_goal": goal(rows), "serve_real_serial_s": serial,
                        "serve_real_threads": threads,
                        "serve_real_verdicts": verdicts([r for r in rows if r["rate_req_s"]])}, "rows": rows}


def _real_servers(loader, threads: int, gguf: Path | None) -> tuple[dict[str, ServerFactory], dict[str, str]]:
    """The two real servers' factories, and for each one that cannot run, why."""
    servers: dict[str, ServerFactory] = {}
    skipped: dict[str, str] = {}
    model, tok = loader() if loader else load_engine_model(torch.float32)
    servers[COURSE] = lambda: course_server(model, tok)
    if importlib.util.find_spec("llama_cpp") is None:
        skipped[LLAMA] = LLAMA_INSTALL_HINT
    else:
        try:
            f32 = gguf or gguf_variant("F32", shipped_gguf())
            ctx = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
            servers[LLAMA] = lambda: llama_server(f32, threads, n_ctx=min(ctx, 2048))
        except (ValueError, RuntimeError, OSError) as e:
            skipped[LLAMA] = str(e)
    return servers, skipped

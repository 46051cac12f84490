"""Benchmark suite ``serve``: why servers batch, measured on a speed-lab model.

Rows (``suite="serve"``):

* ``batch-N`` - one decode step at batch N: ``throughput_tok_s`` (all rows) and
  ``tpot_ms`` (each user's time per output token);
* ``static-bM`` / ``continuous-bM`` - the same Poisson request stream served by
  the in-process simulation of :mod:`course_lib.serving` with at most M rows:
  throughput, TTFT and end-to-end latency percentiles, wasted rows;
* ``paged-bM`` - the same stream over a paged KV cache (blocks of 16 tokens):
  peak KV memory in blocks against a contiguous cache that reserves the
  longest length per request (``kv_paged_peak_mb``, ``kv_contiguous_peak_mb``);
* ``prefix-off`` / ``prefix-on`` - requests sharing a system prompt, without
  and with prefix caching: median TTFT over interleaved rounds with its
  p10-p90 spread, prompt tokens whose prefill was skipped;
* ``chunk-none`` / ``chunk-C`` - short requests decoding while a long prompt
  arrives, prefilled whole or in chunks of C tokens: the other requests'
  median TPOT and worst gap between two tokens, over interleaved rounds.

Throughput here is *not* batch-1 decode speed, so these rows use
``throughput_tok_s`` rather than ``decode_tok_s`` (the report's roofline plot
is about batch 1).
"""

from __future__ import annotations

import logging
import statistics

from .._checks import check_flag
from ..models import speed_lab_model
from ..serving import (
    ServeConfig,
    batch_sweep,
    interleaved_runs,
    others_latency,
    poisson_requests,
    serve,
    spread,
    with_long_prompt,
)

log = logging.getLogger(__name__)

MODEL = "smollm2-135m"


def run(quick: bool = False) -> dict:
    """The batch sweep and both scheduling policies; ``quick`` cuts depth, batches and requests."""
    check_flag("quick", quick)  # before minutes of loading and timing
    layers = 4 if quick else None
    model, cfg = speed_lab_model(MODEL, num_layers=layers)
    label = f"{MODEL}" + (f" ({layers} layers)" if layers else "")
    rows = []
    for r in batch_sweep(model, [1, 2, 4, 8] if quick else [1, 2, 4, 8, 16, 32], context=64,
                         warmup=1, repeat=3 if quick else 7):
        rows.append(dict(suite="serve", method=f"batch-{r['batch']}", model=label,
                         throughput_tok_s=r["throughput_tok_s"], tpot_ms=r["tpot_ms"]))
    server, _ = speed_lab_model(MODEL, num_layers=2 if quick else 8)
    requests = poisson_requests(16 if quick else 64, rate_per_s=20.0 if quick else 8.0, vocab=cfg.vocab_size,
                                prompt_len=(8, 32), new_tokens=(2, 24 if quick else 64), seed=0)
    serve(server, requests[:2], ServeConfig("continuous", 8))  # warm-up
    for policy in ("static", "continuous"):
        s = serve(server, requests, ServeConfig(policy, 8)).summary()
        rows.append(dict(suite="serve", method=f"{policy}-b8", model=f"{MODEL} ({2 if quick else 8} layers)",
                         requests=s["requests"], throughput_tok_s=s["throughput_tok_s"],
                         ttft_p50_s=s["ttft_p50_s"], latency_p90_s=s["latency_p90_s"],
                         wasted_frac=s["wasted_frac"]))
    rows += paged_rows(server, cfg.vocab_size, quick, f"{MODEL} ({2 if quick else 8} layers)", requests)
    return {"machine": {}, "rows": rows}


def _p(values: list[float]) -> dict:
    r = spread(values)
    return dict(median=r.median, p10=r.p10, p90=r.p90)


def paged_rows(server, vocab: int, quick: bool, label: str, requests) -> list[dict]:
    """Rows for the paged KV cache, prefix caching and chunked prefill (``rounds`` interleaved runs each)."""
    rounds = 3 if quick else 5
    rows = []
    s = serve(server, requests, ServeConfig("continuous", 8, kv="paged", block_size=16)).summary()
    rows.append(dict(suite="serve", method="paged-b8", model=label, requests=s["requests"],
                     throughput_tok_s=s["throughput_tok_s"], kv_paged_peak_mb=s["kv_paged_peak_mb"],
                     kv_contiguous_peak_mb=s["kv_contiguous_peak_mb"], kv_stored_peak_mb=s["kv_stored_peak_mb"],
                     kv_saved_frac=1 - s["kv_paged_peak_mb"] / s["kv_contiguous_peak_mb"]))
    shared = poisson_requests(12 if quick else 32, rate_per_s=10.0, vocab=vocab, prompt_len=(4, 16),
                              new_tokens=(2, 8), seed=1, shared_prefix=64 if quick else 256)
    runs = interleaved_runs(server, shared, {
        "prefix-off": ServeConfig(kv="paged", block_size=16),
        "prefix-on": ServeConfig(kv="paged", block_size=16, prefix_cache=True)}, rounds=rounds)
    for name, reps in runs.items():
        ttft = _p([r.summary()["ttft_p50_s"] for r in reps])
        last = reps[-1].summary()
        rows.append(dict(suite="serve", method=name, model=label, requests=last["requests"],
                         throughput_tok_s=statistics.median(r.throughput_tok_s for r in reps),
                         ttft_p50_s=ttft["median"], ttft_p50_p10_s=ttft["p10"], ttft_p50_p90_s=ttft["p90"],
                         prefill_tokens_skipped=last["prefill_tokens_skipped"],
                         prefix_hit_blocks=last["prefix_hit_blocks"], rounds=rounds))
    chunk = 32 if quick else 64
    mixed, long_rid = with_long_prompt(4, vocab, long_len=256 if quick else 1024, short_new=16 if quick else 48)
    runs = interleaved_runs(server, mixed, {
        "chunk-none": ServeConfig(kv="paged", block_size=16),
        f"chunk-{chunk}": ServeConfig(kv="paged", block_size=16, prefill_chunk=chunk)}, rounds=rounds)
    for name, reps in runs.items():
        other = [others_latency(r, long_rid) for r in reps]
        tpot, gap = _p([o["tpot_p50_s"] for o in other]), _p([o["max_gap_p50_s"] for o in other])
        long_ttft = _p([next(f.ttft_s for f in r.finished if f.rid == long_rid) for r in reps])
        rows.append(dict(suite="serve", method=name, model=label, requests=len(mixed),
                         throughput_tok_s=statistics.median(r.throughput_tok_s for r in reps),
                         others_tpot_ms=tpot["median"] * 1e3, others_tpot_p10_ms=tpot["p10"] * 1e3,
                         others_tpot_p90_ms=tpot["p90"] * 1e3, others_max_gap_ms=gap["median"] * 1e3,
                         long_prompt_ttft_s=long_ttft["median"], rounds=rounds))
    return rows

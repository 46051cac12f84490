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
  median TPOT and worst gap between two tokens, over interleaved rounds;
* ``kv-fp32`` / ``kv-bf16`` / ``kv-int8`` / ``kv-int4-g32`` - the KV cache stored in each format
  (:mod:`course_lib.kv_quant`): bytes per token and the largest batch of 4,096-token sequences whose cache
  fits 1 GiB (SmolLM2-135M's full shape), a decode step at a long context with the from-scratch static
  cache (interleaved rounds, median and p10-p90), and on the real model (SmolLM2-135M-Instruct) prose
  perplexity read through the quantized cache and greedy-answer agreement with the float cache;
* ``paged-kv-fp32-budget`` / ``paged-kv-int8-budget`` - the paged server given the same KV bytes in each
  format: how many requests it ran at once (mean batch) and the throughput that bought.

``machine["kv_quant_goals"]`` checks the goals: int8 KV costs under 1% prose perplexity and fits at least
1.8x the batch of a bf16 cache in the same memory.

Throughput here is *not* batch-1 decode speed, so these rows use
``throughput_tok_s`` rather than ``decode_tok_s`` (the report's roofline plot
is about batch 1).
"""

from __future__ import annotations

import logging
import statistics

import torch

from .._checks import check_flag
from ..decode_speed import kv_cache_step_times
from ..kv_quant import KVQuantConfig, kv_bytes_per_token, max_batch
from ..metrics import answer_agreement, greedy_answers, prose_perplexity
from ..models import load_model, speed_lab_config, speed_lab_model
from ..prompts import prompts
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
from ..serving.scheduler import blocks_needed

log = logging.getLogger(__name__)

MODEL = "smollm2-135m"
REAL_MODEL = "smollm2-135m-instruct"
# name -> (stored format, float dtype of the values): the float rows are the caches a practitioner compares with
KV_FORMATS = {"kv-fp32": (None, torch.float32), "kv-bf16": (None, torch.bfloat16),
              "kv-int8": (KVQuantConfig(bits=8), None), "kv-int4-g32": (KVQuantConfig(bits=4, group_size=32), None)}
KV_BUDGET_BYTES = 1 << 30
KV_CONTEXT = 4096
GOAL_INT8_PPL_COST = 0.01
GOAL_INT8_BATCH = 1.8


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
    kv, goals = kv_quant_rows(quick)
    rows += kv + kv_budget_rows(server, cfg.vocab_size, quick, f"{MODEL} ({2 if quick else 8} layers)")
    return {"machine": {"kv_quant_goals": goals}, "rows": rows}


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


def kv_quant_rows(quick: bool) -> tuple[list[dict], dict]:
    """One row per KV-cache format: bytes and batch, a decode step at a long context, real-model quality."""
    full = speed_lab_config(MODEL)  # bytes and batches are arithmetic on the full shape
    layers, context = (4, 1024) if quick else (None, KV_CONTEXT)
    model, _ = speed_lab_model(MODEL, num_layers=layers)  # float32, as the real model runs here
    timed = {name: q for name, (q, dt) in KV_FORMATS.items() if dt in (None, torch.float32)}
    steps = kv_cache_step_times(model, context, timed, rounds=3 if quick else 7)
    del model
    rows = []
    for name, (q, dtype) in KV_FORMATS.items():
        row = dict(suite="serve", method=name, model=MODEL, kv_bytes_per_token=kv_bytes_per_token(full, q, dtype),
                   kv_budget_mb=KV_BUDGET_BYTES / 1e6, kv_context=KV_CONTEXT,
                   max_batch_in_budget=max_batch(full, KV_BUDGET_BYTES, KV_CONTEXT, q, dtype or torch.float32))
        if name in steps:
            r = steps[name]
            row.update(step_context=context, step_model=f"{MODEL} ({layers or full.num_hidden_layers} layers)",
                       step_ms=r.median * 1e3, step_p10_ms=r.p10 * 1e3, step_p90_ms=r.p90 * 1e3,
                       step_vs_fp32=r.median / steps["kv-fp32"].median)
        rows.append(row)
    by = {r["method"]: r for r in rows}
    for r in rows:
        r["batch_vs_bf16"] = r["max_batch_in_budget"] / by["kv-bf16"]["max_batch_in_budget"]
    quality, info = _kv_quality(quick)
    for r in rows:
        r.update(quality.get(r["method"], {}))
    ppl_cost = by["kv-int8"].get("ppl_vs_fp32")
    goals = dict(info, int8_ppl_cost=ppl_cost, int8_batch_vs_bf16=by["kv-int8"]["batch_vs_bf16"],
                 goal_ppl_cost=GOAL_INT8_PPL_COST, goal_batch=GOAL_INT8_BATCH,
                 met_ppl=None if ppl_cost is None else ppl_cost < GOAL_INT8_PPL_COST,
                 met_batch=by["kv-int8"]["batch_vs_bf16"] >= GOAL_INT8_BATCH)
    return rows, goals


def _kv_quality(quick: bool) -> tuple[dict, dict]:
    """Prose perplexity and answer agreement of the real model reading its KV cache in each stored format."""
    prose_tokens, seq_len, per_kind, n_tokens = (1024, 512, 2, 8) if quick else (8192, 2048, None, 16)
    info = dict(quality_model=REAL_MODEL, prose_tokens=prose_tokens, prose_seq_len=seq_len, answer_tokens=n_tokens)
    try:
        model, tok = load_model(REAL_MODEL)
    except ValueError as e:  # the wheel is not installed: the quality columns say why instead of failing the suite
        log.warning("real model unavailable: %s", e)
        return {}, dict(info, quality_error=str(e))
    asked = prompts(per_kind)
    reference = greedy_answers(model, tok, asked, n_tokens)
    out = {}
    with torch.inference_mode():
        for name, (q, dtype) in KV_FORMATS.items():
            if dtype == torch.bfloat16:
                continue  # the model runs in float32 here: its float cache is the fp32 row
            ppl = prose_perplexity(model, tok, max_tokens=prose_tokens, seq_len=seq_len, batch_size=1, kv_quant=q)
            row = dict(prose_ppl=ppl, prose_seq_len=seq_len, prose_tokens=prose_tokens)
            if q is not None:
                agree = answer_agreement(model, tok, reference, asked, n_tokens, kv_quant=q)
                row.update(agree_first_token=agree.first_token, agree_exact=agree.exact, agree_prefix=agree.prefix,
                           agree_prompts=len(agree.rows), agree_tokens=n_tokens)
            out[name] = row
    for row in out.values():
        row["ppl_vs_fp32"] = row["prose_ppl"] / out["kv-fp32"]["prose_ppl"] - 1
    return out, dict(info, agree_prompts=len(asked))


def kv_budget_rows(server, vocab: int, quick: bool, label: str) -> list[dict]:
    """The paged server with the same KV bytes stored as fp32 and as int8: how many requests run at once."""
    requests = poisson_requests(16 if quick else 48, rate_per_s=50.0, vocab=vocab, prompt_len=(48, 96),
                                new_tokens=(8, 16 if quick else 32), seed=2)
    bs = 16
    float_blocks = 3 * blocks_needed(max(len(r.prompt_ids) + r.max_new_tokens for r in requests), bs)
    budget = float_blocks * kv_bytes_per_token(server.config, None, torch.float32) * bs
    rows = []
    for name, q in (("paged-kv-fp32-budget", None), ("paged-kv-int8-budget", KVQuantConfig(bits=8))):
        blocks = budget // (kv_bytes_per_token(server.config, q, torch.float32) * bs)
        s = serve(server, requests, ServeConfig("continuous", 32, kv="paged", block_size=bs, kv_blocks=blocks,
                                                kv_quant=q)).summary()
        rows.append(dict(suite="serve", method=name, model=label, requests=s["requests"], kv_blocks=blocks,
                         kv_budget_mb=budget / 1e6, mean_batch=s["mean_batch"],
                         throughput_tok_s=s["throughput_tok_s"], ttft_p50_s=s["ttft_p50_s"],
                         latency_p90_s=s["latency_p90_s"]))
    return rows

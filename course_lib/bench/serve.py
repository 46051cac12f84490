"""Benchmark suite ``serve``: why servers batch, measured on a speed-lab model.

Rows (``suite="serve"``):

* ``batch-N`` - one decode step at batch N: ``throughput_tok_s`` (all rows) and
  ``tpot_ms`` (each user's time per output token);
* ``static-bM`` / ``continuous-bM`` - the same Poisson request stream served by
  the in-process simulation of :mod:`course_lib.serving` with at most M rows:
  throughput, TTFT and end-to-end latency percentiles, wasted rows.

Throughput here is *not* batch-1 decode speed, so these rows use
``throughput_tok_s`` rather than ``decode_tok_s`` (the report's roofline plot
is about batch 1).
"""

from __future__ import annotations

import logging

from .._checks import check_flag
from ..models import speed_lab_model
from ..serving import ServeConfig, batch_sweep, poisson_requests, serve

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
    return {"machine": {}, "rows": rows}

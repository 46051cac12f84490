"""Benchmark suite ``prune``: does pruning make decode faster, and what does it cost in quality?

Speed is measured on a speed-lab model (published SmolLM2-135M shapes, grouped-
query attention, random weights), quality on the embedded ``course-tiny``.
Methods: ``dense``, ``unstructured-50`` (half the decoder weights zeroed,
same shapes), ``structured-30`` / ``structured-50`` (MLP channels and whole KV
groups removed), ``structured-50-hidden`` (structured-50 and a quarter of the
hidden size), ``structured-30-recovered`` (structured-30 plus a short
recovery fine-tune, distilled from the dense model, at most 10 minutes of CPU).

Methods are timed *interleaved* (dense, pruned, dense, ...) so a machine whose
load changes during the run slows all of them alike; ratios are what to read.
Every speed row carries its ``ceiling``: the dense model's weight bytes read per
decode step over this model's (the embedding and LM head are never pruned by the
MLP/head cuts, so Amdahl caps structured-50 well below 2x).

The full run also times decode through the compiled static-cache loop
(``decode="compiled"``, chapter 03's ``CompiledDecoder``) for the dense,
structured-50 and structured-50-hidden models, where most of the per-step
Python overhead is gone, and repeats dense vs structured-50 on Llama-3.2-1B's shapes:
there 50% of the heads is exactly half (8 KV groups; SmolLM2's 3 round to one
removed) and the unpruned head is a smaller share. Memory: 11.3 GB at peak,
measured (the 1B model in float32, copied once to prune it); time: 16 minutes
on 2 cores (compiling: 35-80 s per model).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .._checks import check_flag
from ..decode_speed import decode_speed
from ..metrics import model_size_bytes, perplexity
from ..models import count_parameters, load_model, speed_lab_model
from ..pruning import PruneConfig, RecoveryConfig, pruned, recover_, speedup_ceiling

log = logging.getLogger(__name__)

SPEED_MODEL = "smollm2-135m"
LARGE_SPEED_MODEL = "llama-3.2-1b"  # full run only
COMPILED = ("dense", "structured-50", "structured-50-hidden")  # full run: also timed through CompiledDecoder
QUALITY_MODEL = "course-tiny"
METHODS = {
    "unstructured-50": PruneConfig(ratio=0.5, method="unstructured"),
    "structured-30": PruneConfig(ratio=0.3),
    "structured-50": PruneConfig(ratio=0.5),
    # The same plus a quarter of the hidden size: the one cut that also shrinks the embedding and the LM head,
    # which the MLP/head cuts never touch (on SmolLM2-135M they are 28 M of the 135 M parameters).
    "structured-50-hidden": PruneConfig(ratio=0.5, hidden_ratio=0.25),
}


def _row(method: str, model_name: str, m, tok_s: float | None, prefill_ms: float | None,
         ppl: float | None, dense_tok_s: float | None) -> dict:
    return {
        "suite": "prune", "method": method, "model": model_name,
        "decode_tok_s": tok_s, "speedup": (tok_s / dense_tok_s) if tok_s and dense_tok_s else None,
        "prefill_ms": prefill_ms, "bytes": model_size_bytes(m), "params": count_parameters(m), "ppl": ppl,
    }


def speed_rows(model_name: str, layers: int | None, methods: list[str], quick: bool, compiled: bool) -> list[dict]:
    """Build the dense speed-lab model and each pruned copy, time them interleaved, one row per (model, loop)."""
    dense, cfg = speed_lab_model(model_name, num_layers=layers)
    prompt = torch.randint(0, cfg.vocab_size, (32 if quick else 128,), generator=torch.Generator().manual_seed(0))
    models = {"dense": dense}
    for name in methods:
        models[name], rep = pruned(dense, METHODS[name])
        log.info("%s %s: %s", model_name, name, rep)
    label = model_name + (f" ({layers} layers)" if layers else "")
    new_tokens, rounds = (16, 3) if quick else (32, 5)
    loops = [("eager", models)]
    if compiled:
        loops.append(("compiled", {k: m for k, m in models.items() if k in COMPILED}))
    rows = []
    for loop, group in loops:
        errors: dict[str, str] = {}
        speed = decode_speed(group, prompt, new_tokens=new_tokens, rounds=rounds, errors=errors,
                             compiled=loop == "compiled")
        dense_tok_s = speed.get("dense", (None,))[0]
        for name, m in group.items():
            tok_s, pre = speed.get(name, (None, None))
            row = _row(name, label, m, tok_s, pre, None, dense_tok_s)
            row.update(decode=loop, ceiling=round(speedup_ceiling(dense, m), 3))
            if name in errors:
                row["error"] = errors[name]
            rows.append(row)
    return rows


def run(quick: bool = False) -> dict:
    """Measure every method; see the module docstring."""
    check_flag("quick", quick)  # before minutes of loading and timing
    torch.manual_seed(0)
    rows: list[dict] = []

    # --- speed: speed-lab shapes (quick mode keeps fewer layers: less time, same per-layer shapes)
    layers = 12 if quick else None
    rows += speed_rows(SPEED_MODEL, layers, list(METHODS), quick, compiled=not quick)
    if not quick:
        rows += speed_rows(LARGE_SPEED_MODEL, None, ["structured-50"], quick, compiled=True)
    label = SPEED_MODEL + (f" ({layers} layers)" if layers else "")

    # --- quality: the course model, held-out perplexity
    teacher, tok = load_model(QUALITY_MODEL)
    ppl_tokens = 8192 if quick else 32768
    ev = lambda m: perplexity(m, tok, max_tokens=ppl_tokens)  # noqa: E731
    from ..data import calibration_batches, encode_split

    calib = calibration_batches(tok, n=8, seq_len=128)
    qmodels = {"dense": teacher}
    for name, pc in METHODS.items():
        qcfg = pc if pc.method == "unstructured" else replace(pc, importance="taylor")
        qmodels[name], _ = pruned(teacher, qcfg, calibration=calib)
    rec, _ = pruned(teacher, PruneConfig(ratio=0.3, importance="taylor"), calibration=calib)
    rcfg = RecoveryConfig(steps=60 if quick else 600, lr=3e-4, batch_size=8, seq_len=128,
                          distill_alpha=0.5, max_seconds=120.0 if quick else 600.0)
    train_ids = encode_split(tok, "train", max_chars=2_000_000 if quick else None)
    curve = recover_(rec, train_ids, rcfg, teacher=teacher)
    log.info("recovery: %d steps in %.0f s", curve.steps_done, curve.seconds)
    qmodels["structured-30-recovered"] = rec
    qspeed = decode_speed(qmodels, torch.randint(0, tok.vocab_size, (32,)), new_tokens=16, rounds=3)
    for name, m in qmodels.items():
        row = _row(name, QUALITY_MODEL, m, *qspeed[name], ev(m), qspeed["dense"][0])
        if name == "structured-30-recovered":
            row["recovery_s"] = round(curve.seconds, 1)
            row["recovery_steps"] = curve.steps_done
        rows.append(row)
    speed_models = label if quick else f"{label}, {LARGE_SPEED_MODEL}"
    return {"machine": {"prune_speed_model": speed_models, "quality_model": QUALITY_MODEL}, "rows": rows}

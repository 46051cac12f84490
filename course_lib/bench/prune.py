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
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..metrics import model_size_bytes, perplexity
from ..models import count_parameters, load_model, speed_lab_model
from ..pruning import PruneConfig, RecoveryConfig, pruned, recover_
from ..timing import decode_speed

log = logging.getLogger(__name__)

SPEED_MODEL = "smollm2-135m"
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


def run(quick: bool = False) -> dict:
    """Measure every method; see the module docstring."""
    torch.manual_seed(0)
    rows: list[dict] = []

    # --- speed: speed-lab shapes (quick mode keeps fewer layers: less time, same per-layer shapes)
    layers = 12 if quick else None
    dense, cfg = speed_lab_model(SPEED_MODEL, num_layers=layers)
    prompt = torch.randint(0, cfg.vocab_size, (32 if quick else 128,), generator=torch.Generator().manual_seed(0))
    models = {"dense": dense}
    for name, pc in METHODS.items():
        models[name], rep = pruned(dense, pc)
        log.info("%s: %s", name, rep)
    speed = decode_speed(models, prompt, new_tokens=16 if quick else 32, rounds=3 if quick else 5)
    label = SPEED_MODEL + (f" ({layers} layers)" if layers else "")
    for name, m in models.items():
        rows.append(_row(name, label, m, *speed[name], None, speed["dense"][0]))
    del models, dense

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
    return {"machine": {"prune_speed_model": label, "quality_model": QUALITY_MODEL}, "rows": rows}

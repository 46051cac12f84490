"""Benchmark suite ``prune``: does pruning make decode faster, and what does it cost in quality?

Speed is measured on a speed-lab model (published SmolLM2-135M shapes, grouped-
query attention, random weights), quality on the embedded ``course-tiny`` and,
beside it, on the real chat model SmolLM2-135M-Instruct (:data:`REAL_MODEL`).
Methods: ``dense``, ``unstructured-50`` (half the decoder weights zeroed,
same shapes), ``structured-30`` / ``structured-50`` (MLP channels and whole KV
groups removed), ``structured-50-hidden`` (structured-50 and a quarter of the
hidden size), ``structured-30-recovered`` (structured-30 plus a short
recovery fine-tune, distilled from the dense model, at most 10 minutes of CPU).

The real model's rows (:func:`real_rows`) prune it *without* recovery training, so they show what a cut
costs a pretrained model as it stands: parameters, size, prose perplexity on the fixed slice of
``pydoc_data.topics``, answer agreement with the unpruned model on :mod:`course_lib.prompts`, and decode
speed against the dense model, timed interleaved. Channels and KV groups are ranked by Taylor importance
on train-split prose; one row ranks by weight magnitude instead, because on this model that choice
alone decides between a small loss and a broken model (the figures: docs/pruning.md, "Benchmark").

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
removed) and the unpruned head is a smaller share. Its memory and time (the 1B model in float32, copied
once to prune it) are in docs/pruning.md, "Benchmark".
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .._checks import check_flag
from ..data import calibration_batches, encode_prose, encode_split, prose_calibration_batches
from ..decode_speed import decode_speed
from ..metrics import answer_agreement, greedy_answers, model_size_bytes, perplexity, prose_perplexity
from ..models import count_parameters, load_model, speed_lab_model
from ..prompts import prompts
from ..pruning import PruneConfig, RecoveryConfig, pruned, recover_, speedup_ceiling, taylor_importance
from ..real_model import is_real_model, model_source

log = logging.getLogger(__name__)

SPEED_MODEL = "smollm2-135m"
LARGE_SPEED_MODEL = "llama-3.2-1b"  # full run only
COMPILED = ("dense", "structured-50", "structured-50-hidden")  # full run: also timed through CompiledDecoder
QUALITY_MODEL = "course-tiny"
REAL_MODEL = "smollm2-135m-instruct"
# The real model's measurement sizes, (quick, full): prose tokens of the fixed slice (8,192 = all of it),
# agreement prompts per kind (None = all 50), answer tokens compared, decode rounds.
REAL_PROSE_TOKENS = (2048, 8192)
REAL_PROMPTS_PER_KIND = (3, None)
REAL_ANSWER_TOKENS = 16
REAL_ROUNDS = (3, 5)
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


def real_methods(config) -> dict[str, PruneConfig]:
    """The real model's cuts: 10% and 25% of the MLP channels, and one whole KV group (GQA: with its query heads).

    Widths stay multiples of 32 (packed kernels like aligned shapes), so "10%" removes 128 of SmolLM2's 1,536
    channels (8.3%) and "25%" 384. ``importance`` is filled in by :func:`real_rows` (scores computed once).
    """
    n_kv = config.num_key_value_heads
    methods = {
        "mlp-10": PruneConfig(ratio=0.1, target="mlp", round_to=32),
        "mlp-25": PruneConfig(ratio=0.25, target="mlp", round_to=32),
        "mlp-10-magnitude": PruneConfig(ratio=0.1, target="mlp", round_to=32),
    }
    if n_kv > 1:  # a single KV group cannot lose one
        methods[f"heads-1of{n_kv}-kv"] = PruneConfig(ratio=0.0, target="heads", head_ratio=1 / n_kv)
    return methods


def real_rows(quick: bool, model_name: str = REAL_MODEL) -> list[dict]:
    """Rows for the real model: dense and each cut of :func:`real_methods`, no recovery training.

    Quality: prose perplexity on the fixed slice and answer agreement with the dense model's greedy
    answers; speed: every model's decode timed interleaved against the dense one, with its byte ceiling.
    """
    i = 0 if quick else 1
    dense, tok = load_model(model_name)
    source = model_source().kind if is_real_model(model_name) else model_name
    prose_tokens = REAL_PROSE_TOKENS[i]
    asked = prompts(REAL_PROMPTS_PER_KIND[i])
    reference = greedy_answers(dense, tok, asked, n_tokens=REAL_ANSWER_TOKENS)
    calib = prose_calibration_batches(tok, n=8, seq_len=128)
    taylor = taylor_importance(dense, calib)  # once on the dense model; every Taylor cut ranks by it
    models = {"dense": dense}
    for name, pc in real_methods(dense.config).items():
        importance = "magnitude" if name.endswith("-magnitude") else (lambda m, c, s=taylor: s)
        models[name], rep = pruned(dense, replace(pc, importance=importance))
        log.info("%s %s: %s", model_name, name, rep)
    quality = {}
    for name, m in models.items():
        agree = answer_agreement(m, tok, reference, asked, n_tokens=REAL_ANSWER_TOKENS)
        quality[name] = dict(ppl=prose_perplexity(m, tok, max_tokens=prose_tokens),
                             agree_first_token=round(agree.first_token, 3), agree_prefix=round(agree.prefix, 3),
                             agree_exact=round(agree.exact, 3))
    prompt = encode_prose(tok, "heldout", max_tokens=32)  # real text: the answer path a user would see
    speed = decode_speed(models, prompt, new_tokens=16, rounds=REAL_ROUNDS[i])
    rows = []
    for name, m in models.items():
        row = _row(name, model_name, m, *speed[name], quality[name].pop("ppl"), speed["dense"][0])
        row.update(quality[name], decode="eager", ceiling=round(speedup_ceiling(dense, m), 3),
                   importance=None if name == "dense" else ("magnitude" if name.endswith("-magnitude") else "taylor"),
                   recovery="none", quality_on=f"prose ppl ({prose_tokens} tokens), agreement ({len(asked)} "
                                             f"prompts x {REAL_ANSWER_TOKENS} tokens)", weights=source)
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

    # --- the real model: quality and speed of cuts without recovery training
    rows += real_rows(quick)
    speed_models = label if quick else f"{label}, {LARGE_SPEED_MODEL}"
    return {"machine": {"prune_speed_model": speed_models, "quality_model": QUALITY_MODEL,
                        "real_model": REAL_MODEL}, "rows": rows}

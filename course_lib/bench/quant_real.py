"""The quant suite on the real model, SmolLM2-135M-Instruct: what each format does to its quality and answers.

course-tiny's rows judge formats on a 5.6M model, where int4 looks free. These
rows judge them on a real pretrained 135M chat model: prose perplexity (the
fixed slice of ``pydoc_data.topics``), held-out code perplexity, and answer
agreement with the float model on the fixed prompts of :mod:`course_lib.prompts`.

Formats: fp32 (the baseline; from the GGUF it carries Q4_1 rounding, see the
``source`` field), int8 weight-only, W8A8 (int8 activations per token) without
and with SmoothQuant (alpha 0.5), int4 RTN, GPTQ and AWQ with group size 32
(576, the hidden size, is not a multiple of 128: group 128 would leave most
projections in float, which ``float_linears`` would show), and per-channel
4-bit, simulated with fake quantization (the packed int4 kernel needs groups).
GPTQ, AWQ and SmoothQuant share one set of prose calibration windows.

The goals checked (in ``machine["real_model_goals"]``): int4 RTN costs at
least 2% prose perplexity with every projection quantized, and GPTQ at the
same bits and group closes at least 25% of RTN's gap to fp32.
"""

from __future__ import annotations

import copy
import gc
import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import real_model
from ..data import prose_calibration_batches
from ..metrics import answer_agreement, code_perplexity, greedy_answers, prose_perplexity, stored_weight_bytes
from ..models import count_parameters, load_model
from ..prompts import prompts
from ..quantization import fake_quantize_model_, preset, quantize_
from ..timing import error_text

log = logging.getLogger(__name__)

MODEL = "smollm2-135m-instruct"
GROUP = 32
METHODS = ("fp32", "int8-wo", "w8a8", "w8a8-sq0.5", "int4-wo-g32", "w4a8-g32", "gptq-int4-g32", "awq-int4-g32",
           "int4-per-channel-fake")
GOAL_RTN_COST = 0.02
GOAL_GPTQ_CLOSES = 0.25
# How much each row measures: tokens of prose (the 8,192-token slice, or its first part in quick mode) and of
# held-out code, agreement prompts per kind (None: all 50) and answer tokens compared, GPTQ calibration windows.
SIZES = {
    # GPTQ needs more calibration tokens than the 576 inputs of a projection: with 512 it did worse than RTN.
    True: dict(prose_tokens=1024, code_tokens=1024, per_kind=2, n_tokens=8, calib_n=8, calib_len=256),
    False: dict(prose_tokens=8192, code_tokens=8192, per_kind=None, n_tokens=16, calib_n=16, calib_len=256),
}


def _variant(method: str, base: nn.Module, calibration: torch.Tensor) -> tuple[nn.Module, dict]:
    """A compressed copy of ``base`` (fp32: ``base`` itself) and what was done to it."""
    if method == "fp32":
        return base, {"float_linears": 0}
    model = copy.deepcopy(base)
    if method == "int4-per-channel-fake":
        n = fake_quantize_model_(model, 4, symmetric=False, granularity="per_channel")
        return model, {"quantized_linears": n, "float_linears": 0,
                       "note": "simulated (fake-quant, float storage); output head left in float"}
    cfg = preset(method)  # each row of this suite is named by its preset (course_lib.quantization.PRESETS)
    report = quantize_(model, cfg, calibration=calibration if cfg.needs_calibration else None)
    head = {n for n, m in model.named_modules() if "lm_head" in n}
    float_linears = [n for n in report.skipped if n not in head]
    if float_linears:  # "int4" with most projections silently left in float would be a row that lies
        log.warning("%s left %d projections in float: %s", method, len(float_linears), float_linears[:3])
    return model, {"quantized_linears": len(report.quantized), "float_linears": len(float_linears)}


def run(quick: bool = False) -> dict:
    """One row per format on the real model (errors kept in their row), and the two goals."""
    size = SIZES[bool(quick)]
    prose_tokens, code_tokens, per_kind, n_tokens = (size[k] for k in ("prose_tokens", "code_tokens", "per_kind",
                                                                      "n_tokens"))
    try:
        t0 = time.perf_counter()
        base, tok = load_model(MODEL)
        load_s = time.perf_counter() - t0
        source = real_model.model_source()
    except ValueError as e:  # the wheel is not installed: say so in the JSON instead of failing the suite
        log.warning("real model unavailable: %s", e)
        return {"machine": {"real_model": {"error": str(e)}}, "rows": [{"suite": "quant", "model": MODEL,
                                                                       "error": str(e)}]}
    asked = prompts(per_kind)
    calibration = prose_calibration_batches(tok, n=size["calib_n"], seq_len=size["calib_len"])
    reference = greedy_answers(base, tok, asked, n_tokens)
    params = count_parameters(base)
    rows = []
    for method in tqdm(METHODS, desc="quant: real model", leave=False):
        row = {"suite": "quant", "method": method, "model": MODEL, "source": source.kind, "params": params}
        try:
            t0 = time.perf_counter()
            model, info = _variant(method, base, calibration)
            row.update(info, build_s=time.perf_counter() - t0, bytes=stored_weight_bytes(model))
            with torch.inference_mode():
                row["prose_ppl"] = prose_perplexity(model, tok, max_tokens=prose_tokens)
                row["code_ppl"] = code_perplexity(model, tok, max_tokens=code_tokens)
            agree = answer_agreement(model, tok, reference, asked, n_tokens)
            row.update(agree_first_token=agree.first_token, agree_exact=agree.exact, agree_prefix=agree.prefix,
                       agree_prompts=len(agree.rows), agree_tokens=n_tokens)
            if method != "fp32":
                del model
        except Exception as e:  # one format failing must not cost the others' rows
            log.warning("%s on %s failed: %s", method, MODEL, e)
            row["error"] = error_text(e)
        rows.append(row)
        log.info("%s", row)
        gc.collect()
    by = {r["method"]: r for r in rows}
    fp = by["fp32"].get("prose_ppl")
    for r in rows:
        if fp and "prose_ppl" in r:
            r["ppl_vs_fp32"] = r["prose_ppl"] / fp - 1
            r["code_ppl_vs_fp32"] = r["code_ppl"] / by["fp32"]["code_ppl"] - 1
    goals: dict = {**size, "source": str(source), "load_s": load_s}
    if source.kind == "gguf-q4_1":
        # These weights sit exactly on a Q4_1 grid (blocks of 32, float scale and min), so a group-32 quantizer
        # with a float minimum would reproduce them with zero error; our RTN's integer zero point shifts each block
        # off that grid, and GPTQ wins back only part of that (measured: docs/quantization.md, "GPTQ on the real
        # model").
        goals["baseline_note"] = ("fp32 baseline dequantized from Q4_1: its weights lie on a 4-bit grid of blocks "
                                  "of 32; int4 g32 costs measure the integer zero point's misalignment with it")
    rtn, gptq = by["int4-wo-g32"], by["gptq-int4-g32"]
    if fp and "prose_ppl" in rtn:
        goals["int4_rtn_cost"] = rtn["ppl_vs_fp32"]
        goals["int4_rtn_all_projections"] = rtn.get("float_linears") == 0
        goals["int4_rtn_cost_goal_met"] = goals["int4_rtn_all_projections"] and rtn["ppl_vs_fp32"] >= GOAL_RTN_COST
        if "prose_ppl" in gptq and rtn["prose_ppl"] > fp:
            closed = (rtn["prose_ppl"] - gptq["prose_ppl"]) / (rtn["prose_ppl"] - fp)
            gptq["gap_closed_vs_rtn"] = goals["gptq_gap_closed"] = closed
            goals["gptq_goal_met"] = closed >= GOAL_GPTQ_CLOSES
        awq = by["awq-int4-g32"]
        if "prose_ppl" in awq and rtn["prose_ppl"] > fp:  # reported beside GPTQ; no goal of its own
            awq["gap_closed_vs_rtn"] = (rtn["prose_ppl"] - awq["prose_ppl"]) / (rtn["prose_ppl"] - fp)
    w8a8, sq = by["w8a8"], by["w8a8-sq0.5"]
    if "prose_ppl" in w8a8 and "prose_ppl" in sq and "prose_ppl" in by["int8-wo"]:
        wo = by["int8-wo"]["prose_ppl"]
        if w8a8["prose_ppl"] > wo:  # SmoothQuant's share of what rounding the activations cost
            sq["gap_closed_vs_w8a8"] = (w8a8["prose_ppl"] - sq["prose_ppl"]) / (w8a8["prose_ppl"] - wo)
    return {"machine": {"real_model_goals": goals}, "rows": rows}

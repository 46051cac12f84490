"""Benchmark suite ``distill``: teacher vs distilled student vs scratch student, and speculative decoding.

Rows: ``teacher`` (course-tiny), ``student-kd`` (course-tiny-student),
``student-scratch`` (same shape, random init, same token budget) and
``speculative-k{k}`` (the teacher, drafted by the student). Decode speed is
greedy decoding with the model's KV cache at batch size 1, median of several
runs, in one process, so the ratios are comparable.

The scratch student's perplexity comes from the training record written by
``python -m course_lib train --model course-tiny-student`` (it was trained in
that same run, on the same tokens); ``ppl_source`` says so. Its decode speed is
measured here: speed does not depend on weight values, only on shape.
"""

from __future__ import annotations

import json
import logging

import torch

from .._checks import check_flag
from ..device import device_of
from ..distillation import make_student
from ..metrics import perplexity
from ..models import EMBEDDED, count_parameters, load_model
from ..speculative import greedy_reference, speculative_generate
from ..timing import benchmark

log = logging.getLogger(__name__)

PROMPT = "def read_config(path):\n    "


def _decode_tok_s(fn, n_tokens: int, repeat: int, device: torch.device) -> float:
    return n_tokens / benchmark(fn, warmup=1, repeat=repeat, device=device).median


def run(quick: bool = False) -> dict:
    """Measure the four rows (more k in full mode); see the module docstring."""
    check_flag("quick", quick)  # before minutes of loading and timing
    teacher, tok = load_model("course-tiny")
    try:
        student, _ = load_model("course-tiny-student")
    except ValueError as e:
        raise ValueError(f"{e}. Train it with `python -m course_lib train --model course-tiny-student`") from e
    record = json.loads((EMBEDDED["course-tiny-student"] / "training.json").read_text())
    scratch = make_student(teacher, record["recipe"]["num_layers"], record["recipe"]["intermediate_size"],
                           init="random", seed=0)  # same shape: same speed
    n_new = 32 if quick else 64
    repeat = 3 if quick else 7
    eval_tokens = record.get("heldout_eval_tokens", 32768)  # the set the scratch figure was measured on
    dev = device_of(teacher)  # load_model put it on the course device
    ids = tok(PROMPT, return_tensors="pt")["input_ids"].to(dev)
    ppl = {name: perplexity(m, tok, max_tokens=eval_tokens, seq_len=256) for name, m in
           (("teacher", teacher), ("student-kd", student))}
    rows = []
    for method, model, p, src in (("teacher", teacher, ppl["teacher"], "measured"),
                                  ("student-kd", student, ppl["student-kd"], "measured"),
                                  ("student-scratch", scratch, record["heldout_ppl"].get("student_scratch"),
                                   "training.json")):
        tps = _decode_tok_s(lambda m=model: greedy_reference(m, ids, n_new), n_new, repeat, dev)
        rows.append({"suite": "distill", "method": method, "model": "course-tiny" if method == "teacher"
                     else "course-tiny-student", "decode_tok_s": tps, "params": count_parameters(model),
                     "ppl": p, "ppl_source": src, "acceptance_rate": None})
        log.info("%s: %.1f tok/s, ppl %s", method, tps, p)
    teacher_tps = rows[0]["decode_tok_s"]
    ref, _ = greedy_reference(teacher, ids, n_new)
    for k in ((4,) if quick else (1, 2, 4, 8)):
        res = speculative_generate(teacher, student, ids, n_new, k)
        tps = _decode_tok_s(lambda k=k: speculative_generate(teacher, student, ids, n_new, k), n_new, repeat, dev)
        rows.append({"suite": "distill", "method": f"speculative-k{k}", "model": "course-tiny+student-draft",
                     "decode_tok_s": tps, "params": count_parameters(teacher) + count_parameters(student),
                     "ppl": ppl["teacher"], "ppl_source": "teacher (output identical)" if res.tokens == ref
                     else "MISMATCH", "acceptance_rate": res.acceptance_rate,
                     "tokens_per_round": res.tokens_per_round})
    for r in rows:
        r["speedup_vs_teacher"] = r["decode_tok_s"] / teacher_tps
        if r["ppl"] is not None:
            r["ppl_vs_teacher"] = r["ppl"] / ppl["teacher"]
    return {"machine": {"distill_new_tokens": n_new, "distill_eval_tokens": eval_tokens,
                        "threads": torch.get_num_threads()}, "rows": rows}

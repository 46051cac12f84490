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

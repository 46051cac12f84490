"""Exercise checks of notebooks 01 and 02: each passes a right answer, names the mistake in a wrong one, and
calls an unfinished stub "not done yet"."""

import math
import statistics

import pytest
import torch

from course_lib.exercises import ch01, ch02


def _stub(*args):
    raise NotImplementedError


def _not_done(fb):
    return not fb.passed and not fb.done and "Not done yet" in fb.message


# --- 01: the token timeline --------------------------------------------------------------------------

def _stream_timing(times):
    gaps = [b - a for a, b in zip(times, times[1:])]
    return times[0], 1 / statistics.median(gaps)


def test_ch01_stream_timing_right_wrong_and_stub():
    assert ch01.check_stream_timing(_stream_timing)
    mixed = ch01.check_stream_timing(lambda t: (t[0], len(t) / t[-1]))
    assert not mixed and mixed.done and "prefill" in mixed.message
    mean = ch01.check_stream_timing(lambda t: (t[0], (len(t) - 1) / (t[-1] - t[0])))
    assert not mean and "median" in mean.message and "average" in mean.message
    inverted = ch01.check_stream_timing(lambda t: (t[0], 1 / _stream_timing(t)[1]))
    assert not inverted and "invert" in inverted.message
    gaps = ch01.check_stream_timing(lambda t: (t[0], len(t) / (t[-1] - t[0])))
    assert not gaps and "gaps" in gaps.message
    ttft = ch01.check_stream_timing(lambda t: (t[1], _stream_timing(t)[1]))
    assert not ttft and "first" in ttft.message
    assert "two numbers" in ch01.check_stream_timing(lambda t: 3.0).message
    assert "ZeroDivisionError" in ch01.check_stream_timing(lambda t: 1 / 0).message
    assert _not_done(ch01.check_stream_timing(_stub))


def test_ch01_the_timelines_have_a_hiccup_so_mean_and_median_differ():
    for t in ch01._timelines():
        gaps = [b - a for a, b in zip(t, t[1:])]
        assert max(gaps) > 3 * statistics.median(gaps)


def test_ch01_prefill_prediction_follows_the_measurement_and_the_default_is_not_done():
    assert ch01.check_prefill_prediction("faster", prefill_s=0.05, steps_s=0.64, n_tokens=64)
    wrong = ch01.check_prefill_prediction("slower", prefill_s=0.05, steps_s=0.64, n_tokens=64)
    assert not wrong and wrong.done and "weights" in wrong.message
    assert ch01.check_prefill_prediction("slower", prefill_s=1.0, steps_s=0.64, n_tokens=64)
    assert _not_done(ch01.check_prefill_prediction("?", 0.05, 0.64, 64))
    assert not ch01.check_prefill_prediction("maybe", 1, 1, 1)


# --- 02: parameters from a config, causal attention --------------------------------------------------------

def _param_count(cfg):
    h, i, L, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.head_dim
    attn = 2 * h * cfg.num_attention_heads * hd + 2 * h * cfg.num_key_value_heads * hd
    head = 0 if cfg.tie_word_embeddings else v * h
    return v * h + L * (attn + 3 * h * i + 2 * h) + h + head


def test_ch02_true_count_is_the_meta_models_and_matches_the_speed_lab():
    from course_lib.models import count_parameters, speed_lab_config, speed_lab_model

    cfg = speed_lab_config("smollm2-135m")
    assert ch02.true_parameter_count(cfg) == count_parameters(speed_lab_model("smollm2-135m", device="meta")[0])
    assert {c.tie_word_embeddings for c in ch02.llama_configs()} == {True, False}


def test_ch02_parameter_count_right_wrong_and_stub():
    assert ch02.check_parameter_count(_param_count)
    tied_twice = ch02.check_parameter_count(
        lambda c: _param_count(c) + (c.vocab_size * c.hidden_size if c.tie_word_embeddings else 0))
    assert not tied_twice and "count it once" in tied_twice.message
    no_head = ch02.check_parameter_count(
        lambda c: _param_count(c) - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size))
    assert not no_head and "tie_word_embeddings=False" in no_head.message

    def mha(c):
        c2 = type(c)(**{**c.to_dict(), "num_key_value_heads": c.num_attention_heads})
        return _param_count(c2)

    gqa = ch02.check_parameter_count(mha)
    assert not gqa and "grouped-query" in gqa.message
    norms = ch02.check_parameter_count(
        lambda c: _param_count(c) - c.num_hidden_layers * 2 * c.hidden_size - c.hidden_size)
    assert not norms and "RMSNorm" in norms.message
    assert _not_done(ch02.check_parameter_count(_stub))


def _causal(q, k, v):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    t = q.shape[2]
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def test_ch02_causal_attention_right_wrong_and_stub():
    assert ch02.check_causal_attention(_causal)
    no_mask = ch02.check_causal_attention(lambda q, k, v: _masked(q, k, v, torch.zeros(1, dtype=torch.bool)))
    assert not no_mask and "-inf" in no_mask.message
    unscaled = ch02.check_causal_attention(_unscaled)
    assert not unscaled and "sqrt(head_dim)" in unscaled.message
    flipped = ch02.check_causal_attention(
        lambda q, k, v: _masked(q, k, v, torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(-1)))
    assert not flipped and "flipped" in flipped.message
    assert "shape" in ch02.check_causal_attention(lambda q, k, v: q[..., :1]).message
    assert _not_done(ch02.check_causal_attention(_stub))


def _masked(q, k, v, hide):
    s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(hide, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _unscaled(q, k, v):
    return _causal(q * math.sqrt(q.shape[-1]), k, v)


@pytest.mark.parametrize("dim", [-2])
def test_ch02_causal_attention_names_the_softmax_axis(dim):
    def wrong_axis(q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        t = q.shape[2]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, dim=dim).nan_to_num(0.0) @ v

    fb = ch02.check_causal_attention(wrong_axis)
    assert not fb and "axis" in fb.message


def test_attempt_turns_a_stub_into_not_done_and_a_crash_into_feedback():
    from course_lib.exercises import attempt, checked, ok, require

    @checked
    def check(fn):
        return ok(f"got {attempt(fn, 2)}")

    def stub(x):
        raise NotImplementedError

    fb = check(stub)
    assert not fb.passed and not fb.done and "Not done yet" in fb.message and "`stub`" in fb.message
    fb = check(lambda x: 1 / 0)
    assert not fb.passed and fb.done and "ZeroDivisionError" in fb.message
    assert check(lambda x: x * 2).passed and require(check(lambda x: x)).passed
    with pytest.raises(AssertionError, match="reference solution failed"):
        require(check(stub))


# --- the pattern in the notebooks of chapters 01-04 and 08 -------------------------------------------------

def exercise_pattern_problems(path) -> list[str]:
    """What breaks the stub -> check -> hidden reference pattern in a notebook (an empty list when none does).

    Each ``def my_x`` stub raises NotImplementedError (an answer stub is ``my_x = None`` or ``"?"``); a later
    cell checks ``my_x``; after that check a hidden cell defines ``solution_x`` under its own name and runs
    ``require(...)``; no other cell rebinds ``my_x``, so Run All checks the learner's code, never the solution.
    """
    import ast
    import json
    import re

    cells = json.loads(path.read_text())["cells"]
    code = [(i, "".join(c["source"]), bool(c["metadata"].get("jupyter", {}).get("source_hidden")))
            for i, c in enumerate(cells) if c["cell_type"] == "code"]
    problems, stubs = [], {}
    for i, src, _ in code:
        for node in ast.parse(src).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("my_"):
                if node.name in stubs:
                    problems.append(f"cell {i} redefines {node.name} (first defined in cell {stubs[node.name]})")
                    continue
                stubs[node.name] = i
                if "raise NotImplementedError" not in ast.get_source_segment(src, node):
                    problems.append(f"the stub {node.name} in cell {i} does not raise NotImplementedError")
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    if not (isinstance(t, ast.Name) and t.id.startswith("my_")):
                        continue
                    blank = isinstance(node.value, ast.Constant) and node.value.value in (None, "?")
                    if t.id in stubs or not blank:
                        problems.append(f"cell {i} binds {t.id}: only its stub (None or \"?\") may")
                    else:
                        stubs[t.id] = i
    for name, at in stubs.items():
        checks = [i for i, src, _ in code if i > at and re.search(rf"check_\w+\({name}\b", src)]
        sol = name.replace("my_", "solution_", 1)
        refs = [i for i, src, hidden in code
                if hidden and re.search(rf"^(def {sol}\(|{sol} = )", src, re.M) and "require(" in src]
        if not checks:
            problems.append(f"no cell after the stub checks {name}")
        if not refs:
            problems.append(f"no hidden cell defines {sol} and runs require(...)")
        if checks and refs and refs[0] < checks[0]:
            problems.append(f"the reference {sol} (cell {refs[0]}) comes before the check of {name} (cell {checks[0]})")
    return problems


_PATTERN_NOTEBOOKS = ["01_background", "02_core_concepts", "03_algorithms", "04_hardware", "08_math_model"]


@pytest.mark.parametrize("name", _PATTERN_NOTEBOOKS)
def test_exercises_follow_the_pattern(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "notebooks" / f"{name}.ipynb"
    assert exercise_pattern_problems(path) == []


def test_the_pattern_check_catches_a_solution_that_redefines_the_stub(tmp_path):
    import json

    def cell(src, hidden=False):
        return {"cell_type": "code", "source": [src],
                "metadata": {"jupyter": {"source_hidden": True}} if hidden else {}}

    nb = {"cells": [cell("def my_f(x):\n    raise NotImplementedError"),
                    cell("def my_f(x):\n    return x", hidden=True), cell("ch01.check_f(my_f)")]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    problems = exercise_pattern_problems(path)
    assert any("redefines my_f" in p for p in problems) and any("solution_f" in p for p in problems)

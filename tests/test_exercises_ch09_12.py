"""Every check passes on the reference answer and gives a specific hint on typical mistakes."""

from __future__ import annotations

import pytest

from course_lib.exercises import ch10, ch11, ch12  # ch09: tests/test_exercises_ch09.py


def test_ch10():
    assert ch10.check_e2e(lambda t, p, n: t + (n - 1) * p)
    assert "Off by one" in ch10.check_e2e(lambda t, p, n: t + n * p).message
    assert "TTFT" in ch10.check_e2e(lambda t, p, n: n * p).message
    rows = [dict(batch=1, tpot_ms=10.0), dict(batch=4, tpot_ms=14.0), dict(batch=16, tpot_ms=40.0)]
    assert ch10.check_max_batch(4, rows, 20.0)
    assert "over" in ch10.check_max_batch(16, rows, 20.0).message
    assert "bigger" in ch10.check_max_batch(1, rows, 20.0).message
    assert ch10.check_max_batch(0, rows, 5.0)
    assert ch10.check_required_tokens_per_s(150 / 60 * 1.3, 150)
    assert "per minute" in ch10.check_required_tokens_per_s(150 * 1.3, 150).message


def test_ch11():
    good = {s: sorted(tools)[0] for s, (tools, _) in ch11.SCENARIOS.items()}
    assert ch11.check_tool_choice(good)
    wrong = dict(good)
    first = next(iter(wrong))
    wrong[first] = "bitsandbytes"
    assert "continuous batching" in ch11.check_tool_choice(wrong).message
    assert "missing" in ch11.check_tool_choice({}).message
    rows = [dict(tool="eager", seq_len=1, ms=10.0, max_abs_diff=0.0),
            dict(tool="ort", seq_len=1, ms=5.0, max_abs_diff=1e-6),
            dict(tool="int8", seq_len=1, ms=2.0, max_abs_diff=0.05)]
    assert ch11.check_fastest_correct("ort", rows, 1)
    assert "quantization" in ch11.check_fastest_correct("int8", rows, 1).message


@pytest.mark.parametrize("qid", sorted(ch12.QUIZ))
def test_ch12_quiz_answers_and_hints(qid):
    q = ch12.QUIZ[qid]
    assert ch12.check_quiz(qid, q.answer)
    for i in range(len(q.options)):
        if i != q.answer:
            fb = ch12.check_quiz(qid, i)
            assert not fb and q.chapter in fb.message
    assert not ch12.check_quiz(qid, None)


def test_ch12_widget_and_numeric():
    panel, update = ch12.quiz_panel("int8")
    update(1)
    assert "✅" in panel.children[2].value
    panel.children[1].value = 0  # a learner's click goes through the same check
    assert "❌" in panel.children[2].value
    with pytest.raises(ValueError, match="unknown question"):
        ch12.check_quiz("nope", 0)
    assert ch12.check_kv_cache_bytes(2 * 6 * 2 * 32 * 100 * 2, 6, 2, 32, 100)
    assert "multiply by 2" in ch12.check_kv_cache_bytes(6 * 2 * 32 * 100 * 2, 6, 2, 32, 100).message

"""The chat helper: chat template, streaming pieces, one answer's TTFT / TPOT, bad input."""

from __future__ import annotations

import pytest

from course_lib.chat import chat, chat_prompt
from course_lib.timing import stream_timing

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def templated(course_tiny):
    """course-tiny's tokenizer with a small chat template (course-tiny is not a chat model, but it can answer)."""
    import copy

    model, tok = course_tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = TEMPLATE
    return model, tok


def test_chat_streams_pieces_that_add_up_to_the_answer(templated):
    model, tok = templated
    pieces: list[str] = []
    reply = chat(model, tok, "def add(a, b):", max_new_tokens=12, stream=pieces.append)
    assert "".join(pieces) == reply.text and pieces
    t = reply.timing
    assert t.new_tokens == len(reply.token_ids) + reply.finished and t.prompt_tokens > 3
    assert 0 < t.ttft_s <= t.total_s and list(t.token_times) == sorted(t.token_times)
    assert "tokens" in reply.summary() and "TTFT" in reply.summary()


def test_chat_prompt_applies_the_template_and_a_system_message(templated):
    _, tok = templated
    text = chat_prompt(tok, "hi", system="Be brief.")
    assert text == "<|system|>Be brief.\n<|user|>hi\n<|assistant|>"


def test_chat_refuses_a_model_without_a_template_and_bad_messages(course_tiny, templated):
    model, tok = course_tiny
    with pytest.raises(ValueError, match="no chat template"):
        chat(model, tok, "hello")
    model, tok = templated
    with pytest.raises(ValueError, match="empty"):
        chat(model, tok, "  ")
    with pytest.raises(ValueError, match="role"):
        chat(model, tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="stream"):
        chat(model, tok, "hi", stream="yes")


def test_stream_timing_of_one_answer():
    t = stream_timing([0.5, 0.6, 0.8, 0.9], prompt_tokens=7)
    assert t.ttft_s == 0.5 and t.tpot_s == pytest.approx(0.1) and t.tokens_per_s == pytest.approx(10)
    assert t.new_tokens == 4 and t.total_s == 0.9 and t.prompt_tokens == 7
    one = stream_timing([0.2], 3)
    assert one.ttft_s == 0.2 and one.tpot_s != one.tpot_s  # NaN: no decode step to time
    with pytest.raises(ValueError, match="no tokens"):
        stream_timing([], 3)


def test_chat_names_a_lone_surrogate_and_truncates_a_long_conversation_only_when_asked(templated):
    model, tok = templated  # course-tiny: a context of 512 tokens
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\].*lone surrogate"):
        chat(model, tok, "caf\udce9?")  # was a TypeError from the tokenizer
    with pytest.raises(ValueError, match="system.*lone surrogate"):
        chat(model, tok, "hi", system="\ud83d")
    long = "def f(x):\n    return x\n" * 150
    with pytest.raises(ValueError, match="context of 512.*truncate=True"):
        chat(model, tok, long, max_new_tokens=4)
    with pytest.warns(UserWarning, match="kept the last 508 tokens"):
        reply = chat(model, tok, long, max_new_tokens=4, truncate=True)
    assert reply.timing.prompt_tokens == 508

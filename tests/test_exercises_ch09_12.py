"""Every check passes on the reference answer and gives a specific hint on typical mistakes."""

from __future__ import annotations

import math

import pytest
import torch

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
    stub = ch11.check_tool_choice({s: "" for s in ch11.SCENARIOS})  # the notebook's unfilled answers
    assert not stub and not stub.done
    spelled = dict(zip(ch11.SCENARIOS, ["vllm", "llama-cpp", "onnxruntime", "BitsAndBytes"]))
    assert ch11.check_tool_choice(spelled)  # the same tools, written as pip or a learner spells them
    half = dict(good, **{first: ""})
    assert "missing" in ch11.check_tool_choice(half).message and ch11.check_tool_choice(half).done
    rows = [dict(tool="eager", seq_len=1, ms=10.0, max_abs_diff=0.0),
            dict(tool="ort", seq_len=1, ms=5.0, max_abs_diff=1e-6),
            dict(tool="int8", seq_len=1, ms=2.0, max_abs_diff=0.05)]
    assert ch11.check_fastest_correct("ort", rows, 1)
    assert "quantization" in ch11.check_fastest_correct("int8", rows, 1).message
    default = ch11.check_fastest_correct("?", rows, 1)  # the notebook's default answer never passes
    assert not default and not default.done


def _compare_right(fns, rounds, clock):
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = clock()
            f()
            out[name].append(clock() - t0)
    return out


def _compare_sequential(fns, rounds, clock):
    out = {}
    for name, f in fns.items():
        out[name] = []
        for _ in range(rounds):
            t0 = clock()
            f()
            out[name].append(clock() - t0)
    return out


def _compare_own_timer(fns, rounds, clock):
    import time
    return _compare_right(fns, rounds, time.perf_counter)


def _stub(*args):
    raise NotImplementedError


def test_ch11_interleaved_timing():
    assert ch11.check_interleaved(_compare_right)

    def with_warmup(fns, rounds, clock):  # an untimed warm-up round first is fine
        for f in fns.values():
            f()
        return _compare_right(fns, rounds, clock)

    assert ch11.check_interleaved(with_warmup)
    assert "sequential" in ch11.check_interleaved(_compare_sequential).message
    assert "clock" in ch11.check_interleaved(_compare_own_timer).message
    short = ch11.check_interleaved(lambda fns, rounds, clock: _compare_right(fns, rounds - 1, clock))
    assert "one sample per round" in short.message
    in_ms = ch11.check_interleaved(lambda fns, rounds, clock: {
        n: [1e3 * t for t in ts] for n, ts in _compare_right(fns, rounds, clock).items()})
    assert not in_ms and "milliseconds" in in_ms.message
    stub = ch11.check_interleaved(_stub)
    assert not stub and not stub.done and "my_compare" in stub.message


def test_ch11_matched_prefix():
    from course_lib.metrics import matched_prefix

    assert ch11.check_matched_prefix(matched_prefix)
    assert ch11.check_matched_prefix(lambda r, a: (r == a).long().cumprod(1).sum(1))
    assert "stop at the first difference" in ch11.check_matched_prefix(lambda r, a: (r == a).sum(1)).message
    assert "fraction" in ch11.check_matched_prefix(
        lambda r, a: (r == a).long().cumprod(1).sum(1) / r.shape[1]).message
    assert "dim 1" in ch11.check_matched_prefix(lambda r, a: (r == a).long().cumprod(0).sum(0)).message
    by_argmax = ch11.check_matched_prefix(lambda r, a: (r != a).long().argmax(1))  # 0 where a row matches fully
    assert not by_argmax and "matches all" in by_argmax.message
    stub = ch11.check_matched_prefix(_stub)
    assert not stub and not stub.done
    with pytest.raises(ValueError, match="one shape"):
        matched_prefix(torch.zeros(2, 3), torch.zeros(3, 2))


def test_ch11_expected_experts():
    assert ch11.check_expected_experts(lambda e, k, b: e * (1 - (1 - k / e) ** b))
    assert "counts an expert twice" in ch11.check_expected_experts(lambda e, k, b: k * b).message
    repeats = ch11.check_expected_experts(lambda e, k, b: e * (1 - (1 - 1 / e) ** (k * b)))
    assert not repeats and "different" in repeats.message
    assert "*no* token" in ch11.check_expected_experts(lambda e, k, b: e * (1 - k / e) ** b).message
    stub = ch11.check_expected_experts(_stub)
    assert not stub and not stub.done


@pytest.mark.parametrize("qid", sorted(ch12.QUIZ))
def test_ch12_quiz_answers_and_hints(qid):
    q = ch12.QUIZ[qid]
    assert ch12.check_quiz(qid, q.answer)
    for i in range(len(q.options)):
        if i != q.answer:
            fb = ch12.check_quiz(qid, i)
            assert not fb and q.chapter in fb.message
    unpicked = ch12.check_quiz(qid, None)
    assert not unpicked and not unpicked.done  # shown before any click: a prompt, not a wrong answer


def test_ch12_panel_opens_without_a_red_cross():
    panel, update = ch12.quiz_panel("int8")
    update(None)  # what the notebook shows before the learner clicks
    assert "❌" not in panel.children[2].value and "Pick an option" in panel.children[2].value


def test_ch12_batching_answer_is_not_tpot_unchanged():
    # Notebook 10 measured TPOT 17 -> 35 ms from batch 1 to 8 on a CPU: "time per token unchanged" is a wrong option
    q = ch12.QUIZ["batching"]
    assert "grows" in q.options[q.answer] and "8x" not in q.options[q.answer].replace("up to 8x", "")
    unchanged = next(i for i, o in enumerate(q.options) if "unchanged" in o and "exactly" in o)
    assert "KV" in ch12.check_quiz("batching", unchanged).message


def test_ch12_widget():
    panel, update = ch12.quiz_panel("int8")
    update(1)
    assert "✅" in panel.children[2].value
    panel.children[1].value = 0  # a learner's click goes through the same check
    assert "❌" in panel.children[2].value
    with pytest.raises(ValueError, match="unknown question"):
        ch12.check_quiz("nope", 0)


def _ppl_right(logits, ids):
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    return nll.exp().item()


def test_ch12_perplexity_check():
    F = torch.nn.functional
    assert ch12.check_perplexity(_ppl_right)
    no_shift = lambda lg, ids: F.cross_entropy(lg.reshape(-1, lg.size(-1)), ids.reshape(-1)).exp()  # noqa: E731
    assert "t + 1" in ch12.check_perplexity(no_shift).message
    backwards = lambda lg, ids: F.cross_entropy(lg[:, 1:].reshape(-1, lg.size(-1)), ids[:, :-1].reshape(-1)).exp()  # noqa: E731
    assert "the token *before* it" in ch12.check_perplexity(backwards).message
    own = lambda lg, ids: F.cross_entropy(lg[:, :-1].reshape(-1, lg.size(-1)), ids[:, :-1].reshape(-1)).exp()  # noqa: E731
    assert "against its own token" in ch12.check_perplexity(own).message
    assert "exp() of it" in ch12.check_perplexity(lambda lg, ids: math.log(_ppl_right(lg, ids))).message
    assert "base 2" in ch12.check_perplexity(lambda lg, ids: 2 ** math.log(_ppl_right(lg, ids))).message

    def mean_of_exps(lg, ids):
        per = F.cross_entropy(lg[:, :-1].reshape(-1, lg.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
        return per.exp().mean()

    assert "mean" in ch12.check_perplexity(mean_of_exps).message
    stub = ch12.check_perplexity(_stub)
    assert not stub and not stub.done


def test_ch12_perplexity_reference_is_the_library(course_tiny):
    from course_lib.metrics import perplexity

    model, tok = course_tiny
    ids = torch.randint(0, model.config.vocab_size, (1, 65), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    assert math.isclose(perplexity(model, ids[0], max_tokens=None, seq_len=64), _ppl_right(logits, ids), rel_tol=1e-4)


def _verdict_medians(a, b):
    import statistics
    return "a faster" if statistics.median(a) < statistics.median(b) else "b faster"


def _verdict_minmax(a, b):
    if max(a) < min(b):
        return "a faster"
    if max(b) < min(a):
        return "b faster"
    return "no measurable difference"


def test_ch12_verdict_check():
    assert ch12.check_verdict(ch12.reference_verdict)
    assert [ch12.reference_verdict(a, b) for _, a, b in ch12._verdict_cases()] == [
        "a faster", "b faster", "no measurable difference", "no measurable difference", "a faster"]
    assert "inside the noise" in ch12.check_verdict(_verdict_medians).message
    assert "outlier" in ch12.check_verdict(_verdict_minmax).message
    assert "return one of" in ch12.check_verdict(lambda a, b: "faster").message
    stub = ch12.check_verdict(_stub)
    assert not stub and not stub.done

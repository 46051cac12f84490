"""Speculative decoding: the target's greedy tokens in fp32, whatever the draft and k; stops at EOS like generate."""

from types import SimpleNamespace

import pytest
import torch

from course_lib.distillation import make_student
from course_lib.generation import generate, stream_generate
from course_lib.models import EMBEDDED
from course_lib.speculative import greedy_reference, speculative_generate, sweep_k
from tests.conftest import make_tiny


def target_greedy(model, ids, n):
    """The target's own greedy tokens, from the library's plain decode loop."""
    return [s.token_id for s in stream_generate(model, None, ids, n, stop_at_eos=False)]


@pytest.fixture(scope="module")
def pair():
    target = make_tiny("llama", layers=3, seed=0)
    return target, {"random": make_tiny("llama", layers=1, seed=1),
                    "layer-dropped": make_student(target, 2, intermediate_size=64, init="teacher"),
                    "itself": target}


@pytest.mark.parametrize("draft_name", ["random", "layer-dropped", "itself"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_greedy_output_is_identical_to_the_target(pair, draft_name, k):
    target, drafts = pair
    for prompt in (torch.tensor([[5]]), torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])):
        ref = target_greedy(target, prompt, 24)
        res = speculative_generate(target, drafts[draft_name], prompt, max_new_tokens=24, k=k)
        assert res.tokens == ref
        assert res.proposed >= res.accepted >= 0 and 1 <= res.rounds <= 24


def eos_tokenizer(eos: int):
    """A stand-in tokenizer for id prompts: only its EOS id (and a decode for stream_generate) matter."""
    return SimpleNamespace(eos_token_id=eos, decode=lambda ids: "")


@pytest.mark.parametrize("draft_name,k", [("random", 1), ("random", 4), ("layer-dropped", 3)])
def test_stops_at_eos_like_generate(pair, draft_name, k):
    target, drafts = pair
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    free = target_greedy(target, prompt, 24)
    eos = free[6]  # a token the greedy path emits early: call it EOS
    cut = free.index(eos)
    tok = eos_tokenizer(eos)
    want = [s.token_id for s in stream_generate(target, tok, prompt, 24)]
    assert want == free[: cut + 1]  # generate keeps the EOS and stops
    res = speculative_generate(target, drafts[draft_name], prompt, 24, k=k, tokenizer=tok)
    assert res.tokens == want
    assert res.accepted <= res.proposed and res.accepted <= len(res.tokens)
    assert greedy_reference(target, prompt, 24, tokenizer=tok)[0] == want
    # stop_at_eos=False: the full length, as before
    assert speculative_generate(target, drafts[draft_name], prompt, 24, k=k, tokenizer=tok,
                                stop_at_eos=False).tokens == free


def test_eos_as_the_very_first_token(pair):
    target, drafts = pair
    prompt = torch.tensor([[5]])
    first = target_greedy(target, prompt, 1)[0]
    res = speculative_generate(target, drafts["itself"], prompt, 16, k=4, tokenizer=eos_tokenizer(first))
    assert res.tokens == [first] and res.rounds == 1


def test_acceptance_is_total_for_a_perfect_draft_and_rounds_shrink_with_k(pair):
    target, drafts = pair
    prompt = torch.tensor([[2, 7, 1, 8]])
    res = speculative_generate(target, drafts["itself"], prompt, 40, k=4)
    assert res.acceptance_rate == 1.0 and res.rounds == 8  # 5 tokens per round: 4 guesses + 1 bonus
    low = speculative_generate(target, drafts["random"], prompt, 40, k=4)
    assert low.acceptance_rate < 0.5 and low.tokens_per_round < res.tokens_per_round


def test_qwen2_pair_and_odd_lengths():
    target = make_tiny("qwen2", layers=2, seed=5)
    draft = make_student(target, 1, init="teacher")
    for n in (1, 2, 3, 9):
        ref, _ = greedy_reference(target, torch.tensor([4, 4, 2]), n)
        assert speculative_generate(target, draft, torch.tensor([4, 4, 2]), n, k=3).tokens == ref


def test_bad_input_is_refused(pair):
    target, drafts = pair
    p = torch.tensor([[1, 2]])
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k"):
            speculative_generate(target, drafts["random"], p, 8, k=k)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, make_tiny(vocab=96), p, 8, k=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, drafts["random"], p, 0, k=2)
    for fn in (lambda: speculative_generate(target, drafts["random"], "def f(x):", 8, k=2),
               lambda: greedy_reference(target, "def f(x):", 8)):
        with pytest.raises(ValueError, match="tokenizer="):  # not "'NoneType' object is not callable"
            fn()


def test_sweep_reports_every_k(pair):
    target, drafts = pair
    rows = sweep_k(target, drafts["layer-dropped"], torch.tensor([[1, 2, 3]]), [1, 3], max_new_tokens=12, repeat=1)
    assert [r["k"] for r in rows] == [0, 1, 3]
    assert all(r["identical"] for r in rows) and all(r["tok_s"] > 0 for r in rows)


@pytest.mark.skipif(not (EMBEDDED["course-tiny-student"] / "model.safetensors").is_file()
                    or not (EMBEDDED["course-tiny"] / "model.safetensors").is_file(),
                    reason="course-tiny and course-tiny-student not both in this install")
def test_course_models_speculate_exactly():
    from course_lib import load_model

    teacher, tok = load_model("course-tiny")
    student, _ = load_model("course-tiny-student")
    prompt = "def read_config(path):\n    "
    res = speculative_generate(teacher, student, prompt, 48, k=4, tokenizer=tok)
    # fp32: the same text as greedy generate(), EOS handling included
    assert prompt + tok.decode(res.tokens) == generate(teacher, tok, prompt, 48)
    assert res.acceptance_rate > 0.3  # a distilled draft agrees with its teacher far more than chance
    p = "class Stack:\n    def push(self, item):"
    assert p + tok.decode(speculative_generate(teacher, student, p, 24, k=2, tokenizer=tok).tokens) == generate(
        teacher, tok, p, 24)


def test_sweep_and_prediction_refuse_bad_input(pair):
    from course_lib.speculative import predicted_speedup

    target, drafts = pair
    p = torch.tensor([[1, 2, 3]])
    for bad in (dict(repeat=0), dict(repeat=True), dict(ks=[]), dict(ks=[0])):
        args = dict(ks=[1], repeat=1) | bad
        with pytest.raises(ValueError, match="repeat|ks|k "):  # repeat=0 was a StatisticsError after all the work
            sweep_k(target, drafts["random"], p, args["ks"], max_new_tokens=4, repeat=args["repeat"])
    assert predicted_speedup(1.0, 4, 0.0 + 1e-9, 1.0) == pytest.approx(5.0)
    assert predicted_speedup(0.5, 2, 0.1, 1.0) == pytest.approx(1.75 / 1.2)
    for bad in (dict(acceptance=1.5), dict(acceptance=float("nan")), dict(k=0), dict(k=True), dict(draft_cost=0),
                dict(verify_ratio=-1.0), dict(draft_cost=float("inf"))):
        kw = dict(acceptance=0.5, k=2, draft_cost=0.1, verify_ratio=1.0) | bad
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            predicted_speedup(**kw)

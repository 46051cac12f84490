"""Perplexity against an independent computation; accuracy; storage bytes."""

import math

import pytest
import torch

from course_lib import metrics as course_lib_metrics
from course_lib import model_size_bytes, next_token_accuracy, perplexity
from tests.conftest import make_tiny


def test_perplexity_matches_hf_loss_on_one_window():
    model = make_tiny()
    ids = torch.randint(0, 128, (65,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids[None], labels=ids[None]).loss.item()  # HF's own mean NLL
    assert perplexity(model, ids, seq_len=64, max_tokens=None) == pytest.approx(math.exp(ref), rel=1e-5)


def test_perplexity_matches_manual_mean_over_windows():
    model = make_tiny(seed=3)
    ids = torch.randint(0, 128, (3 * 32 + 1,), generator=torch.Generator().manual_seed(1))
    nll, n = 0.0, 0
    with torch.inference_mode():
        for i in range(3):
            w = ids[i * 32 : i * 32 + 33]
            logp = torch.log_softmax(model(w[None, :-1]).logits[0], -1)
            nll -= logp.gather(1, w[1:, None]).sum().item()
            n += 32
    assert perplexity(model, ids, seq_len=32, max_tokens=None, batch_size=2) == pytest.approx(
        math.exp(nll / n), rel=1e-5)


def test_random_model_is_near_uniform_and_accuracy_in_range():
    model = make_tiny()
    ids = torch.randint(0, 128, (257,), generator=torch.Generator().manual_seed(0))
    ppl = perplexity(model, ids, seq_len=64, max_tokens=None)
    assert 60 < ppl < 300  # a random model over 128 tokens is roughly uniform
    acc = next_token_accuracy(model, ids, seq_len=64, max_tokens=None)
    assert 0.0 <= acc < 0.1


def test_trained_model_beats_uniform_on_heldout(course_tiny):
    model, tok = course_tiny
    ppl = perplexity(model, tok, max_tokens=4096)
    assert ppl < len(tok) / 20  # far better than guessing uniformly over the vocabulary


def test_perplexity_needs_two_tokens():
    with pytest.raises(ValueError, match="2 tokens"):
        perplexity(make_tiny(), torch.tensor([1]))


def test_model_size_counts_tied_weights_once():
    lin = torch.nn.Linear(10, 20)
    assert model_size_bytes(lin) == (10 * 20 + 20) * 4
    emb = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight = emb.weight
    assert model_size_bytes(torch.nn.ModuleList([emb, head])) == 50 * 8 * 4


def test_function_prompts_are_deterministic_function_heads():
    a = course_lib_metrics.function_prompts(n=8)
    assert a == course_lib_metrics.function_prompts(n=8) and len(a) == 8
    assert all(p.startswith(("def ", "async def ")) for p in a)


def test_cut_function_stops_at_dedent_and_drops_unfinished_line():
    cut = course_lib_metrics._cut_function("def f(x):\n    y = x", "\n    return y\nprint(1)\nz = (")
    assert cut == "def f(x):\n    y = x\n    return y\n"
    compile(cut, "<t>", "exec")


def test_compile_rate_counts_real_compiles(monkeypatch):
    completions = {"def f(x):": "\n    return x\n\n", "def g(x):": "\n    return (x\n\n"}
    monkeypatch.setattr(course_lib_metrics, "generate", lambda m, t, p, max_new_tokens: p + completions[p])
    rate = course_lib_metrics.compile_rate(None, None, prompts=list(completions))
    assert rate == 0.5  # the unclosed bracket does not compile


def test_course_tiny_completions_often_compile(course_tiny):
    model, tok = course_tiny
    assert course_lib_metrics.compile_rate(model, tok, n=6, max_new_tokens=48) > 0


def test_ids_outside_the_vocabulary_are_a_clear_error(course_tiny):
    model = make_tiny(vocab=128)
    for fn in (perplexity, next_token_accuracy):
        with pytest.raises(ValueError, match="vocabulary of 128"):  # not "IndexError: Target 500 is out of bounds"
            fn(model, torch.tensor([1, 2, 3, 500]), seq_len=4)
    _, tok = course_tiny  # a tokenizer with a bigger vocabulary than the model: its ids do not fit
    with pytest.raises(ValueError, match="another tokenizer"):
        perplexity(model, tok, max_tokens=512)


@pytest.mark.parametrize("bad", [dict(seq_len=0), dict(seq_len=True), dict(seq_len=8.0), dict(batch_size=0),
                                 dict(max_tokens=1), dict(max_tokens=2.5)])
def test_perplexity_checks_its_sizes(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        perplexity(make_tiny(), torch.arange(20), **bad)


def _manual_nll(model, ids, seq_len):
    """Per-target NLL and top-1 hits of every target, each read with the context the strided rule gives it."""
    n = ids.numel()
    full = (n - 1) // seq_len
    nll, hits = [], []
    with torch.inference_mode():
        for start, first in [(i * seq_len, 0) for i in range(full)] + [(n - 1 - seq_len, full * seq_len + 1)]:
            w = ids[start : start + seq_len + 1]
            logits = model(w[None, :-1]).logits[0].float()
            for j in range(seq_len):
                if start + j + 1 >= first:  # the last window skips targets the full windows scored
                    nll.append(-torch.log_softmax(logits[j], -1)[w[j + 1]].item())
                    hits.append(int(logits[j].argmax() == w[j + 1]))
    return nll, hits


def test_every_target_is_scored_even_past_the_last_full_window():
    model = make_tiny(seed=2)
    ids = torch.randint(0, 128, (3 * 32 + 1 + 20,), generator=torch.Generator().manual_seed(4))  # 116 targets
    nll, hits = _manual_nll(model, ids, 32)
    assert len(nll) == ids.numel() - 1  # 3 full windows (96 targets) left 20 unscored before
    assert perplexity(model, ids, seq_len=32, max_tokens=None, batch_size=2) == pytest.approx(
        math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert next_token_accuracy(model, ids, seq_len=32, max_tokens=None) == pytest.approx(sum(hits) / len(hits))


def test_full_windows_keep_their_numbers_and_the_tail_only_adds_targets():
    model = make_tiny(seed=5)
    ids = torch.randint(0, 128, (2 * 64 + 1 + 30,), generator=torch.Generator().manual_seed(6))
    nll_full, _, n_full = course_lib_metrics._nll_and_correct(model, ids[: 2 * 64 + 1], 64, 8)
    nll_all, _, n_all = course_lib_metrics._nll_and_correct(model, ids, 64, 8)
    assert (n_full, n_all) == (128, ids.numel() - 1)
    tail, _ = _manual_nll(model, ids, 64)
    assert nll_all == pytest.approx(nll_full + sum(tail[128:]), rel=1e-6)


def test_windows_longer_than_the_models_context_are_refused():
    model = make_tiny()  # max_position_embeddings=256
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(0))
    for fn in (perplexity, next_token_accuracy):
        with pytest.raises(ValueError, match=r"seq_len \(512\).*context of 256.*seq_len <= 256"):
            fn(model, ids, seq_len=512, max_tokens=None)  # was a number, silently much too high
    assert perplexity(model, ids, seq_len=256, max_tokens=None) > 1


def test_a_lone_surrogate_in_an_answer_prompt_names_it(course_tiny):
    from course_lib.metrics import greedy_answers

    model, tok = course_tiny
    with pytest.raises(ValueError, match=r"prompts\[1\].*lone surrogate"):  # was a TypeError from the tokenizer
        greedy_answers(model, tok, ["def f(x):", "caf\udce9"], n_tokens=2)

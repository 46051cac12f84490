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


def test_ids_outside_the_vocabulary_and_the_context_are_refused(pair):
    from course_lib.speculative import sample_reference, speculative_sample

    target, drafts = pair  # vocabulary 128, context 256
    draft = drafts["random"]
    calls = {"speculative_generate": lambda ids, n: speculative_generate(target, draft, ids, n, k=2),
             "speculative_sample": lambda ids, n: speculative_sample(target, draft, ids, n, k=2),
             "greedy_reference": lambda ids, n: greedy_reference(target, ids, n),
             "sample_reference": lambda ids, n: sample_reference(target, ids, n)}
    for call in calls.values():
        with pytest.raises(ValueError, match="token id 500.*vocabulary of 128"):  # was an IndexError
            call(torch.tensor([[1, 500]]), 4)
        with pytest.raises(ValueError, match="integer token ids"):
            call(torch.tensor([[1.0, 2.0]]), 4)
        with pytest.raises(ValueError, match="context of 256"):  # was a silent run past the trained positions
            call(torch.tensor([[1, 2]]), 300)


def test_sweep_reports_every_k(pair):
    target, drafts = pair
    rows = sweep_k(target, drafts["layer-dropped"], torch.tensor([[1, 2, 3]]), [1, 3], max_new_tokens=12, repeat=1)
    assert [r["k"] for r in rows] == [0, 1, 3]
    assert all(r["identical"] for r in rows) and all(r["tok_s"] > 0 for r in rows)
    for r in rows[1:]:  # timed interleaved against the target alone, judged by speed_verdict, alpha beside it
        assert ("faster" in r["verdict"] or "slower" in r["verdict"] or "no measurable" in r["verdict"])
        assert r["tok_s_p10"] <= r["tok_s"] <= r["tok_s_p90"] and r["acceptance_rate"] <= r["alpha"]
        assert r["predicted_tokens_per_round"] == pytest.approx(expected_tokens_per_round(r["alpha"], r["k"]))


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


# --- sampling speculative decoding --------------------------------------------------

from course_lib.speculative import (  # noqa: E402
    expected_tokens_per_round,
    sample_reference,
    speculative_sample,
    verify_sampled,
)

P0 = torch.tensor([0.50, 0.05, 0.25, 0.15, 0.05])  # the target's distribution at the first position
Q0 = torch.tensor([0.10, 0.40, 0.20, 0.10, 0.20])  # the draft's: far from p, so a wrong rule shows


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def first_token_distribution(verify, k: int, n: int = 8000, seed: int = 0) -> torch.Tensor:
    """Empirical distribution of the first kept token of a round whose guesses were drawn from q."""
    g = torch.Generator().manual_seed(seed)
    p = torch.stack([P0] + [torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])] * k)
    q = torch.stack([Q0] + [torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])] * (k - 1))
    counts = torch.zeros(5)
    for _ in range(n):
        guesses = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
        kept, accepted = verify(p, q, guesses, g)
        assert 0 <= accepted <= k and len(kept) == accepted + 1 and kept[:accepted] == guesses[:accepted]
        counts[kept[0]] += 1
    return counts / n


def accept_always(p, q, guesses, g):
    return list(guesses) + [int(torch.multinomial(p[len(guesses)], 1, generator=g))], len(guesses)


def resample_from_p(p, q, guesses, g):
    """The right acceptance test, but a rejected guess is replaced by a draw from p instead of the residual."""
    for i, x in enumerate(guesses):
        if float(torch.rand((), generator=g)) * float(q[i, x]) >= float(p[i, x]):
            return list(guesses[:i]) + [int(torch.multinomial(p[i], 1, generator=g))], i
    return list(guesses) + [int(torch.multinomial(p[len(guesses)], 1, generator=g))], len(guesses)


@pytest.mark.parametrize("k", [1, 3])
def test_verify_sampled_emits_the_targets_distribution(k):
    # 8000 seeded draws: the sampling error of a total-variation estimate over 5 outcomes is ~0.008
    assert tv(first_token_distribution(verify_sampled, k), P0) < 0.025


def test_a_wrong_acceptance_rule_fails_the_same_test():
    assert tv(first_token_distribution(accept_always, 1, n=4000), P0) > 0.3  # that is the draft's q
    assert tv(first_token_distribution(resample_from_p, 1, n=4000), P0) > 0.1


def test_verify_sampled_edge_cases():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.0, 1.0, 0.0], [0.3, 0.3, 0.4]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    for _ in range(20):  # the target never emits token 0: always rejected, always replaced by token 1
        assert verify_sampled(p, q, [0], g) == ([1], 0)
    same = torch.tensor([[0.2, 0.3, 0.5]])
    for _ in range(20):  # a perfect draft is always accepted and earns the bonus token
        kept, n = verify_sampled(torch.cat([same, same]), same, [2], g)
        assert n == 1 and kept[0] == 2
    with pytest.raises(ValueError, match=r"\(k\+1, V\)"):
        verify_sampled(p, torch.cat([q, q]), [0], g)


def sharpened(seed: int, vocab: int = 6):
    """A tiny model with a peaky, context-dependent next-token distribution (so a wrong rule shows)."""
    m = make_tiny("llama", layers=1, hidden=32, intermediate=64, vocab=vocab, num_heads=2, num_kv_heads=1,
                  seed=seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(12.0)
    return m


def exact_joint(model, prompt: torch.Tensor, vocab: int) -> torch.Tensor:
    """P(t1, t2 | prompt) of the model's own sampling, from two forward passes."""
    with torch.no_grad():
        p1 = torch.softmax(model(prompt).logits[0, -1], -1)
        seqs = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        p2 = torch.softmax(model(seqs).logits[:, -1], -1)
    return p1[:, None] * p2  # (vocab, vocab)


def sampled_joint(sample, n: int, vocab: int) -> torch.Tensor:
    counts = torch.zeros(vocab, vocab)
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        t1, t2 = sample(g)
        counts[t1, t2] += 1
    return counts / n


@pytest.fixture(scope="module")
def sampling_pair():
    return sharpened(0), sharpened(1)


def test_speculative_sampling_has_the_targets_distribution(sampling_pair, monkeypatch):
    """Two tokens from two tiny models: the joint of (t1, t2) must be the target's, not the draft's."""
    target, draft = sampling_pair
    prompt = torch.tensor([[1, 4, 2]])
    want = exact_joint(target, prompt, 6)
    assert tv(exact_joint(draft, prompt, 6), want) > 0.3  # the draft alone samples something else

    def spec(k):
        return lambda g: speculative_sample(target, draft, prompt, 2, k=k, generator=g).tokens

    n = 600  # seeded; at this n the TV estimate over these 36 outcomes is ~0.07 from sampling noise alone
    for k in (1, 2):  # k=1: the second token comes from a bonus token or a second round; k=2: one round
        assert tv(sampled_joint(spec(k), n, 6), want) < 0.12
    plain = sampled_joint(lambda g: sample_reference(target, prompt, 2, generator=g)[0], n, 6)
    assert tv(plain, want) < 0.12  # the reference sampler is held to the same bound
    monkeypatch.setattr("course_lib.speculative.verify_sampled", accept_always)
    assert tv(sampled_joint(spec(2), n, 6), want) > 0.4  # the test catches the accept-always rule


def test_speculative_sampling_bookkeeping_and_seeds(sampling_pair):
    target, draft = sampling_pair
    prompt = torch.tensor([[3, 3]])
    a = speculative_sample(target, draft, prompt, 20, k=3, seed=5)
    assert a.tokens == speculative_sample(target, draft, prompt, 20, k=3, seed=5).tokens  # seeded: repeatable
    assert len(a.tokens) == 20 and a.accepted <= a.evaluated <= a.proposed
    assert 0 <= a.acceptance_rate <= a.alpha <= 1
    perfect = speculative_sample(target, target, prompt, 20, k=4, seed=1)
    assert perfect.alpha == 1.0 and perfect.rounds == 4  # p == q: every guess accepted, 5 tokens per round
    with pytest.raises(ValueError, match="temperature"):
        speculative_sample(target, draft, prompt, 4, temperature=0)
    with pytest.raises(ValueError, match="generator"):
        speculative_sample(target, draft, prompt, 4, generator=3)


def test_alpha_is_per_guess_not_accepted_over_proposed():
    from course_lib.speculative import SpeculativeResult

    # Two rounds of k=4: 2 accepted then a rejection (3 looked at), then all 4 accepted (4 looked at).
    r = SpeculativeResult(tokens=[0] * 8, k=4, rounds=2, proposed=8, accepted=6, seconds=1.0, evaluated=7)
    assert r.acceptance_rate == pytest.approx(6 / 8) and r.alpha == pytest.approx(6 / 7)
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1.75) and expected_tokens_per_round(1.0, 3) == 4


def test_greedy_alpha_predicts_tokens_per_round(pair):
    """With a draft that agrees with the target about as often at every guess, the formula fed alpha lands near
    the measured tokens per round, where accepted / proposed predicts too few."""
    target, drafts = pair
    res = speculative_generate(target, drafts["layer-dropped"], torch.tensor([[3, 1, 4]]), 96, k=4)
    assert 0 < res.acceptance_rate < res.alpha < 1
    # evaluated counts each round's accepted guesses plus its (at most one) rejection
    assert res.evaluated <= res.accepted + res.rounds
    with_alpha = expected_tokens_per_round(res.alpha, 4)
    with_rate = expected_tokens_per_round(res.acceptance_rate, 4)
    assert abs(with_alpha - res.tokens_per_round) < abs(with_rate - res.tokens_per_round)


# --- prompt lookup: drafting from the text itself -------------------------------------

from course_lib.speculative import (  # noqa: E402
    NgramIndex,
    ngram_draft,
    point_mass,
    prompt_lookup_compiled,
    prompt_lookup_generate,
    prompt_lookup_sample,
)


def test_ngram_draft_takes_the_longest_tail_and_its_latest_occurrence():
    #        0  1  2  3  4  5  6  7  8  9
    seq = [7, 1, 2, 3, 9, 1, 2, 4, 5, 1, 2]
    # tail (1, 2) occurs at 1-2 and 5-6: the latest one (5-6) gives 4, 5, 1, ...
    assert ngram_draft(seq, 3, max_ngram=2, min_ngram=1) == [4, 5, 1]
    # the 3-gram (5, 1, 2) has no earlier occurrence, so the lookup falls back to 2
    assert ngram_draft(seq, 2, max_ngram=3, min_ngram=2) == [4, 5]
    assert ngram_draft([3, 1, 2, 8, 1, 2, 3, 1, 2], 4, max_ngram=3, min_ngram=2) == [8, 1, 2, 3]  # (3, 1, 2) wins
    # the continuation stops where the sequence does: (5, 5) last occurred at 1-2, followed by one token
    assert ngram_draft([4, 5, 5, 5], 6, max_ngram=2, min_ngram=2) == [5]
    assert ngram_draft(list(range(20)), 5, max_ngram=3, min_ngram=1) == []  # no repeats, no draft
    assert ngram_draft([1, 2], 5, max_ngram=3, min_ngram=3) == []  # shorter than any n-gram
    assert ngram_draft(torch.tensor([6, 6]), 2, max_ngram=1, min_ngram=1) == [6]  # the tail never matches itself
    # growing the index token by token gives the same drafts as building it at once
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 6, (80,), generator=g).tolist()
    idx = NgramIndex(3, 1)
    for i, t in enumerate(toks):
        idx.extend([t])
        assert idx.draft(4) == ngram_draft(toks[: i + 1], 4, 3, 1)


def test_ngram_draft_matches_a_brute_force_scan():
    def brute(seq, k, hi, lo):
        for n in range(hi, lo - 1, -1):
            if len(seq) < n:
                continue
            tail = seq[len(seq) - n:]
            for s in range(len(seq) - n - 1, -1, -1):  # latest first, with at least one token after it
                if seq[s:s + n] == tail:
                    return seq[s + n:s + n + k]
        return []

    g = torch.Generator().manual_seed(1)
    for trial in range(200):
        seq = torch.randint(0, 4 + trial % 5, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        hi = 1 + trial % 4
        lo = 1 + trial % hi
        assert ngram_draft(seq, 1 + trial % 6, hi, lo) == brute(seq, 1 + trial % 6, hi, lo), (seq, hi, lo)


@pytest.mark.parametrize("k,max_ngram,min_ngram", [(1, 1, 1), (4, 3, 2), (8, 4, 1)])
def test_prompt_lookup_greedy_is_identical_to_the_target(pair, k, max_ngram, min_ngram):
    target, _ = pair
    no_repeats = torch.arange(10, 40)[None]
    prompts = (torch.tensor([[5]]), torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]]),
               torch.tensor([[8, 9, 10, 11, 12, 13] * 4]), no_repeats)
    drafted = 0
    for prompt in prompts:
        ref = target_greedy(target, prompt, 40)
        res = prompt_lookup_generate(target, prompt, 40, k=k, max_ngram=max_ngram, min_ngram=min_ngram)
        assert res.tokens == ref
        assert res.rounds == len(res.per_round) and res.proposed == sum(d for _, d in res.per_round)
        assert len(res.tokens) == sum(a + 1 for a, _ in res.per_round)  # every pass: its accepted guesses + 1
        assert all(a <= d <= k for a, d in res.per_round) and res.accepted <= res.evaluated <= res.proposed
        drafted += res.accepted
    assert drafted > 0  # the verifier kept guesses, so the accept path was exercised, not only plain steps
    first = prompt_lookup_generate(target, no_repeats, 1, k=k, max_ngram=max_ngram, min_ngram=min_ngram)
    assert first.per_round == ((0, 0),)  # nothing to look up: one plain step, no draft paid for


def test_prompt_lookup_copies_a_repeated_stretch_in_few_passes(pair):
    """A target that continues a repeating pattern is drafted exactly by the lookup: many tokens per pass."""
    target, _ = pair
    prompt = torch.tensor([[8, 9, 10, 11, 12, 13] * 4])
    ref = target_greedy(target, prompt, 40)
    res = prompt_lookup_generate(target, prompt, 40, k=6)
    assert res.tokens == ref
    plain = sum(1 for _, d in res.per_round if d == 0)
    assert res.drafted_rounds + plain == res.rounds
    if ref[:12] == [8, 9, 10, 11, 12, 13] * 2:  # the random target does continue the pattern: then it pays
        assert res.tokens_per_round > 2.5 and res.alpha > 0.7


def test_prompt_lookup_stops_at_eos_like_generate(pair):
    target, _ = pair
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4]])
    free = target_greedy(target, prompt, 30)
    eos = free[9]
    tok = eos_tokenizer(eos)
    want = [s.token_id for s in stream_generate(target, tok, prompt, 30)]
    res = prompt_lookup_generate(target, prompt, 30, k=4, min_ngram=1, tokenizer=tok)
    assert res.tokens == want and want[-1] == eos
    assert prompt_lookup_generate(target, prompt, 30, k=4, min_ngram=1, tokenizer=tok, stop_at_eos=False).tokens == free


@pytest.fixture(scope="module")
def traced_decoder(pair):
    """The compiled engine's loop, traced without generating kernels (seconds): the same graphs' logic."""
    from course_lib.generation import CompiledDecoder

    return CompiledDecoder(pair[0], backend="eager")


@pytest.mark.parametrize("k,min_ngram", [(3, 2), (5, 1)])
def test_prompt_lookup_on_the_compiled_engine_gives_the_decoders_tokens(pair, traced_decoder, k, min_ngram):
    """Drafts verified in the engine's fixed-width pass (padded to k + 1), rejections undone by the slot alone."""
    target, _ = pair
    dec = traced_decoder
    drafted = 0
    for prompt in (torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]]),
                   torch.tensor([[8, 9, 10, 11, 12, 13] * 4]), torch.arange(10, 40)[None]):
        ref = dec(prompt, 30)[0].tolist()
        assert ref == target_greedy(target, prompt, 30)
        res = prompt_lookup_compiled(dec, prompt, 30, k=k, min_ngram=min_ngram)
        assert res.tokens == ref
        assert res.rounds == len(res.per_round) and len(res.tokens) == 1 + sum(a + 1 for a, _ in res.per_round)
        assert all(a <= d <= k for a, d in res.per_round) and res.accepted <= res.evaluated <= res.proposed
        drafted += res.accepted
    assert drafted > 0
    eos = ref[9]
    assert prompt_lookup_compiled(dec, prompt, 30, k=k, min_ngram=min_ngram, eos=eos).tokens == \
        dec(prompt, 30, eos=eos)[0].tolist() == ref[:ref.index(eos) + 1]
    with pytest.raises(ValueError, match="one prompt at a time"):
        prompt_lookup_compiled(dec, torch.tensor([[1, 2], [3, 4]]), 4)
    with pytest.raises(ValueError, match="min_ngram"):
        prompt_lookup_compiled(dec, prompt, 4, max_ngram=2, min_ngram=3)


def test_prompt_lookup_refuses_bad_input(pair):
    target, _ = pair
    p = torch.tensor([[1, 2, 1]])
    for kw, match in ((dict(k=0), "k must"), (dict(k=2.0), "k must"), (dict(max_ngram=0), "max_ngram"),
                      (dict(min_ngram=True), "min_ngram"), (dict(max_ngram=2, min_ngram=3), "swap"),
                      (dict(max_new_tokens=0), "max_new_tokens")):
        for fn in (prompt_lookup_generate, prompt_lookup_sample):
            with pytest.raises(ValueError, match=match):
                fn(target, p, **({"max_new_tokens": 4} | kw))
    with pytest.raises(ValueError, match="one prompt at a time"):
        prompt_lookup_generate(target, torch.tensor([[1, 2], [3, 4]]), 4)
    with pytest.raises(ValueError, match="tokenizer="):
        prompt_lookup_generate(target, "some text", 4)
    with pytest.raises(ValueError, match="vocabulary of 128"):
        prompt_lookup_generate(target, torch.tensor([[1, 500]]), 4)
    with pytest.raises(ValueError, match="temperature"):
        prompt_lookup_sample(target, p, 4, temperature=0.0)
    with pytest.raises(ValueError, match="min_ngram"):
        NgramIndex(1, 2)


def test_point_mass_verification_accepts_with_p_and_resamples_without_the_guess():
    """One round with a looked-up guess: the first emitted token must follow p, whatever the text proposed."""
    g = torch.Generator().manual_seed(0)
    p = torch.stack([P0, torch.full((5,), 0.2)])
    for guess, n in ((1, 4000), (0, 4000)):  # a guess p finds unlikely (0.05) and one it finds likely (0.5)
        counts, accepted = torch.zeros(5), 0
        for _ in range(n):
            kept, a = verify_sampled(p, point_mass([guess], 5), [guess], g)
            counts[kept[0]] += 1
            accepted += a
        assert tv(counts / n, P0) < 0.03 and accepted / n == pytest.approx(float(P0[guess]), abs=0.02)
    wrong = first_token_of(resample_from_p, p, 0, 2000, g)  # P(0) = 0.5 + 0.5 * 0.5: the guess counted twice
    assert tv(wrong, P0) > 0.2
    assert point_mass([], 5).shape == (0, 5) and point_mass([2, 0], 3).tolist() == [[0, 0, 1], [1, 0, 0]]


def first_token_of(verify, p, guess, n, g):
    counts = torch.zeros(p.shape[1])
    for _ in range(n):
        counts[verify(p, point_mass([guess], p.shape[1]), [guess], g)[0][0]] += 1
    return counts / n


def test_prompt_lookup_sampling_has_the_targets_distribution(sampling_pair, monkeypatch):
    """The joint of two sampled tokens after a prompt whose tail recurs (so the first pass drafts) is the target's."""
    target, _ = sampling_pair
    prompt = torch.tensor([[5, 1, 4, 2, 5, 1]])  # tail (5, 1) occurred before, followed by 4: the draft is [4]
    want = exact_joint(target, prompt, 6)
    assert 0.3 < float(want.sum(1)[4]) < 0.7  # the target may or may not emit the looked-up token: wrong rules show

    def lookup(g):
        res = prompt_lookup_sample(target, prompt, 2, k=2, min_ngram=1, generator=g)
        assert res.per_round[0][1] == 1  # the first pass verified a one-token draft (k is capped at what is left)
        return res.tokens

    # seeded; as in the draft-model test, ~0.07 total variation comes from sampling noise alone at n = 600
    assert tv(sampled_joint(lookup, 600, 6), want) < 0.12
    monkeypatch.setattr("course_lib.speculative.verify_sampled", accept_always)
    assert tv(sampled_joint(lookup, 300, 6), want) > 0.3  # accepting every looked-up guess copies the text
    monkeypatch.setattr("course_lib.speculative.verify_sampled", resample_from_p)
    assert tv(sampled_joint(lookup, 300, 6), want) > 0.15  # a rejection must draw from p without the guess


def test_prompt_lookup_sampling_is_seeded_and_counts_rounds(sampling_pair):
    target, _ = sampling_pair
    prompt = torch.tensor([[3, 3, 3, 3]])
    a = prompt_lookup_sample(target, prompt, 20, k=3, seed=5, min_ngram=1)
    assert a.tokens == prompt_lookup_sample(target, prompt, 20, k=3, seed=5, min_ngram=1).tokens
    assert len(a.tokens) == 20 == sum(x + 1 for x, _ in a.per_round)
    assert 0 <= a.acceptance_rate <= a.alpha <= 1


@pytest.mark.skipif(not (EMBEDDED["course-tiny"] / "model.safetensors").is_file(), reason="course-tiny not installed")
def test_course_tiny_prompt_lookup_is_exact_on_code_that_repeats(course_tiny):
    teacher, tok = course_tiny
    prompt = ("def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n\n\n"
              "def area(w, h):\n")
    res = prompt_lookup_generate(teacher, prompt, 32, k=5, tokenizer=tok)
    assert prompt + tok.decode(res.tokens) == generate(teacher, tok, prompt, 32)
    assert res.accepted > 0


def test_lookup_speedup_reports_each_group(pair):
    from course_lib.speculative import lookup_speedup

    target, _ = pair
    groups = {"repeats": [torch.tensor([[8, 9, 10, 11] * 3])], "distinct": [torch.arange(10, 22)[None]]}
    rows = lookup_speedup(target, groups, max_new_tokens=12, k=4, repeat=1)
    assert [r["group"] for r in rows] == ["repeats", "distinct"]
    for r in rows:
        assert r["identical"] and r["greedy_tok_s"] > 0 and r["lookup_tok_s"] > 0 and r["new_tokens"] == 12
        assert r["speedup_p10"] <= r["speedup"] <= r["speedup_p90"] and 1 <= r["tokens_per_pass"] <= 5
        assert 0 <= r["acceptance_rate"] <= r["alpha"] <= 1 and 0 <= r["drafted_frac"] <= 1
        assert "faster" in r["verdict"] or "slower" in r["verdict"] or "no measurable" in r["verdict"]
    for bad, match in ((dict(groups={}), "groups"), (dict(groups={"a": []}), "groups"), (dict(repeat=0), "repeat"),
                       (dict(k=0), "k must")):
        with pytest.raises(ValueError, match=match):
            lookup_speedup(target, **({"groups": groups, "max_new_tokens": 4} | bad))

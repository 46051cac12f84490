"""Speculative decoding: a small draft model guesses, the big target model checks.

Decoding one token costs the target one forward pass, and at batch size 1 that
pass is memory-bound: it reads every weight to do a handful of FLOPs per
weight. Checking k+1 positions in one pass reads the same weights once, so it
costs barely more than checking one (until the arithmetic catches up with the
memory traffic). Speculative decoding exploits that:

1. the draft model (the distilled student) proposes k tokens, one at a time (cheap);
2. the target runs *one* forward pass over the last accepted token and the k guesses;
3. the longest prefix of guesses the target agrees with is kept, plus the
   target's own token at the first disagreement (or a bonus token when all k
   were right). Every round therefore yields between 1 and k+1 tokens.

With greedy decoding every kept token is the target's argmax given the tokens
before it, so in exact arithmetic the output is the target's own greedy output.
In float32 it is, token for token (the tests check it against ``generate``). In
bf16/fp16 it need not be: the target scores k+1 positions in one pass instead
of one at a time, a matmul of another shape rounds differently, and where the
top two logits nearly tie the argmax can flip; from there the two texts part
ways (both still plausible greedy continuations). Measured with course-tiny and
its student (15 held-out function prompts, 32 tokens, k=4, on a CPU): 0 of 15
differed in float32, 2 of 15 in bf16. Like ``generate``, it stops
after the tokenizer's end-of-sequence token (which is kept). Only the speed
changes, and it pays when (accepted tokens per round) outweigh
(k draft steps + one slightly longer target pass). On a model so small that a
forward pass is dominated by fixed Python/dispatch overhead rather than by
reading weights, the draft step costs nearly as much as the target step, and
the gain shrinks or vanishes; the notebook measures both regimes.

Sampling works too (:func:`speculative_sample`): the draft *samples* each guess from
its distribution q, the target accepts guess x with probability min(1, p(x)/q(x))
and, at the first rejection, draws a replacement from the residual max(0, p - q)
(normalised); when all k pass it draws a bonus token from p. Then every emitted
token has exactly the target's distribution p (Leviathan et al., 2023), which
a statistical test checks over many samples. A guess is accepted with
probability sum_x min(p(x), q(x)) = 1 - TV(p, q): the closer the draft's
distribution, the more tokens per round.

How many tokens a round yields depends on the *per-guess* acceptance rate
alpha (P(guess i accepted | guesses 1..i-1 were)), not on accepted / proposed:
guesses after a round's first rejection are thrown away unseen, so counting
them as rejections undercounts alpha. With alpha, a round yields
(1 - alpha^(k+1)) / (1 - alpha) tokens on average (:attr:`SpeculativeResult.alpha`).

Both models keep their Hugging Face KV cache; rejected guesses are removed from
the caches with ``DynamicCache.crop``.

Prompt lookup (:func:`prompt_lookup_generate`, :func:`prompt_lookup_sample`) drafts without a draft model:
the guesses are the tokens that followed the latest earlier occurrence of the sequence's last few tokens
(:class:`NgramIndex`), verified by the same rules; a looked-up guess is a point mass for the sampling rule.
:func:`prompt_lookup_compiled` runs the greedy lookup on the course's compiled engine
(:class:`~course_lib.generation.CompiledDecoder`): a draft is verified in one compiled pass whose bf16 kernels
compute every row as a one-token step does (bit for bit, so its tokens are the engine's greedy tokens) and read
the weights once for all rows.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ._checks import check_new_tokens
from ._hf import cache_kwarg
from .generation import CompiledDecoder, encode_prompt
from .models import check_prompt_ids
from .timing import BenchResult, compare, speed_verdict


@dataclass(frozen=True)
class SpeculativeResult:
    """The new tokens and how the guessing went."""

    tokens: list[int] = field(repr=False)
    k: int
    rounds: int  # target forward passes after the prefill
    proposed: int  # draft tokens offered for verification
    accepted: int  # draft tokens the target agreed with
    seconds: float
    evaluated: int = 0  # draft tokens the verifier got to: every accepted one plus the first rejected one per round

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the target kept (accepted / proposed).

        Not the per-guess probability: the guesses after a round's first rejection count as "not accepted"
        although the verifier never looked at them. Use :attr:`alpha` in the expected-tokens formula.
        """
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def alpha(self) -> float:
        """Per-guess acceptance rate: P(a guess is accepted | the guesses before it in its round were).

        Each round is a run of accepted guesses ended by one rejection (or by the end of the k guesses), so
        accepted / (accepted + rejections) estimates it; this is the ``a`` of ``(1 - a^(k+1)) / (1 - a)``.
        """
        return self.accepted / self.evaluated if self.evaluated else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per target forward pass (1.0 = no better than plain decoding)."""
        return len(self.tokens) / self.rounds if self.rounds else float(len(self.tokens))


def check_pair(target, draft, k: int) -> None:
    """Raise ValueError unless the pair can speculate together with ``k`` guesses per round."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k (draft tokens per round) must be an int >= 1, got {k!r}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size}); the draft must use the target's tokenizer")


def _step(model, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Logits of ``ids`` appended to ``cache`` (which grows by ``ids.shape[1]``)."""
    return model(input_ids=ids, use_cache=True, **{cache_kwarg(type(model)): cache}).logits


def _rollback(cache: DynamicCache, keep: int) -> None:
    """Forget every cached position from ``keep`` on (rejected guesses)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)  # a negative argument means "remove this many" in transformers 4.x and 5.x alike


def _prompt_ids(models, tokenizer, prompt, device, max_new_tokens: int) -> torch.Tensor:
    """The prompt as (1, T) ids, checked against every model that reads it (vocabulary, context)."""
    ids = encode_prompt(tokenizer, prompt, device)  # a text prompt without its tokenizer is refused there
    for m in models:
        check_prompt_ids(m, ids, max_new_tokens)
    return ids


def _eos_id(tokenizer, stop_at_eos: bool) -> int | None:
    """The token that ends generation: the tokenizer's EOS, as in :func:`course_lib.generation.stream_generate`."""
    return getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None


def _keep(kept: list[int], n: int, looked_at: int, eos: int | None, new: list[int]) -> tuple[int, int, bool]:
    """Append one verified round's tokens to ``new``: (guesses accepted, guesses looked at, stopped at EOS).

    Plain decoding would stop at EOS, so what follows it is dropped, accepted guesses included.
    """
    if eos is not None and eos in kept:
        cut = kept.index(eos) + 1
        new.extend(kept[:cut])
        return min(n, cut), min(looked_at, cut), True
    new.extend(kept)
    return n, looked_at, False


def _speculate(target, draft, ids: torch.Tensor, max_new_tokens: int, k: int, eos: int | None,
               propose, verify) -> SpeculativeResult:
    """The loop both rules share: draft k, score them in one target pass, keep what ``verify`` keeps.

    ``propose(draft_logits_row) -> (token, q_row)`` draws one guess (``q_row``: the distribution it was drawn
    from, or None); ``verify(target_logits (k+1, V), guesses (k,), q_rows) -> (kept tokens, accepted)``, where
    the kept tokens are the first ``accepted`` guesses plus one token of the target's.
    """
    device = ids.device
    t0 = time.perf_counter()
    t_cache, d_cache = DynamicCache(), DynamicCache()
    # Prefill both models on the prompt minus its last token; that token is the first "pending" one.
    # Invariant at the top of each round: the target cache holds every token but the last (`pending`);
    # the draft cache holds every token but `draft_pending` (the last one or two).
    if ids.shape[1] > 1:
        _step(target, ids[:, :-1], t_cache)
        _step(draft, ids[:, :-1], d_cache)
    pending = ids[:, -1:]
    draft_pending = pending
    new: list[int] = []
    rounds = proposed = accepted = evaluated = 0
    while len(new) < max_new_tokens:
        k_now = min(k, max_new_tokens - len(new))  # no point guessing past the end
        n_ctx = t_cache.get_seq_length()
        # 1. draft k tokens, one forward pass each.
        guesses, q_rows = [], []
        inp = draft_pending
        for _ in range(k_now):
            tok, q_row = propose(_step(draft, inp, d_cache)[0, -1])
            guesses.append(tok)
            q_rows.append(q_row)
            inp = torch.tensor([[tok]], device=device)
        # 2. the target scores the pending token and all k guesses in one pass.
        logits = _step(target, torch.cat([pending, torch.tensor([guesses], device=device)], dim=1), t_cache)[0]
        # 3. keep the accepted prefix, then one token of the target's.
        kept, n = verify(logits, guesses, q_rows)
        rounds += 1
        proposed += k_now
        looked_at = n + 1 if n < k_now else k_now  # the verifier stops at the first rejection
        took, seen, stopped = _keep(kept, n, looked_at, eos, new)
        accepted += took
        evaluated += seen
        if stopped:
            break
        # Roll the caches back to the kept tokens (the last kept token becomes pending).
        _rollback(t_cache, n_ctx + 1 + n)
        if n < k_now:
            _rollback(d_cache, n_ctx + 1 + n)
            draft_pending = torch.tensor([[kept[-1]]], device=device)
        else:  # the draft never saw its own last guess: feed it together with the bonus token next round
            draft_pending = torch.tensor([[guesses[-1], kept[-1]]], device=device)
        pending = torch.tensor([[kept[-1]]], device=device)
    return SpeculativeResult(new[:max_new_tokens], k, rounds, proposed, accepted, time.perf_counter() - t0,
                             evaluated)


def _greedy_propose(row: torch.Tensor):
    return int(row.argmax()), None


def _greedy_verify(logits: torch.Tensor, guesses: list[int], _q_rows) -> tuple[list[int], int]:
    best = logits.argmax(-1).tolist()  # best[i]: the target's token after position i of the chunk
    n = 0
    while n < len(guesses) and guesses[n] == best[n]:
        n += 1
    return guesses[:n] + [best[n]], n


@torch.inference_mode()
def speculative_generate(target, draft, prompt, max_new_tokens: int = 32, k: int = 4,
                         tokenizer=None, stop_at_eos: bool = True) -> SpeculativeResult:
    """Greedy speculative decoding (batch size 1): the target's greedy tokens, found k at a time.

    ``prompt`` is text (then pass ``tokenizer``) or a tensor of token ids. As in
    :func:`course_lib.generation.generate`, generation stops after the
    tokenizer's EOS token, which is included (``stop_at_eos=False``: always
    ``max_new_tokens``; without a tokenizer there is no EOS to stop at). In
    float32 the tokens are those of greedy ``generate``; in bf16/fp16 rounding
    can flip a near-tie, and the two can differ from there on (see the module
    docstring).
    """
    check_pair(target, draft, k)
    check_new_tokens(max_new_tokens)
    ids = _prompt_ids((target, draft), tokenizer, prompt, next(target.parameters()).device, max_new_tokens)
    if ids.shape[0] != 1:
        raise ValueError("speculative_generate handles one prompt at a time (batch size 1)")
    return _speculate(target, draft, ids, max_new_tokens, k, _eos_id(tokenizer, stop_at_eos),
                      _greedy_propose, _greedy_verify)


# --- sampling ---------------------------------------------------------------------

def verify_sampled(p: torch.Tensor, q: torch.Tensor, guesses, generator: torch.Generator | None = None
                   ) -> tuple[list[int], int]:
    """The sampling verifier of one round (Leviathan et al. 2023; Chen et al. 2023): (kept tokens, accepted).

    ``p`` (k+1, V): the target's probabilities at the pending token and after each guess; ``q`` (k, V): the
    draft's probabilities each guess was drawn from; ``guesses``: the k drafted token ids. Guess x at position
    i is accepted with probability min(1, p_i(x) / q_i(x)); at the first rejection one token is drawn from the
    residual max(0, p_i - q_i), normalised, and the round ends; if all k are accepted a bonus token is drawn
    from p_k. Every kept token is then distributed exactly as the target's own sample would be.
    """
    guesses = [int(g) for g in guesses]
    k = len(guesses)
    if p.dim() != 2 or q.dim() != 2 or p.shape[0] != k + 1 or q.shape[0] != k or p.shape[1] != q.shape[1]:
        raise ValueError(f"p must be (k+1, V) and q (k, V) for k={k} guesses; got p {tuple(p.shape)}, "
                         f"q {tuple(q.shape)}")
    for i, x in enumerate(guesses):
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * float(q[i, x]) < float(p[i, x]):  # u < p/q, without dividing by a q(x) that may be tiny
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = float(residual.sum())
        # total is 0 only if p == q up to rounding, where a rejection has probability ~0: fall back to p
        dist = residual / total if total > 0 else p[i]
        return guesses[:i] + [int(torch.multinomial(dist, 1, generator=generator))], i
    return guesses + [int(torch.multinomial(p[k], 1, generator=generator))], k


def _check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a number > 0 (1.0: the model's own distribution; for "
                         f"temperature 0 use the greedy speculative_generate), got {temperature!r}")


def _generator(seed, generator, device) -> torch.Generator:
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator (or None, then seed is used), got {generator!r}")
        return generator
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return torch.Generator(device=device).manual_seed(int(seed))


@torch.inference_mode()
def speculative_sample(target, draft, prompt, max_new_tokens: int = 32, k: int = 4, temperature: float = 1.0,
                       seed: int = 0, generator: torch.Generator | None = None, tokenizer=None,
                       stop_at_eos: bool = True) -> SpeculativeResult:
    """Sampling speculative decoding (batch size 1): samples from the *target's* distribution, k at a time.

    The draft samples each guess from its own distribution q (softmax of logits / ``temperature``); the target
    scores them all in one pass and :func:`verify_sampled` keeps or replaces them. The output is not the
    target's sample for a given seed, but it has exactly the target's distribution (a test checks it over many
    samples); only the number of target passes changes. ``seed`` (or a ``generator`` on the model's device)
    makes a run repeatable. EOS handling as in :func:`speculative_generate`.
    """
    check_pair(target, draft, k)
    check_new_tokens(max_new_tokens)
    _check_temperature(temperature)
    device = next(target.parameters()).device
    gen = _generator(seed, generator, device)
    ids = _prompt_ids((target, draft), tokenizer, prompt, device, max_new_tokens)
    if ids.shape[0] != 1:
        raise ValueError("speculative_sample handles one prompt at a time (batch size 1)")

    def propose(row):
        q = torch.softmax(row.float() / temperature, -1)
        return int(torch.multinomial(q, 1, generator=gen)), q

    def verify(logits, guesses, q_rows):
        return verify_sampled(torch.softmax(logits.float() / temperature, -1), torch.stack(q_rows), guesses, gen)

    return _speculate(target, draft, ids, max_new_tokens, k, _eos_id(tokenizer, stop_at_eos), propose, verify)


@torch.inference_mode()
def sample_reference(model, prompt, max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
                     generator: torch.Generator | None = None, tokenizer=None,
                     stop_at_eos: bool = True) -> tuple[list[int], float]:
    """The model alone, sampling at ``temperature`` with its KV cache, one token per pass: (tokens, seconds)."""
    check_new_tokens(max_new_tokens)
    _check_temperature(temperature)
    device = next(model.parameters()).device
    gen = _generator(seed, generator, device)
    ids = _prompt_ids((model,), tokenizer, prompt, device, max_new_tokens)
    eos = _eos_id(tokenizer, stop_at_eos)
    t0 = time.perf_counter()
    cache = DynamicCache()
    logits = _step(model, ids, cache)[0, -1]
    new: list[int] = []
    for i in range(max_new_tokens):
        nxt = int(torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen))
        new.append(nxt)
        if nxt == eos:
            break
        if i + 1 < max_new_tokens:
            logits = _step(model, torch.tensor([[nxt]], device=device), cache)[0, -1]
    return new, time.perf_counter() - t0


@torch.inference_mode()
def greedy_reference(model, prompt, max_new_tokens: int = 32, tokenizer=None,
                     stop_at_eos: bool = True) -> tuple[list[int], float]:
    """The target alone, greedy with its KV cache, one token per pass: (tokens, seconds).

    The same loop shape as :func:`speculative_generate` (prefill, then one
    position per step), so the two are timed on equal terms; it stops at EOS
    the same way (only when a tokenizer is given).
    """
    check_new_tokens(max_new_tokens)
    device = next(model.parameters()).device
    ids = _prompt_ids((model,), tokenizer, prompt, device, max_new_tokens)
    eos = _eos_id(tokenizer, stop_at_eos)
    t0 = time.perf_counter()
    cache = DynamicCache()
    logits = _step(model, ids, cache)[:, -1]
    new = []
    for i in range(max_new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        new.append(int(nxt))
        if int(nxt) == eos:
            break
        if i + 1 < max_new_tokens:
            logits = _step(model, nxt, cache)[:, -1]
    return new, time.perf_counter() - t0


def sweep_k(target, draft, prompt_ids: torch.Tensor, ks: list[int], max_new_tokens: int = 64,
            repeat: int = 3) -> list[dict]:
    """Acceptance and tokens/s for several k (greedy), next to the target alone, timed interleaved.

    The target alone and every k run round after round (:func:`course_lib.timing.compare`, ``repeat``
    rounds after one warm-up), so their ratios hold on a shared machine. Each row has ``acceptance_rate``
    (accepted / proposed), ``alpha`` (per guess, what the expected-tokens formula needs),
    ``tokens_per_round`` measured and ``predicted_tokens_per_round`` from alpha, the median tokens/s with its
    p10-p90 range, and ``verdict``: :func:`course_lib.timing.speed_verdict` against the target alone.
    """
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    if not isinstance(ks, (list, tuple)) or not ks:
        raise ValueError(f"ks must be a non-empty list of draft lengths (e.g. [1, 2, 4]), got {ks!r}")
    for k in ks:
        check_pair(target, draft, k)
    ref, _ = greedy_reference(target, prompt_ids, max_new_tokens)
    results = {k: speculative_generate(target, draft, prompt_ids, max_new_tokens, k) for k in ks}
    fns = {"target-greedy": lambda: greedy_reference(target, prompt_ids, max_new_tokens)}
    for k in ks:
        fns[f"speculative-k{k}"] = lambda k=k: speculative_generate(target, draft, prompt_ids, max_new_tokens, k)
    times = compare(fns, rounds=repeat, warmup=1, device=next(target.parameters()).device)
    base = times["target-greedy"]
    n = len(ref)
    rows = [{"method": "target-greedy", "k": 0, "tok_s": n / base.median, "tok_s_p10": n / base.p90,
             "tok_s_p90": n / base.p10, "speedup": 1.0, "acceptance_rate": None, "alpha": None,
             "tokens_per_round": 1.0, "predicted_tokens_per_round": 1.0, "identical": True, "verdict": ""}]
    for k in ks:
        res, t = results[k], times[f"speculative-k{k}"]
        rows.append({"method": f"speculative-k{k}", "k": k, "tok_s": n / t.median, "tok_s_p10": n / t.p90,
                     "tok_s_p90": n / t.p10, "speedup": base.median / t.median,
                     "acceptance_rate": res.acceptance_rate, "alpha": res.alpha,
                     "tokens_per_round": res.tokens_per_round,
                     "predicted_tokens_per_round": expected_tokens_per_round(res.alpha, k),
                     "identical": res.tokens == ref,
                     "verdict": speed_verdict((f"speculative k={k}", t), ("the target alone", base))})
    return rows


def verify_cost(model, n_positions: list[int], context: int = 64, repeat: int = 5) -> list[dict]:
    """Time one forward pass over ``n`` new positions on top of a cached ``context``, for each n.

    This is the roofline question of speculative decoding: if checking n = k+1
    positions costs about as much as decoding one (memory-bound: the weights
    are read once either way), verification is nearly free. ``ratio`` is the
    median time relative to n = 1; the sizes are timed interleaved (``repeat`` rounds).
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, vocab, (1, context), generator=g).to(device)
    cache = DynamicCache()
    with torch.inference_mode():
        _step(model, ctx, cache)
    fns = {}
    for n in n_positions:
        new = torch.randint(0, vocab, (1, n), generator=g).to(device)

        def once(new=new):
            _step(model, new, cache)
            _rollback(cache, context)  # undo, so every call sees the same context

        fns[n] = once
    res = compare(fns, rounds=repeat, warmup=2, device=device)
    rows = [{"positions": n, "ms": r.median * 1e3, "p10_ms": r.p10 * 1e3, "p90_ms": r.p90 * 1e3}
            for n, r in res.items()]
    for r in rows:
        r["ratio"] = r["ms"] / rows[0]["ms"]
    return rows


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """Mean new tokens per target pass if each guess is accepted with probability ``alpha`` given the ones before.

    Guess i survives with probability alpha^i, and the round always adds one target token:
    1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha). ``alpha`` is the per-guess rate
    (:attr:`SpeculativeResult.alpha`), not accepted / proposed.
    """
    _check_acceptance(alpha, k)
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def _check_acceptance(acceptance, k) -> None:
    if isinstance(acceptance, bool) or not isinstance(acceptance, numbers.Real) or not 0 <= acceptance <= 1:
        raise ValueError(f"acceptance must be a probability in [0, 1], got {acceptance!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (draft tokens per round) must be an int >= 1, got {k!r}")


def predicted_speedup(acceptance: float, k: int, draft_cost: float, verify_ratio: float) -> float:
    """Speed-up over plain decoding if each guess is accepted independently with prob. ``acceptance``.

    ``acceptance`` is the per-guess rate alpha (:attr:`SpeculativeResult.alpha`).
    A round yields (1 - a^(k+1)) / (1 - a) tokens and costs k draft steps
    (each ``draft_cost`` times a target decode step) plus one verification
    (``verify_ratio`` times a target decode step).
    """
    _check_acceptance(acceptance, k)
    for name, v in (("draft_cost", draft_cost), ("verify_ratio", verify_ratio)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < float("inf"):
            raise ValueError(f"{name} must be a finite number > 0 (a cost relative to one target step), got {v!r}")
    return expected_tokens_per_round(acceptance, k) / (k * draft_cost + verify_ratio)


# --- prompt lookup: drafting without a draft model --------------------------------
#
# An answer that quotes its input (an extraction, an edited piece of code, a reply that cites a policy) repeats
# runs of tokens the model has already read. Prompt-lookup decoding (Saxena 2023; transformers'
# ``prompt_lookup_num_tokens``, llama.cpp's n-gram drafting) drafts from the text itself: find the latest
# earlier occurrence of the sequence's last n tokens and propose the tokens that followed it. The target checks
# them exactly as it checks a draft model's guesses, so greedy output and the sampling distribution are the
# target's own. The draft costs a dictionary lookup, not a forward pass; where nothing matches the round is a
# plain one-token step, so the only price is the wider verification pass of a draft that turns out wrong.

def _check_lookup(k, max_ngram, min_ngram) -> None:
    for name, v in (("k", k), ("max_ngram", max_ngram), ("min_ngram", min_ngram)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1 (k: tokens drafted per round, e.g. 5; max_ngram / "
                             f"min_ngram: the longest / shortest tail to look up, e.g. 3 and 2), got {v!r}")
    if min_ngram > max_ngram:
        raise ValueError(f"min_ngram ({min_ngram}) must be <= max_ngram ({max_ngram}): the lookup tries the tail "
                         "lengths max_ngram, max_ngram - 1, ..., min_ngram; swap the two")


class NgramIndex:
    """A growing token sequence and, for each n-gram, the position right after its latest occurrence.

    Only occurrences with at least one token after them are indexed, so the sequence's own last n-gram never
    matches itself. Appending a token costs one dict write per n in [min_ngram, max_ngram]; a lookup costs at
    most that many dict reads, instead of a scan of the whole context every decode step.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, tokens=()) -> None:
        _check_lookup(1, max_ngram, min_ngram)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self._after: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}
        self.extend(tokens)

    def extend(self, tokens) -> None:
        """Append ``tokens`` (ints) to the sequence."""
        for t in tokens:
            j = len(self.tokens)  # the n-grams ending just before position j now have a continuation
            for n, after in self._after.items():
                if j >= n:
                    after[tuple(self.tokens[j - n:j])] = j  # later occurrences overwrite earlier ones
            self.tokens.append(int(t))

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching tail ([] if none)."""
        end = len(self.tokens)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if end >= n:
                start = self._after[n].get(tuple(self.tokens[end - n:]))
                if start is not None:
                    return self.tokens[start:start + k]
        return []


def ngram_draft(tokens, k: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """The prompt-lookup draft for a whole sequence: the tokens after the latest earlier match of its tail.

    Tail lengths are tried from ``max_ngram`` down to ``min_ngram``; the first length that occurs earlier in
    ``tokens`` wins, and its latest occurrence gives up to ``k`` following tokens. ``[]`` when nothing matches.
    """
    _check_lookup(k, max_ngram, min_ngram)
    return NgramIndex(max_ngram, min_ngram, [int(t) for t in tokens]).draft(k)


@dataclass(frozen=True)
class PromptLookupResult(SpeculativeResult):
    """A :class:`SpeculativeResult` whose guesses came from the text; ``rounds`` counts every target pass."""

    max_ngram: int = 3
    min_ngram: int = 2
    per_round: tuple[tuple[int, int], ...] = field(default=(), repr=False)  # (accepted, drafted) of each pass

    @property
    def drafted_rounds(self) -> int:
        """Target passes that verified a draft; the others were plain one-token steps (no match)."""
        return sum(1 for _, d in self.per_round if d)


def _lookup_speculate(target, ids: torch.Tensor, max_new_tokens: int, k: int, max_ngram: int, min_ngram: int,
                      eos: int | None, verify) -> PromptLookupResult:
    """The prompt-lookup loop: draft from the text, score pending + draft in one target pass, keep what verify keeps.

    ``verify(target_logits (d+1, V), guesses (d,)) -> (kept tokens, accepted)``, as in :func:`_speculate`; d may
    be 0 (no match), and then the pass is an ordinary decode step.
    """
    device = ids.device
    t0 = time.perf_counter()
    index = NgramIndex(max_ngram, min_ngram, ids[0].tolist())
    cache = DynamicCache()
    if ids.shape[1] > 1:  # the same invariant as _speculate: the cache holds every token but `pending`
        _step(target, ids[:, :-1], cache)
    pending = ids[:, -1:]
    new: list[int] = []
    per_round: list[tuple[int, int]] = []
    accepted = evaluated = 0
    while len(new) < max_new_tokens:
        # a round yields its accepted guesses plus one token: never guess past the last token asked for
        guesses = index.draft(min(k, max_new_tokens - len(new) - 1))
        n_ctx = cache.get_seq_length()
        chunk = torch.cat([pending, torch.tensor([guesses], dtype=pending.dtype, device=device)], dim=1) \
            if guesses else pending
        kept, n = verify(_step(target, chunk, cache)[0], guesses)
        per_round.append((n, len(guesses)))
        looked_at = n + 1 if n < len(guesses) else len(guesses)
        took, seen, stopped = _keep(kept, n, looked_at, eos, new)
        accepted += took
        evaluated += seen
        if stopped:
            break
        index.extend(kept)
        _rollback(cache, n_ctx + 1 + n)  # forget the rejected guesses; the last kept token becomes pending
        pending = torch.tensor([[kept[-1]]], dtype=pending.dtype, device=device)
    return PromptLookupResult(new[:max_new_tokens], k, len(per_round), sum(d for _, d in per_round), accepted,
                              time.perf_counter() - t0, evaluated, max_ngram, min_ngram, tuple(per_round))


def _lookup_ids(target, prompt, tokenizer, max_new_tokens, k, max_ngram, min_ngram, name: str) -> torch.Tensor:
    _check_lookup(k, max_ngram, min_ngram)
    check_new_tokens(max_new_tokens)
    ids = _prompt_ids((target,), tokenizer, prompt, next(target.parameters()).device, max_new_tokens)
    if ids.shape[0] != 1:
        raise ValueError(f"{name} handles one prompt at a time (batch size 1); got {ids.shape[0]} rows: "
                         "call it once per prompt")
    return ids


@torch.inference_mode()
def prompt_lookup_generate(target, prompt, max_new_tokens: int = 32, k: int = 5, max_ngram: int = 3,
                           min_ngram: int = 2, tokenizer=None, stop_at_eos: bool = True) -> PromptLookupResult:
    """Greedy prompt-lookup decoding (batch size 1): the target's greedy tokens, drafted from the text itself.

    Each round looks up the last ``max_ngram`` .. ``min_ngram`` tokens of prompt + answer so far, drafts up to
    ``k`` tokens that followed their latest earlier occurrence (:class:`NgramIndex`), and has the target check
    them in one forward pass with the draft-model path's verifier; no match is a plain one-token step.
    ``prompt``, ``tokenizer`` and EOS as in :func:`speculative_generate`; in float32 the tokens are those of
    greedy ``generate``.
    """
    ids = _lookup_ids(target, prompt, tokenizer, max_new_tokens, k, max_ngram, min_ngram, "prompt_lookup_generate")
    return _lookup_speculate(target, ids, max_new_tokens, k, max_ngram, min_ngram, _eos_id(tokenizer, stop_at_eos),
                             lambda logits, guesses: _greedy_verify(logits, guesses, None))


@torch.inference_mode()
def prompt_lookup_compiled(decoder: CompiledDecoder, prompt_ids: torch.Tensor, max_new_tokens: int = 32, k: int = 5,
                           max_ngram: int = 3, min_ngram: int = 2, eos: int | None = None) -> PromptLookupResult:
    """Greedy prompt lookup on the course's compiled engine: :class:`~course_lib.generation.CompiledDecoder`.

    The same drafts as :func:`prompt_lookup_generate`; a round without a match is the decoder's one-token step,
    a round with one is ``decoder.verify_tokens``: k + 1 tokens through the static cache in one compiled pass (a
    shorter draft is padded, so one graph serves every pass; the padding's tokens are never read). Rejected tokens
    need no rollback: the slot counter moves past the kept ones only, and the next pass overwrites the rest. Where
    the native kernels run (bf16 projections on the CPU), each verified token's logits are exactly the one-token
    step's: a layer's kernel computes a row alike whatever the row count (AMX where the CPU has it, one row
    included), so the tokens are those of ``decoder(prompt_ids, max_new_tokens, eos=eos)``, bit for bit (a test
    checks it). ``prompt_ids`` is (1, T); ``eos`` as in the decoder's call.
    """
    _check_lookup(k, max_ngram, min_ngram)
    t0 = time.perf_counter()
    nxt, slot, cache = decoder.start(prompt_ids, max_new_tokens, room=k + 1)
    if nxt.shape[0] != 1:
        raise ValueError(f"prompt_lookup_compiled handles one prompt at a time (batch size 1); got {nxt.shape[0]} "
                         "rows: call it once per prompt")
    index = NgramIndex(max_ngram, min_ngram, prompt_ids[0].tolist())
    new, per_round = [int(nxt)], []
    accepted = evaluated = 0
    pad = [0] * k  # a shorter draft is padded to k + 1 tokens: one graph; the padding's tokens are never read
    while len(new) < max_new_tokens and not (eos is not None and new[-1] == eos):
        index.extend(new[-1:])
        guesses = index.draft(min(k, max_new_tokens - len(new) - 1))
        if decoder.cuda_graphs:  # each call a new replay (as in the decoder's own loop)
            torch.compiler.cudagraph_mark_step_begin()
        if not guesses:
            if decoder.cuda_graphs:  # a replay must not advance its own input
                nxt = decoder.step(nxt, slot, cache).argmax(-1, keepdim=True)
                slot += 1
            else:
                nxt = decoder.next_token(nxt, slot, cache)  # advances slot in place
            per_round.append((0, 0))
            new.append(int(nxt))
            continue
        chunk = torch.tensor([[new[-1], *guesses, *pad[len(guesses):]]], dtype=nxt.dtype, device=nxt.device)
        best = decoder.verify_tokens(chunk, slot, cache)[0].tolist()  # the target's token after each position
        n = 0
        while n < len(guesses) and guesses[n] == best[n]:
            n += 1
        kept = guesses[:n] + [best[n]]
        per_round.append((n, len(guesses)))
        took, seen, _ = _keep(kept, n, n + 1 if n < len(guesses) else len(guesses), eos, new)
        accepted += took
        evaluated += seen
        index.extend(kept[:-1])
        slot += n + 1
        nxt = torch.tensor([[kept[-1]]], dtype=nxt.dtype, device=nxt.device)
    return PromptLookupResult(new[:max_new_tokens], k, len(per_round), sum(d for _, d in per_round), accepted,
                              time.perf_counter() - t0, evaluated, max_ngram, min_ngram, tuple(per_round))


def point_mass(guesses, vocab_size: int, device=None) -> torch.Tensor:
    """(d, V) rows that each put all their probability on one guess: the "distribution" a lookup draft comes from.

    Fed to :func:`verify_sampled` as ``q``, guess x is accepted with probability min(1, p(x) / 1) = p(x), and a
    rejection draws from max(0, p - q) = p with x removed, renormalised.
    """
    q = torch.zeros(len(guesses), vocab_size, device=device)
    if len(guesses):
        q[torch.arange(len(guesses), device=device), torch.as_tensor(list(guesses), device=device)] = 1.0
    return q


@torch.inference_mode()
def prompt_lookup_sample(target, prompt, max_new_tokens: int = 32, k: int = 5, max_ngram: int = 3,
                         min_ngram: int = 2, temperature: float = 1.0, seed: int = 0,
                         generator: torch.Generator | None = None, tokenizer=None,
                         stop_at_eos: bool = True) -> PromptLookupResult:
    """Sampling prompt-lookup decoding: samples from the target's distribution, drafts from the text.

    A looked-up draft is a point mass (:func:`point_mass`), so :func:`verify_sampled` accepts guess x with
    probability p(x) and, on a rejection, samples from p with x removed: every token keeps the target's
    distribution (a test checks it over many samples). Arguments as in :func:`prompt_lookup_generate` and
    :func:`speculative_sample`.
    """
    _check_temperature(temperature)
    ids = _lookup_ids(target, prompt, tokenizer, max_new_tokens, k, max_ngram, min_ngram, "prompt_lookup_sample")
    gen = _generator(seed, generator, ids.device)

    def verify(logits, guesses):
        p = torch.softmax(logits.float() / temperature, -1)
        return verify_sampled(p, point_mass(guesses, p.shape[-1], p.device), guesses, gen)

    return _lookup_speculate(target, ids, max_new_tokens, k, max_ngram, min_ngram, _eos_id(tokenizer, stop_at_eos),
                             verify)


def lookup_speedup(target, groups: dict[str, list[torch.Tensor]], max_new_tokens: int = 64, k: int = 5,
                   max_ngram: int = 3, min_ngram: int = 2, repeat: int = 3, tokenizer=None) -> list[dict]:
    """Decode speed of prompt lookup against plain greedy decoding, per group of prompts, timed interleaved.

    ``groups`` maps a name ("quoting", "other") to prompts as (1, T) id tensors. Each round times, for every
    group, the plain loop (:func:`greedy_reference`), prompt lookup, and a prefill (the same loop asked for one
    token), all interleaved (:func:`course_lib.timing.compare`, one warm-up round). Decode time is a method's
    time minus the prefill's in the same round, so a long quoted prompt's prefill does not dilute the ratio.
    Each row: decode tok/s of both (median), ``speedup`` (median of the per-round ratios) with its p10-p90,
    ``verdict`` (:func:`course_lib.timing.speed_verdict`), acceptance (accepted / proposed and per-guess
    ``alpha``), ``tokens_per_pass`` and ``drafted_frac`` (passes that verified a draft), and ``identical``.
    """
    _check_lookup(k, max_ngram, min_ngram)
    _check_speedup_args(max_new_tokens, repeat, groups)
    results, fns = {}, {}
    for name, prompts in groups.items():
        ref = [greedy_reference(target, p, max_new_tokens, tokenizer=tokenizer)[0] for p in prompts]
        res = [prompt_lookup_generate(target, p, max_new_tokens, k, max_ngram, min_ngram, tokenizer=tokenizer)
               for p in prompts]
        results[name] = (ref, res)
        fns[f"{name}/greedy"] = lambda ps=prompts: [greedy_reference(target, p, max_new_tokens, tokenizer=tokenizer)
                                                    for p in ps]
        fns[f"{name}/lookup"] = lambda ps=prompts: [
            prompt_lookup_generate(target, p, max_new_tokens, k, max_ngram, min_ngram, tokenizer=tokenizer)
            for p in ps]
        fns[f"{name}/prefill"] = lambda ps=prompts: [greedy_reference(target, p, 1, tokenizer=tokenizer) for p in ps]
    times = compare(fns, rounds=repeat, warmup=1, device=next(target.parameters()).device)
    return _speedup_rows(results, times, k, max_ngram, min_ngram)


def lookup_speedup_compiled(decoder: CompiledDecoder, groups: dict[str, list[torch.Tensor]], max_new_tokens: int = 64,
                            k: int = 5, max_ngram: int = 3, min_ngram: int = 2, repeat: int = 3,
                            eos: int | None = None) -> list[dict]:
    """:func:`lookup_speedup` on the compiled engine: :func:`prompt_lookup_compiled` against the decoder's own
    greedy loop (``decoder(ids, n, eos=eos)``), per group, timed interleaved with a prefill subtracted. Same rows;
    ``identical``: the lookup's tokens are the plain loop's."""
    _check_lookup(k, max_ngram, min_ngram)
    _check_speedup_args(max_new_tokens, repeat, groups)
    results, fns = {}, {}
    for name, prompts in groups.items():
        ref = [decoder(p, max_new_tokens, eos=eos)[0].tolist() for p in prompts]
        res = [prompt_lookup_compiled(decoder, p, max_new_tokens, k, max_ngram, min_ngram, eos) for p in prompts]
        results[name] = (ref, res)
        fns[f"{name}/greedy"] = lambda ps=prompts: [decoder(p, max_new_tokens, eos=eos) for p in ps]
        fns[f"{name}/lookup"] = lambda ps=prompts: [
            prompt_lookup_compiled(decoder, p, max_new_tokens, k, max_ngram, min_ngram, eos) for p in ps]
        fns[f"{name}/prefill"] = lambda ps=prompts: [decoder(p, 1) for p in ps]
    times = compare(fns, rounds=repeat, warmup=1, device=decoder.scratch.device)
    return _speedup_rows(results, times, k, max_ngram, min_ngram)


def _check_speedup_args(max_new_tokens, repeat, groups) -> None:
    check_new_tokens(max_new_tokens)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    if not isinstance(groups, dict) or not groups or not all(isinstance(v, (list, tuple)) and v
                                                            for v in groups.values()):
        raise ValueError("groups must be a non-empty dict {name: [prompt ids, ...]}, e.g. {'quoting': [ids1, ids2]}")


def _speedup_rows(results: dict, times: dict, k: int, max_ngram: int, min_ngram: int) -> list[dict]:
    """One row per group from its answers ((plain tokens, lookup results)) and the interleaved times."""
    rows = []
    for name, (ref, res) in results.items():
        pre = times[f"{name}/prefill"].times
        # clamp at a microsecond: on a noisy machine a short decode can time below its prefill
        dec = {m: BenchResult.from_times([max(t - p, 1e-6) for t, p in zip(times[f"{name}/{m}"].times, pre)],
                                         "perf_counter") for m in ("greedy", "lookup")}
        ratios = sorted(g / max(lk, 1e-6) for g, lk in zip(dec["greedy"].times, dec["lookup"].times))
        spread = BenchResult.from_times(ratios, "ratio")
        n_dec = sum(len(r) - 1 for r in ref)  # the first token of each answer comes with its prefill
        passes = sum(r.rounds for r in res)
        rows.append({
            "group": name, "prompts": len(ref), "new_tokens": sum(len(r) for r in ref), "k": k,
            "max_ngram": max_ngram, "min_ngram": min_ngram,
            "greedy_tok_s": n_dec / dec["greedy"].median, "lookup_tok_s": n_dec / dec["lookup"].median,
            "speedup": spread.median, "speedup_p10": spread.p10, "speedup_p90": spread.p90,
            "acceptance_rate": sum(r.accepted for r in res) / max(1, sum(r.proposed for r in res)),
            "alpha": sum(r.accepted for r in res) / max(1, sum(r.evaluated for r in res)),
            "tokens_per_pass": sum(len(r.tokens) for r in res) / max(1, passes),
            "drafted_frac": sum(r.drafted_rounds for r in res) / max(1, passes),
            "identical": all(r.tokens == want for r, want in zip(res, ref)),
            "verdict": speed_verdict(("prompt lookup", dec["lookup"]), ("plain greedy", dec["greedy"])),
        })
    return rows

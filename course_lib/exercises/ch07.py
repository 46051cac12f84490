"""Chapter 07 exercises: the distillation loss, the sampling acceptance rule, the per-guess rate, the lookup draft."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..speculative import ngram_draft
from ..training import kd_loss
from . import Feedback, attempt, checked, fail, ok


def _kd_cases():
    g = torch.Generator().manual_seed(7)
    for T, alpha in ((1.0, 0.5), (2.0, 0.5), (4.0, 0.8), (2.0, 1.0), (3.0, 0.0)):
        s = torch.randn(3, 5, 17, generator=g) * 2
        t = torch.randn(3, 5, 17, generator=g) * 2
        y = torch.randint(0, 17, (3, 5), generator=g)
        yield s, t, y, T, alpha


@checked
def check_kd_loss(fn: Callable) -> Feedback:
    """``fn(student_logits, teacher_logits, targets, T, alpha) -> scalar`` must equal the library's kd_loss."""
    for s, t, y, T, alpha in _kd_cases():
        out = attempt(fn, s, t, y, T, alpha)
        if out is None:
            return fail("your function returned None: return the loss (a scalar tensor)")
        try:
            got = float(out)
        except (TypeError, ValueError, RuntimeError):
            return fail(f"your function returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))}: "
                        "return one number, the loss averaged over every position")
        want = kd_loss(s, t, y, T, alpha).item()
        if math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-5):
            continue
        kl_part = kd_loss(s, t, y, T, 1.0).item() / T**2  # plain KL at temperature T
        ce_part = kd_loss(s, t, y, T, 0.0).item()
        if math.isclose(got, alpha * kl_part + (1 - alpha) * ce_part, rel_tol=1e-4):
            return fail(f"at T={T} your soft-target term is missing the T^2 factor: multiply the KL by T**2 "
                        "so its gradient does not shrink as T grows")
        reverse = alpha * kd_loss(s, t, y, T, 1.0, kind="reverse").item() + (1 - alpha) * ce_part
        if math.isclose(got, reverse, rel_tol=1e-4):
            return fail("you computed KL(student || teacher); Hinton's loss is KL(teacher || student): "
                        "weight by the teacher's probabilities")
        swapped = (1 - alpha) * T**2 * kl_part + alpha * ce_part
        if math.isclose(got, swapped, rel_tol=1e-4):
            return fail("alpha weights the wrong term: alpha multiplies the soft (teacher) term, 1 - alpha the "
                        "cross-entropy")
        if T != 1 and math.isclose(got, alpha * T * kl_part + (1 - alpha) * ce_part, rel_tol=1e-4):
            return fail(f"at T={T} you multiplied the KL by T; the factor is T**2 (the softened gradient shrinks "
                        "like 1/T twice: once from logits / T, once from the flatter distributions)")
        summed = alpha * T**2 * kl_part * s.shape[0] * s.shape[1] + (1 - alpha) * ce_part
        if math.isclose(got, summed, rel_tol=1e-4):
            return fail("the KL is summed over positions; average it over positions (like the cross-entropy)")
        per_batch = alpha * T**2 * kl_part * s.shape[1] + (1 - alpha) * ce_part
        if math.isclose(got, per_batch, rel_tol=1e-4):
            return fail(f"the KL is divided by the batch size ({s.shape[0]}) only, so it still sums the "
                        f"{s.shape[1]} positions of each sequence (F.kl_div's reduction='batchmean' does that on "
                        "3-D logits): average over every position, e.g. flatten to (batch * positions, vocab) first")
        per_entry = alpha * T**2 * kl_part / s.shape[-1] + (1 - alpha) * ce_part
        if math.isclose(got, per_entry, rel_tol=1e-4):
            return fail(f"the KL is averaged over the vocabulary too (F.kl_div's reduction='mean' divides by all "
                        f"{s.shape[-1]} entries of each row): sum over the vocabulary, average over positions")
        ce_soft = alpha * T**2 * kl_part + (1 - alpha) * torch.nn.functional.cross_entropy(
            (s / T).reshape(-1, s.shape[-1]), y.reshape(-1)).item()
        if T != 1 and math.isclose(got, ce_soft, rel_tol=1e-4):
            return fail("the cross-entropy uses the softened logits: the hard-label term uses the plain "
                        "student logits (temperature 1)")
        return fail(f"at T={T}, alpha={alpha} you got {got:.5f}, expected {want:.5f}. Check: both "
                    "distributions use logits / T, CE uses the plain logits, mean over positions")
    return ok("your loss matches course_lib.distillation.kd_loss for every T and alpha tried")


# --- the sampling acceptance rule -------------------------------------------------------

_P = torch.tensor([0.50, 0.05, 0.25, 0.15, 0.05])
_Q = torch.tensor([0.10, 0.40, 0.20, 0.10, 0.20])


def _wrong_rules(p: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
    """First-token distribution (k = 1) that each common mistake produces, with the hint it deserves."""
    keep = torch.minimum(p, q)  # P(draft x and accept it) under the right test
    beta = float(keep.sum())
    resid = (p - q).clamp_min(0)
    resid = resid / resid.sum()
    up = (p >= q).float()
    return {
        "every guess is accepted: the output is the draft's distribution q. Accept guess x only with "
        "probability min(1, p(x) / q(x))": q,
        "after a rejection you draw from p; draw from the residual max(0, p - q), normalised (p would count "
        "the tokens the draft already proposes twice)": keep + (1 - beta) * p,
        "after a rejection you draw from q; draw from the residual max(0, p - q), normalised": keep + (1 - beta) * q,
        "you accept only when p(x) >= q(x); accept with probability min(1, p(x) / q(x)): a guess the target "
        "likes less than the draft is still accepted sometimes": q * up + float((q * (1 - up)).sum()) * resid,
    }


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def _call_verify(fn, p, q, guesses, g, k):
    out = attempt(fn, p, q, list(guesses), g)
    if not (isinstance(out, tuple) and len(out) == 2):
        return None, fail(f"return a pair (kept tokens, number accepted); got {type(out).__name__}")
    kept, n = out
    kept = [int(t) for t in kept]
    n = int(n)
    if not 0 <= n <= k or len(kept) != n + 1:
        return None, fail(f"with k={k} guesses you returned {len(kept)} tokens and accepted={n}: a round keeps the "
                          "accepted guesses plus exactly one more token (the replacement, or the bonus)")
    if kept[:n] != list(guesses[:n]):
        return None, fail("the first `accepted` kept tokens must be the accepted guesses themselves, in order")
    return (kept, n), None


@checked
def check_verify_sampled(fn: Callable) -> Feedback:
    """``fn(p, q, guesses, generator) -> (kept, accepted)``: the sampling verifier of one round.

    ``p`` (k+1, V) target probabilities, ``q`` (k, V) draft probabilities, ``guesses`` the k drafted ids.
    """
    g = torch.Generator().manual_seed(0)
    same = torch.tensor([0.2, 0.3, 0.5])
    for _ in range(10):  # a draft identical to the target is always accepted and earns the bonus token
        res, bad = _call_verify(fn, torch.stack([same] * 3), torch.stack([same] * 2), [2, 1], g, 2)
        if bad is not None:
            return bad
        if res[1] != 2:
            return fail("with q == p every guess must be accepted (min(1, p/q) = 1), and the round adds a bonus "
                        "token drawn from the last row of p")
    half, last = torch.tensor([0.4, 0.6, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    res, bad = _call_verify(fn, torch.stack([half, half, last]), torch.stack([half, half]), [0, 1], g, 2)
    if bad is not None:
        return bad
    if res[1] == 2 and res[0][2] != 2:  # after 2 accepted guesses only p[2] = [0, 0, 1] can give the bonus
        return fail("the bonus token after all k guesses are accepted is drawn from the last row of p, p[k] (the "
                    "target's distribution after the last guess; q has no row for it): here that is always token "
                    f"2, you returned {res[0][2]}")
    p0, q0 = torch.tensor([[0.0, 1.0, 0.0], [0.3, 0.3, 0.4]]), torch.tensor([[1.0, 0.0, 0.0]])
    for _ in range(10):  # the target gives the guess probability 0: always rejected, replaced by token 1
        res, bad = _call_verify(fn, p0, q0, [0], g, 1)
        if bad is not None:
            return bad
        if res[1] != 0:
            return fail("you accepted a guess the target gives probability 0: accept guess x only with "
                        "probability min(1, p(x) / q(x))")
        if res[0] != [1]:
            return fail("after the rejection the replacement comes from max(0, p - q), normalised: here that "
                        f"is always token 1, you returned {res[0]}")
    n = 4000
    counts = torch.zeros(5)
    p, q = torch.stack([_P, torch.full((5,), 0.2)]), _Q[None]
    for _ in range(n):
        guess = int(torch.multinomial(_Q, 1, generator=g))
        res, bad = _call_verify(fn, p, q, [guess], g, 1)
        if bad is not None:
            return bad
        counts[res[0][0]] += 1
    emp = counts / n
    err = _tv(emp, _P)
    if err < 0.04:  # sampling noise at n = 4000 is ~0.01
        return ok(f"over {n} rounds your first token follows the target's p (total variation {err:.3f}, the "
                  "sampling noise): the draft changed the speed, not the distribution")
    hint, _ = min(_wrong_rules(_P, _Q).items(), key=lambda kv: _tv(emp, kv[1]))
    return fail(f"over {n} rounds your first token is {err:.2f} (total variation) away from the target's p; "
                f"it looks like {hint}")


@checked
def check_alpha(fn: Callable) -> Feedback:
    """``fn(rounds) -> alpha``: per-guess acceptance from rounds given as (accepted, k) pairs."""
    cases = [[(1, 4), (4, 4)], [(0, 4), (1, 4), (4, 4)], [(3, 3)] * 3 + [(0, 3)], [(1, 2)], [(0, 5), (0, 5)]]
    for rounds in cases:
        acc = sum(n for n, _ in rounds)
        looked = sum(n + 1 if n < k else k for n, k in rounds)
        want = acc / looked
        got = attempt(fn, list(rounds))
        try:
            got = float(got)
        except (TypeError, ValueError):
            return fail(f"return one number (the rate), got {type(got).__name__}")
        if math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12):
            continue
        proposed = sum(k for _, k in rounds)
        if math.isclose(got, acc / proposed, rel_tol=1e-9):
            return fail(f"rounds={rounds}: you divided by every proposed guess ({acc}/{proposed}); the guesses after "
                        "a round's first rejection were never looked at. Count the accepted ones plus one "
                        "rejection per round that had one")
        if math.isclose(got, acc / sum(n + 1 for n, _ in rounds), rel_tol=1e-9):
            return fail(f"rounds={rounds}: a round where all k guesses were accepted had no rejection: it looked "
                        "at k guesses, not k + 1")
        return fail(f"rounds={rounds}: expected {want:.4f}, got {got:.4f}")
    return ok("right: accepted / (accepted + rejections). That is the a of (1 - a^(k+1)) / (1 - a)")


# --- the prompt-lookup draft -----------------------------------------------------------

# (tokens, k, max_ngram, min_ngram): each case tells one common mistake apart from the rule
_LOOKUP_CASES = (
    ([7, 1, 2, 3, 9, 1, 2, 4, 5, 1, 2], 3, 2, 1),  # (1, 2) twice before the tail: the latest is followed by 4, 5
    ([3, 1, 2, 8, 1, 2, 3, 1, 2], 4, 3, 2),  # the 3-gram (3, 1, 2) matches: longer beats the later 2-gram
    ([4, 5, 6, 7, 8, 9], 3, 3, 1),  # nothing repeats: no draft
    ([5, 6, 5, 6, 5, 6, 5, 6], 2, 2, 2),  # a loop: the latest earlier (5, 6) is followed by 5, 6
    ([2, 7, 1, 2, 7, 1, 2, 7, 1, 8, 2, 7], 9, 2, 1),  # at most k tokens, and only what the sequence has
    ([6, 6], 3, 1, 1),  # the tail is not an earlier occurrence of itself
    ([1, 2, 3, 4, 1, 2, 9, 9, 2], 4, 3, 1),  # only the 1-gram (2) matches: the latest earlier 2 is followed by 9
)


def _lookup_mistakes(tokens: list[int], k: int, hi: int, lo: int) -> dict[str, list[int]]:
    """What each common mistake returns, keyed by the hint it deserves."""
    def scan(order, latest, self_ok):
        for n in order:
            tail = tokens[len(tokens) - n:]
            last = len(tokens) - n if self_ok else len(tokens) - n - 1
            starts = range(last, -1, -1) if latest else range(0, last + 1)
            for s in starts:
                if n <= len(tokens) and tokens[s:s + n] == tail and (self_ok or s + n < len(tokens)):
                    return tokens[s + n:s + n + k]
        return []
    longest = range(hi, lo - 1, -1)
    return {
        "you took the earliest occurrence; take the latest earlier one (search from the end): recent text "
        "predicts the next tokens best": scan(longest, False, False),
        "you tried the shortest tail first; try n = max_ngram first and go down: a longer match is more "
        "specific": scan(range(lo, hi + 1), True, False),
        "the tail matched itself (nothing follows it, so you returned []): look only at occurrences that "
        "end before the last token": scan(longest, True, True),
    }


@checked
def check_ngram_draft(fn: Callable) -> Feedback:
    """``fn(tokens, k, max_ngram, min_ngram) -> list of ids``: the prompt-lookup draft of a token sequence."""
    for tokens, k, hi, lo in _LOOKUP_CASES:
        out = attempt(fn, list(tokens), k, hi, lo)
        try:
            got = [int(t) for t in out]
        except (TypeError, ValueError):
            return fail(f"return a list of token ids (possibly empty), got {type(out).__name__}")
        want = ngram_draft(tokens, k, hi, lo)
        if got == want:
            continue
        case = f"tokens={list(tokens)}, k={k}, max_ngram={hi}, min_ngram={lo}: expected {want}, got {got}"
        if len(got) > k:
            return fail(f"{case}. A draft has at most k tokens")
        for hint, wrong in _lookup_mistakes(list(tokens), k, hi, lo).items():
            if got == wrong:
                return fail(f"{case}. {hint}")
        if got and got == list(tokens[len(tokens) - len(got):]):
            return fail(f"{case}. You returned the matched n-gram itself; return the tokens that FOLLOW its "
                        "earlier occurrence")
        return fail(f"{case}. Try n = max_ngram down to min_ngram; for the first n whose last-n tokens occur "
                    "earlier, return up to k tokens after the latest such occurrence")
    return ok("your draft matches course_lib.speculative.ngram_draft on every case: longest tail first, latest "
              "earlier occurrence, at most k tokens")

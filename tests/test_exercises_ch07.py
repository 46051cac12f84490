"""Chapter 07 checks: the reference passes, typical mistakes get their specific hint, a stub is "not done"."""

import torch
import torch.nn.functional as F

from course_lib.exercises.ch07 import check_alpha, check_kd_loss, check_verify_sampled
from course_lib.speculative import verify_sampled


def reference_kd(s, t, y, T, alpha):
    log_ps = F.log_softmax(s / T, -1)
    pt = F.softmax(t / T, -1)
    kl = (pt * (pt.log() - log_ps)).sum(-1).mean()
    ce = F.cross_entropy(s.reshape(-1, s.size(-1)), y.reshape(-1))
    return alpha * T * T * kl + (1 - alpha) * ce


def stub(*args):
    raise NotImplementedError


def test_kd_check():
    assert check_kd_loss(reference_kd)
    no_t2 = check_kd_loss(lambda s, t, y, T, a: reference_kd(s, t, y, T, a) if T == 1 else
                          a * reference_kd(s, t, y, T, 1.0) / T**2 + (1 - a) * reference_kd(s, t, y, T, 0.0))
    assert not no_t2 and "T^2" in no_t2.message

    def reverse(s, t, y, T, a):
        ps, log_pt = F.softmax(s / T, -1), F.log_softmax(t / T, -1)
        kl = (ps * (ps.log() - log_pt)).sum(-1).mean()
        return a * T * T * kl + (1 - a) * reference_kd(s, t, y, T, 0.0)
    assert "KL(student" in check_kd_loss(reverse).message
    assert "the factor is T**2" in check_kd_loss(lambda s, t, y, T, a: a * reference_kd(s, t, y, T, 1.0) / T
                                                 + (1 - a) * reference_kd(s, t, y, T, 0.0)).message

    def kl_div(reduction):  # torch's F.kl_div on the 3-D logits, as a learner would first write it
        def fn(s, t, y, T, a):
            kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction=reduction)
            return a * T * T * kl + (1 - a) * reference_kd(s, t, y, T, 0.0)
        return fn
    assert "divided by the batch size" in check_kd_loss(kl_div("batchmean")).message
    assert "averaged over the vocabulary" in check_kd_loss(kl_div("mean")).message
    assert "raised" in check_kd_loss(lambda *a: 1 / 0).message
    assert "None" in check_kd_loss(lambda *a: None).message
    done = check_kd_loss(stub)
    assert not done and not done.done and "Not done" in done.message


def accept_always(p, q, guesses, g):
    return list(guesses) + [int(torch.multinomial(p[len(guesses)], 1, generator=g))], len(guesses)


def residual_from_p(p, q, guesses, g):
    for i, x in enumerate(guesses):
        if float(torch.rand((), generator=g)) * float(q[i, x]) >= float(p[i, x]):
            return list(guesses[:i]) + [int(torch.multinomial(p[i], 1, generator=g))], i
    return accept_always(p, q, guesses, g)


def deterministic(p, q, guesses, g):
    for i, x in enumerate(guesses):
        if p[i, x] < q[i, x]:
            r = (p[i] - q[i]).clamp_min(0)
            return list(guesses[:i]) + [int(torch.multinomial(r / r.sum(), 1, generator=g))], i
    return accept_always(p, q, guesses, g)


def test_verify_check():
    assert check_verify_sampled(verify_sampled)
    fb = check_verify_sampled(accept_always)
    assert not fb and "min(1, p(x) / q(x))" in fb.message  # the zero-probability case catches it first
    fb = check_verify_sampled(residual_from_p)
    assert not fb and "residual" in fb.message and "draw from p" in fb.message
    fb = check_verify_sampled(deterministic)
    assert not fb and "only when p(x) >= q(x)" in fb.message
    def bonus_from_q(p, q, guesses, g):  # the bonus drawn from the draft's last row instead of p[k]
        kept, n = verify_sampled(p, q, guesses, g)
        return (kept[:-1] + [int(torch.multinomial(q[-1], 1, generator=g))], n) if n == len(guesses) else (kept, n)
    fb = check_verify_sampled(bonus_from_q)
    assert not fb and "bonus token" in fb.message and "p[k]" in fb.message
    assert "exactly one more token" in check_verify_sampled(lambda p, q, gs, g: (list(gs), len(gs))).message
    assert "pair" in check_verify_sampled(lambda p, q, gs, g: list(gs)).message
    done = check_verify_sampled(stub)
    assert not done and not done.done


def test_alpha_check():
    def right(rounds):
        return sum(n for n, _ in rounds) / sum(n + 1 if n < k else k for n, k in rounds)
    assert check_alpha(right)
    assert "never looked at" in check_alpha(lambda r: sum(n for n, _ in r) / sum(k for _, k in r)).message
    assert "not k + 1" in check_alpha(lambda r: sum(n for n, _ in r) / sum(n + 1 for n, _ in r)).message
    assert "one number" in check_alpha(lambda r: "?").message
    done = check_alpha(stub)
    assert not done and not done.done


def test_ngram_draft_check():
    from course_lib.exercises.ch07 import check_ngram_draft
    from course_lib.speculative import ngram_draft

    assert check_ngram_draft(ngram_draft)

    def scan(tokens, k, hi, lo, order=None, latest=True, self_ok=False):
        for n in order or range(hi, lo - 1, -1):
            tail = tokens[len(tokens) - n:]
            last = len(tokens) - n if self_ok else len(tokens) - n - 1
            for s in (range(last, -1, -1) if latest else range(last + 1)):
                if tokens[s:s + n] == tail:
                    return tokens[s + n:s + n + k]
        return []

    assert check_ngram_draft(lambda t, k, hi, lo: scan(t, k, hi, lo))  # a plain scan is a right answer too
    fb = check_ngram_draft(lambda t, k, hi, lo: scan(t, k, hi, lo, latest=False))
    assert not fb and "earliest occurrence" in fb.message
    fb = check_ngram_draft(lambda t, k, hi, lo: scan(t, k, hi, lo, order=range(lo, hi + 1)))
    assert not fb and "shortest tail first" in fb.message
    fb = check_ngram_draft(lambda t, k, hi, lo: scan(t, k, hi, lo, self_ok=True))
    assert not fb and "matched itself" in fb.message
    fb = check_ngram_draft(lambda t, k, hi, lo: scan(t, k + 2, hi, lo))
    assert not fb and "at most k" in fb.message
    assert "list of token ids" in check_ngram_draft(lambda *a: 3).message
    done = check_ngram_draft(stub)
    assert not done and not done.done


def test_ngram_draft_check_names_a_returned_match():
    from course_lib.exercises.ch07 import check_ngram_draft
    from course_lib.speculative import ngram_draft

    def the_match(t, k, hi, lo):  # the tail itself, whenever there is a draft to return
        return list(t[len(t) - hi:]) if ngram_draft(t, k, hi, hi) else ngram_draft(t, k, hi, lo)
    fb = check_ngram_draft(the_match)
    assert not fb and "FOLLOW" in fb.message

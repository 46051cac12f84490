"""Chapter 07 checks pass on the reference solutions and give specific hints on typical mistakes."""

import torch
import torch.nn.functional as F

from course_lib.exercises.ch07 import check_accepted, check_expected_tokens, check_kd_loss


def reference_kd(s, t, y, T, alpha):
    log_ps = F.log_softmax(s / T, -1)
    pt = F.softmax(t / T, -1)
    kl = (pt * (pt.log() - log_ps)).sum(-1).mean()
    ce = F.cross_entropy(s.reshape(-1, s.size(-1)), y.reshape(-1))
    return alpha * T * T * kl + (1 - alpha) * ce


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
    assert "raised" in check_kd_loss(lambda *a: 1 / 0).message


def test_accepted_check():
    def prefix(g, c):
        n = 0
        while n < len(g) and g[n] == c[n]:
            n += 1
        return n
    assert check_accepted(prefix)
    counted = check_accepted(lambda g, c: sum(a == b for a, b in zip(g, c)))
    assert not counted and "prefix" in counted.message


def test_expected_tokens_check():
    assert check_expected_tokens(lambda a, k: k + 1 if a == 1 else (1 - a ** (k + 1)) / (1 - a))
    assert "a**i" in check_expected_tokens(lambda a, k: 1 + a * k).message
    assert "acceptance = 1" in check_expected_tokens(lambda a, k: (1 - a ** (k + 1)) / (1 - a)).message
    assert not check_expected_tokens(lambda a, k: torch.tensor(2.0))

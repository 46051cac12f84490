"""Chapter 07 exercises: the distillation loss, the acceptance rule and the speculative payoff."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import Feedback, fail, ok


def _kd_cases():
    g = torch.Generator().manual_seed(7)
    for T, alpha in ((1.0, 0.5), (2.0, 0.5), (4.0, 0.8), (2.0, 1.0), (3.0, 0.0)):
        s = torch.randn(3, 5, 17, generator=g) * 2
        t = torch.randn(3, 5, 17, generator=g) * 2
        y = torch.randint(0, 17, (3, 5), generator=g)
        yield s, t, y, T, alpha


def check_kd_loss(fn: Callable) -> Feedback:
    """``fn(student_logits, teacher_logits, targets, T, alpha) -> scalar`` must equal the library's kd_loss."""
    from ..distillation import kd_loss

    for s, t, y, T, alpha in _kd_cases():
        try:
            got = float(fn(s, t, y, T, alpha))
        except Exception as e:  # the learner's code: report, don't crash the notebook
            return fail(f"your function raised {type(e).__name__}: {e} (T={T}, alpha={alpha})")
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
        summed = alpha * T**2 * kl_part * s.shape[0] * s.shape[1] + (1 - alpha) * ce_part
        if math.isclose(got, summed, rel_tol=1e-4):
            return fail("the KL is summed over positions; average it over positions (like the cross-entropy)")
        return fail(f"at T={T}, alpha={alpha} you got {got:.5f}, expected {want:.5f}. Check: both "
                    "distributions use logits / T, CE uses the plain logits, mean over positions")
    return ok("your loss matches course_lib.distillation.kd_loss for every T and alpha tried")


def check_accepted(fn: Callable) -> Feedback:
    """``fn(guesses, target_choice) -> n``: how many draft tokens a greedy verifier keeps (a prefix!)."""
    cases = [([5, 6, 7], [5, 6, 7, 8], 3), ([5, 6, 7], [5, 9, 7, 8], 1), ([5, 6, 7], [4, 6, 7, 8], 0),
             ([1], [1, 2], 1), ([3, 3, 3, 3], [3, 3, 1, 3, 0], 2)]
    for guesses, choice, want in cases:
        try:
            got = int(fn(list(guesses), list(choice)))
        except Exception as e:
            return fail(f"your function raised {type(e).__name__}: {e} on guesses={guesses}")
        if got == want:
            continue
        if got == sum(a == b for a, b in zip(guesses, choice)):
            return fail(f"guesses={guesses}, target={choice}: you counted every match ({got}), but once a guess "
                        "is wrong every later guess was drafted from a wrong context: keep only the prefix "
                        f"before the first mismatch ({want})")
        return fail(f"guesses={guesses}, target={choice}: expected {want}, got {got}")
    return ok("you keep exactly the agreeing prefix; the verifier then adds its own token, so every round "
              "yields n + 1 tokens")


def check_expected_tokens(fn: Callable) -> Feedback:
    """``fn(acceptance, k) -> expected new tokens per target pass`` (each guess accepted independently)."""
    for a, k in ((0.0, 4), (0.5, 1), (0.5, 4), (0.8, 4), (0.9, 8), (1.0, 3)):
        want = k + 1 if a == 1.0 else (1 - a ** (k + 1)) / (1 - a)
        try:
            got = float(fn(a, k))
        except Exception as e:
            return fail(f"your function raised {type(e).__name__}: {e} at acceptance={a}, k={k} "
                        "(hint: acceptance = 1 needs care)")
        if math.isclose(got, want, rel_tol=1e-6):
            continue
        if math.isclose(got, 1 + a * k, rel_tol=1e-6) or math.isclose(got, a * k, rel_tol=1e-6):
            return fail(f"acceptance={a}, k={k}: guess i counts only if guesses 1..i were all accepted, "
                        f"probability a**i; sum 1 + a + ... + a**k = {want:.4f}")
        return fail(f"acceptance={a}, k={k}: expected {want:.4f} tokens per round, got {got:.4f}")
    return ok("right: (1 - a^(k+1)) / (1 - a), between 1 (useless draft) and k + 1 (perfect draft)")

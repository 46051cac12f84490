"""Chapter 02 exercises: parameters -> bytes -> FLOPs."""

from __future__ import annotations

from collections.abc import Callable

from ..anatomy import BYTES_PER_PARAM
from . import Feedback, fail, first_failure, ok


def check_weight_bytes(fn: Callable[[int, str], float]) -> Feedback:
    """The learner's ``fn(n_params, fmt) -> bytes`` for fp32, bf16, int8 and int4."""
    checks = []
    for fmt, per in BYTES_PER_PARAM.items():
        try:
            got = float(fn(1_000_000, fmt))
        except Exception as e:
            return fail(f"your function raised {type(e).__name__} for fmt={fmt!r}: {e}")
        want = 1_000_000 * per
        if got == want:
            checks.append(ok())
        elif fmt == "int4" and got == 1_000_000:
            checks.append(fail("int4 packs two weights in one byte: 0.5 bytes per parameter, not 1"))
        elif got == want * 8:
            checks.append(fail(f"{fmt}: you returned bits, not bytes (divide by 8)"))
        else:
            checks.append(fail(f"{fmt}: expected {want:,.0f} bytes for 1M parameters, got {got:,.0f}"))
    return first_failure(*checks, success="Correct: bytes = parameters x bits / 8.")


def check_linear_flops(fn: Callable[[int, int, int], float]) -> Feedback:
    """The learner's ``fn(in_features, out_features, tokens) -> FLOPs`` of a Linear layer."""
    try:
        got = float(fn(576, 1536, 10))
    except Exception as e:
        return fail(f"your function raised {type(e).__name__}: {e}")
    want = 2 * 576 * 1536 * 10
    if got == want:
        return ok("Correct: each weight does one multiply and one add per token, 2 FLOPs.")
    if got == want / 2:
        return fail("a multiply-accumulate is 2 FLOPs (one multiply, one add); you counted 1")
    if got == want / 10:
        return fail("that is per token; multiply by the number of tokens")
    return fail(f"expected {want:,} FLOPs for a 576 -> 1536 layer over 10 tokens, got {got:,.0f}")

"""Exercises of notebook 05 (quantization): group-wise linear quantization and the GPTQ column update.

Each check runs the learner's function on several random cases (fixed seeds) against the library's reference
(:func:`course_lib.quantization.quantize` / :func:`~course_lib.quantization.dequantize` and
:func:`~course_lib.quantization.gptq_quantize_weight`) and says *what* is wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..quantization import QuantConfig, dequantize, gptq_quantize_weight, quantize
from . import Feedback, attempt, checked, fail, ok

QuantizeFn = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
DequantizeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
ColumnFn = Callable[[torch.Tensor, torch.Tensor, int, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def _is_tensor(x, shape) -> bool:
    return isinstance(x, torch.Tensor) and tuple(x.shape) == tuple(shape)


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


# --- 1. group-wise linear (asymmetric) quantization -------------------------------------------


def _group_cases() -> list[tuple[torch.Tensor, int, int]]:
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(8, 64, generator=g)
    w2 = 0.02 * torch.randn(16, 96, generator=g)
    w2[3, :32] = w2[3, :32].abs() + 0.01  # a group with no negative weight: its range must be widened to 0
    w2[7, 40] = 0.5  # an outlier: only its own group's scale should grow
    w3 = torch.randn(4, 128, generator=g)
    return [(w1, 4, 32), (w2, 3, 32), (w3, 8, 64)]


def _grouped_ref(w: torch.Tensor, bits: int, group_size: int):
    qt = quantize(w, bits, symmetric=False, granularity="per_group", group_size=group_size)
    n, k = w.shape
    return qt, qt.scale.reshape(n, k // group_size), qt.zero_point.reshape(n, k // group_size)


def _diagnose_scale(scale: torch.Tensor, w: torch.Tensor, bits: int, group_size: int,
                    ref_scale: torch.Tensor) -> Feedback:
    n, k = w.shape
    grouped = w.reshape(n, k // group_size, group_size)
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    steps = 2**bits - 1
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-9)  # noqa: E731
    if close(scale, (hi - lo) / 2**bits):
        return fail(f"your scales are (max - min) / 2^bits; {bits} bits give 2^bits - 1 = {steps} steps between "
                    f"the smallest and the largest code, so divide by {steps}")
    if close(scale, (hi - lo) / steps):
        return fail("nearly: one group has no negative weight, and its range [min, max] must be widened to "
                    "contain 0 (min = min(min, 0), max = max(max, 0)) so that 0.0 stays exactly representable")
    if close(scale, grouped.abs().amax(-1) / (2 ** (bits - 1) - 1)):
        return fail("those are symmetric scales (max|w| / (2^(b-1)-1)); this exercise is asymmetric: "
                    "scale = (max - min) / (2^b - 1) per group")
    by_column = w.t().reshape(-1, group_size)
    if by_column.shape[0] == scale.numel():
        col = (by_column.amax(-1).clamp(min=0) - by_column.amin(-1).clamp(max=0)) / steps
        if close(scale.reshape(-1), col):
            return fail(f"your groups run down the columns; a group is {group_size} consecutive *inputs* of one "
                        f"row (along dim 1): w.reshape(N, K // {group_size}, {group_size})")
    wrong = int((~torch.isclose(scale, ref_scale, rtol=1e-4, atol=1e-9)).sum())
    return fail(f"{wrong} of {scale.numel()} scales differ from (max - min) / (2^b - 1) over each group of "
                f"{group_size} consecutive inputs of a row (min widened to <= 0, max to >= 0)")


@checked
def check_group_quantize(quantize_fn: QuantizeFn, dequantize_fn: DequantizeFn) -> Feedback:
    """``quantize_fn(w, bits, group_size) -> (q, scale, zero)`` and ``dequantize_fn(q, scale, zero, group_size)``.

    Asymmetric, one scale and one integer zero point per group of ``group_size`` consecutive inputs of a row:
    ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)`` with q shaped like ``w`` (N, K), scale and zero shaped
    (N, K // group_size); ``w_hat = (q - zero) * scale``.
    """
    for w, bits, gs in _group_cases():
        n, k = w.shape
        qt, ref_scale, ref_zero = _grouped_ref(w, bits, gs)
        out = attempt(quantize_fn, w.clone(), bits, gs, what="`my_group_quantize`")
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            return fail(f"`my_group_quantize` should return three tensors (q, scale, zero), got {type(out).__name__}")
        q, scale, zero = out
        if _is_tensor(q, (n, k // gs, gs)):
            return fail(f"q came back grouped {tuple(q.shape)}; reshape it back to w's shape {(n, k)}")
        if not _is_tensor(q, (n, k)):
            return fail(f"q should be shaped like w {(n, k)}, got {_shape(q)}")
        qf = q.float()
        if not torch.equal(qf, qf.round()):
            z = torch.as_tensor(zero).float()
            if not torch.equal(z, z.round()):
                return fail("your zero point is a fraction, so q is too: the zero point must be an integer, "
                            "round(-min / scale), so that w = 0.0 maps to an integer code exactly")
            return fail("q holds fractions: round w / scale (plus the zero point) to the nearest integer")
        steps = 2**bits - 1
        if qf.min() < 0:
            return fail(f"q has negative codes (min {int(qf.min())}); asymmetric codes run from 0 to 2^b - 1 = "
                        f"{steps}: add the zero point, then clamp to [0, {steps}]")
        if qf.max() > steps:
            return fail(f"at {bits} bits q must stay in [0, {steps}], you have up to {int(qf.max())}: clamp after "
                        "rounding")
        for name, t in (("scale", scale), ("zero", zero)):
            t = torch.as_tensor(t)
            if t.numel() == 1:
                return fail(f"your {name} is a single number (per-tensor); per-group needs one per group: "
                            f"{n} rows x {k // gs} groups")
            if t.numel() == n:
                return fail(f"your {name} has one value per row (per-channel); per-group needs {k // gs} per row, "
                            f"one for each {gs} consecutive inputs")
            if t.numel() != n * (k // gs):
                return fail(f"expected {n * (k // gs)} {name} values ({n} rows x {k // gs} groups of {gs}), got "
                            f"{t.numel()} (shape {_shape(t)})")
        scale = torch.as_tensor(scale).float().reshape(n, k // gs)
        zero = torch.as_tensor(zero).float().reshape(n, k // gs)
        if not torch.allclose(scale, ref_scale, rtol=1e-4, atol=1e-9):
            return _diagnose_scale(scale, w, bits, gs, ref_scale)
        if not torch.allclose(zero, ref_zero, atol=1e-4):
            if not torch.equal(zero, zero.round()):
                return fail("the zero point must be an integer (round(-min / scale)), so that w = 0.0 maps to an "
                            "integer code exactly")
            if torch.allclose(zero, -ref_zero, atol=1e-4):
                return fail("the zero point has the wrong sign: it is round(-min / scale), a code >= 0")
            return fail("zero points differ: zero = round(-min / scale), with min widened to <= 0")
        if not torch.equal(qf, qt.q.float()):
            wrong = int((qf != qt.q.float()).sum())
            return fail(f"scales and zeros are right but {wrong} codes differ: q = clamp(round(w / scale) + zero, "
                        f"0, {steps}), with each group's own scale and zero")
        # dequantize, given the reference's integers (as the uint8 they are stored in) and parameters
        want = dequantize(qt)
        got = attempt(dequantize_fn, qt.q.clone(), ref_scale.clone(), ref_zero.clone(), gs,
                      what="`my_group_dequantize`")
        if not _is_tensor(got, (n, k)):
            return fail(f"`my_group_dequantize` should return a float tensor shaped {(n, k)}, got {_shape(got)}")
        if not torch.allclose(got.float(), want, rtol=1e-5, atol=1e-7):
            as_float = attempt(dequantize_fn, qt.q.float(), ref_scale.clone(), ref_zero.clone(), gs,
                               what="`my_group_dequantize`")
            if _is_tensor(as_float, (n, k)) and torch.allclose(as_float.float(), want, rtol=1e-5, atol=1e-7):
                return fail("right with float codes, wrong with the stored uint8 codes: convert q with q.float() "
                            "before subtracting the zero point (uint8 arithmetic wraps around)")
            qg = qt.q.float().reshape(n, k // gs, gs)
            s, z = ref_scale[..., None], ref_zero[..., None]
            if torch.allclose(got.float(), (qg * s).reshape(n, k), rtol=1e-5, atol=1e-7):
                return fail("you forgot the zero point: w_hat = (q - zero) * scale")
            if torch.allclose(got.float(), (qg * s - z).reshape(n, k), rtol=1e-5, atol=1e-7):
                return fail("subtract the zero point in integer units, before scaling: (q - zero) * scale, "
                            "not q * scale - zero")
            return fail("`my_group_dequantize` gives other values than (q - zero) * scale per group of "
                        f"{gs} consecutive inputs: view q as (N, K // {gs}, {gs}) so each group meets its own "
                        "scale and zero")
    return ok("Correct: per-group codes, scales and zero points match the library's quantize(..., "
              "granularity='per_group'), and every weight comes back within half a step.")


# --- 2. the GPTQ column update --------------------------------------------------------------


def _hessian_cases(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (n, k) and a damped Hessian 2 X^T X / m of correlated inputs (a few loud channels)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(4 * k, k, generator=g) @ mix  # correlated inputs: what GPTQ's compensation exploits
    x[:, :2] *= 6  # two outlier channels
    h = 2 * x.t() @ x / x.shape[0]
    return w, h


def _inverse_factor(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(damped H, upper Cholesky factor of its inverse): what gptq_quantize_weight works with."""
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    return h, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def _row_rounder(w: torch.Tensor, bits: int = 4) -> Callable[[torch.Tensor], torch.Tensor]:
    """Asymmetric rounding of one column with each row's scale and zero (from the whole of ``w``)."""
    qt = quantize(w, bits, symmetric=False, granularity="per_channel")
    s, z = qt.scale.reshape(-1), qt.zero_point.reshape(-1)
    return lambda col: (torch.clamp(torch.round(col / s) + z, 0, 2**bits - 1) - z) * s


def _column_ref(w: torch.Tensor, hinv: torch.Tensor, i: int, rnd) -> torch.Tensor:
    """One GPTQ step, as in the library's inner loop: round column i, push its scaled error to the right."""
    w = w.clone()
    col = w[:, i].clone()
    rounded = rnd(col)
    err = (col - rounded) / hinv[i, i]
    w[:, i + 1 :] -= err[:, None] * hinv[i, i + 1 :][None, :]
    w[:, i] = rounded
    return w


def _diagnose_column(got: torch.Tensor, w: torch.Tensor, hinv: torch.Tensor, i: int, rnd,
                     want: torch.Tensor) -> Feedback:
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731
    if not close(got[:, :i], w[:, :i]):
        return fail(f"columns 0..{i - 1} changed; they are already rounded and final: GPTQ only updates the "
                    f"columns to the right of i = {i}")
    if not close(got[:, i], want[:, i]):
        if close(got[:, i], w[:, i]):
            return fail(f"column i = {i} still holds the float weights; store the rounded column rnd(W[:, i]) there")
        return fail(f"column i = {i} should be rnd(W[:, i]), the rounded column")
    right = slice(i + 1, None)
    if close(got[:, right], w[:, right]):
        return fail("the columns after i did not change: spread the error over them, "
                    "W[:, i+1:] -= err[:, None] * Hinv[i, i+1:] with err = (W[:, i] - rnd(W[:, i])) / Hinv[i, i] "
                    "(row i of the upper factor Hinv: its column below the diagonal is zero)")
    col = w[:, i]
    diff = (col - rnd(col))
    for err, hint in ((diff, "divide the error by Hinv[i, i] (the step's own curvature) before spreading it"),
                      (-diff / hinv[i, i], "sign: the later columns move *against* the error, W -= err * Hinv[i, j]"),
                      (diff * hinv[i, i], "divide the error by Hinv[i, i], do not multiply by it")):
        if close(got[:, right], w[:, right] - err[:, None] * hinv[i, right][None, :]):
            return fail(hint)
    if close(got[:, right], w[:, right] - (diff / hinv[i, i])[:, None] * hinv[right, i][None, :]):
        return fail("use row i of Hinv (Hinv[i, i+1:]), not its column")
    return fail("the columns after i changed, but not by W[:, j] -= err * Hinv[i, j] with "
                "err = (W[:, i] - rnd(W[:, i])) / Hinv[i, i]")


@checked
def check_gptq_column(fn: ColumnFn) -> Feedback:
    """``fn(W, Hinv, i, rnd) -> W``: round column ``i`` with ``rnd`` and spread its error over columns ``i+1..``.

    ``Hinv`` is the upper Cholesky factor of the (damped) inverse Hessian, as in
    :func:`course_lib.quantization.gptq_quantize_weight`. Checked one step at a time on random cases, then as
    a whole left-to-right loop against the library's GPTQ.
    """
    for n, k, seed, cols in ((6, 16, 0, (0, 5, 15)), (10, 24, 1, (3, 22))):
        w, h = _hessian_cases(n, k, seed)
        _, hinv = _inverse_factor(h)
        rnd = _row_rounder(w)
        for i in cols:
            got = attempt(fn, w.clone(), hinv.clone(), i, rnd, what="`my_gptq_column`")
            if not _is_tensor(got, (n, k)):
                return fail(f"`my_gptq_column` should return the updated W, shaped {(n, k)}; got {_shape(got)} "
                            "(did you forget `return W`?)")
            want = _column_ref(w, hinv, i, rnd)
            if not torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5):
                return _diagnose_column(got.float(), w, hinv, i, rnd, want)
    # The whole algorithm: your step, column after column, against the library's GPTQ (one block, one group).
    w, h = _hessian_cases(16, 32, 2)
    _, hinv = _inverse_factor(h)
    cfg = QuantConfig(bits=4, group_size=32)
    lib = dequantize(gptq_quantize_weight(w, h, cfg))
    rnd = _row_rounder(w)  # the library sets group 0's scales from the weights as they are at column 0: these
    cur = w.clone()
    for i in range(w.shape[1]):
        cur = attempt(fn, cur, hinv, i, rnd, what="`my_gptq_column`")
    same = torch.isclose(cur.float(), lib, rtol=1e-4, atol=1e-5).float().mean().item()
    if same < 0.98:
        return fail(f"each step looks right, but looping it over all columns matches the library's GPTQ on only "
                    f"{same:.0%} of the weights: does your function return W with every earlier column kept?")
    rtn = torch.stack([rnd(w[:, j]) for j in range(w.shape[1])], 1)
    # The error GPTQ minimises: the layer's output error on the calibration inputs, tr(dW H dWᵀ) with H ~ XᵀX.
    out_err = lambda wq: (((w - wq) @ h) * (w - wq)).sum().item()  # noqa: E731
    ratio = out_err(cur.float()) / out_err(rtn)
    return ok(f"Correct: your column loop reproduces the library's GPTQ. On this random layer its output error "
              f"on the calibration inputs (|X(W - Ŵ)ᵀ|²) is {ratio:.2f}x round-to-nearest's, with the same "
              "4-bit grid per row.")

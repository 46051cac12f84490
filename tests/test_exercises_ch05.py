"""The chapter 05 checks: pass on a right implementation, give the specific hint on wrong ones, 'not done' on stubs."""

from __future__ import annotations

import torch

from course_lib.exercises.ch05 import check_gptq_column, check_group_quantize

# --- group-wise quantization ------------------------------------------------------------------


def right_quantize(w, bits, group_size):
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
    return q.reshape(n, k), scale, zero


def right_dequantize(q, scale, zero, group_size):
    n, k = q.shape
    g = q.float().reshape(n, k // group_size, group_size)
    return ((g - zero[..., None]) * scale[..., None]).reshape(n, k)


def test_group_quantize_right_passes():
    fb = check_group_quantize(right_quantize, right_dequantize)
    assert fb.passed and fb.done, fb.message


def test_group_quantize_stubs_are_not_done():
    def stub(*args):
        raise NotImplementedError

    fb = check_group_quantize(stub, stub)
    assert not fb.passed and not fb.done and "my_group_quantize" in fb.message
    fb = check_group_quantize(right_quantize, stub)  # quantize written, dequantize still a stub
    assert not fb.passed and not fb.done and "my_group_dequantize" in fb.message


def _variant(**change):
    """right_quantize with one mistake."""

    def fn(w, bits, group_size):
        n, k = w.shape
        g = w.reshape(n, k // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        if not change.get("no_widen"):
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        steps = 2**bits if change.get("steps_2b") else 2**bits - 1
        scale = ((hi - lo) / steps).clamp(min=1e-12)
        zero = -lo / scale if change.get("float_zero") else torch.round(-lo / scale)
        q = torch.round(g / scale[..., None]) + (0 if change.get("no_zero") else zero[..., None])
        if not change.get("no_clamp"):
            q = torch.clamp(q, -(2**bits) if change.get("no_zero") else 0, 2**bits - 1)
        if change.get("no_round"):
            q = g / scale[..., None] + zero[..., None]
        q = q if change.get("grouped_q") else q.reshape(n, k)
        if change.get("per_channel"):
            return right_quantize(w, bits, k)[0], scale.amax(-1), zero.amax(-1)
        return q, scale, zero

    return fn


def test_group_quantize_wrong_gives_specific_hints():
    cases = {
        "steps_2b": "2^bits - 1",
        "no_widen": "contain 0",
        "float_zero": "zero point is a fraction",
        "no_zero": "negative codes",
        "no_round": "fractions",
        "grouped_q": "reshape it back",
        "per_channel": "one value per row",
    }
    for mistake, hint in cases.items():
        fb = check_group_quantize(_variant(**{mistake: True}), right_dequantize)
        assert not fb.passed and fb.done, mistake
        assert hint in fb.message, (mistake, fb.message)


def test_group_quantize_symmetric_and_column_groups_are_named():
    def symmetric(w, bits, group_size):
        n, k = w.shape
        g = w.reshape(n, k // group_size, group_size)
        scale = g.abs().amax(-1) / (2 ** (bits - 1) - 1)
        q = torch.round(g / scale[..., None]) + 2 ** (bits - 1)
        return q.clamp(0, 2**bits - 1).reshape(n, k), scale, torch.full_like(scale, 2 ** (bits - 1))

    assert "symmetric" in check_group_quantize(symmetric, right_dequantize).message

    def by_column(w, bits, group_size):  # groups of consecutive weights down each column, not along a row
        q, s, z = right_quantize(w, bits, group_size)
        cols = w.t().reshape(-1, group_size)
        lo, hi = cols.amin(-1).clamp(max=0), cols.amax(-1).clamp(min=0)
        return q, ((hi - lo) / (2**bits - 1)).reshape(s.shape), z

    assert "down the columns" in check_group_quantize(by_column, right_dequantize).message


def test_group_dequantize_wrong_gives_specific_hints():
    def no_zero(q, scale, zero, gs):
        n, k = q.shape
        return (q.float().reshape(n, k // gs, gs) * scale[..., None]).reshape(n, k)

    def zero_after(q, scale, zero, gs):
        n, k = q.shape
        return (q.float().reshape(n, k // gs, gs) * scale[..., None] - zero[..., None]).reshape(n, k)

    def uint8_wraps(q, scale, zero, gs):  # subtracts in the codes' own dtype
        n, k = q.shape
        return ((q.reshape(n, k // gs, gs) - zero[..., None].to(q.dtype)).float() * scale[..., None]).reshape(n, k)

    def flat(q, scale, zero, gs):
        return (q.float() - zero.reshape(-1)[0]) * scale.reshape(-1)[0]

    hints = {no_zero: "forgot the zero point", zero_after: "before scaling", uint8_wraps: "q.float()",
             flat: "its own"}
    for fn, hint in hints.items():
        fb = check_group_quantize(right_quantize, fn)
        assert not fb.passed and hint in fb.message, (fn.__name__, fb.message)


# --- the GPTQ column update -------------------------------------------------------------------


def right_column(W, Hinv, i, rnd):
    w = W[:, i].clone()
    q = rnd(w)
    err = (w - q) / Hinv[i, i]
    W[:, i + 1 :] -= err[:, None] * Hinv[i, i + 1 :][None, :]
    W[:, i] = q
    return W


def test_gptq_column_right_passes_and_beats_rtn():
    fb = check_gptq_column(right_column)
    assert fb.passed and fb.done, fb.message
    ratio = float(fb.message.split(" is ")[1].split("x")[0])
    assert ratio < 1  # compensation lowers the output error that rounding alone makes


def test_gptq_column_stub_is_not_done():
    def stub(W, Hinv, i, rnd):
        raise NotImplementedError

    fb = check_gptq_column(stub)
    assert not fb.passed and not fb.done


def test_gptq_column_wrong_gives_specific_hints():
    def rtn_only(W, Hinv, i, rnd):
        W[:, i] = rnd(W[:, i])
        return W

    def no_divide(W, Hinv, i, rnd):
        w = W[:, i].clone()
        W[:, i + 1 :] -= (w - rnd(w))[:, None] * Hinv[i, i + 1 :][None, :]
        W[:, i] = rnd(w)
        return W

    def plus(W, Hinv, i, rnd):
        w = W[:, i].clone()
        W[:, i + 1 :] += ((w - rnd(w)) / Hinv[i, i])[:, None] * Hinv[i, i + 1 :][None, :]
        W[:, i] = rnd(w)
        return W

    def column_of_hinv(W, Hinv, i, rnd):
        w = W[:, i].clone()
        W[:, i + 1 :] -= ((w - rnd(w)) / Hinv[i, i])[:, None] * Hinv[i + 1 :, i][None, :]
        W[:, i] = rnd(w)
        return W

    def float_left(W, Hinv, i, rnd):
        w = W[:, i].clone()
        W[:, i + 1 :] -= ((w - rnd(w)) / Hinv[i, i])[:, None] * Hinv[i, i + 1 :][None, :]
        return W

    def touches_left(W, Hinv, i, rnd):
        w = W[:, i].clone()
        err = (w - rnd(w)) / Hinv[i, i]
        W -= err[:, None] * Hinv[i][None, :]
        W[:, :i] -= 0.01
        W[:, i] = rnd(w)
        return W

    def returns_nothing(W, Hinv, i, rnd):
        right_column(W, Hinv, i, rnd)

    hints = {rtn_only: "did not change", no_divide: "divide the error by Hinv[i, i]", plus: "sign",
             column_of_hinv: "did not change", float_left: "still holds the float", touches_left: "already rounded",
             returns_nothing: "return W"}
    for fn, hint in hints.items():
        fb = check_gptq_column(fn)
        assert not fb.passed and fb.done and hint in fb.message, (fn.__name__, fb.message)


def test_gptq_column_crash_is_reported_not_raised():
    def boom(W, Hinv, i, rnd):
        raise IndexError("index 99 is out of bounds")

    fb = check_gptq_column(boom)
    assert not fb.passed and "IndexError" in fb.message

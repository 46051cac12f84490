"""The chapter 05 checks pass on the reference solutions and give specific hints on wrong ones."""

from __future__ import annotations

import math

import torch

from course_lib.exercises.ch05 import check_int4_bytes, check_sqnr, check_symmetric_per_channel


def ref_symmetric(w, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax), scale


def test_symmetric_per_channel():
    assert check_symmetric_per_channel(ref_symmetric)

    def per_tensor(w, bits):
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().max() / qmax
        return torch.clamp(torch.round(w / scale), -qmax, qmax), scale

    fb = check_symmetric_per_channel(per_tensor)
    assert not fb and "per-tensor" in fb.message

    def no_round(w, bits):
        q, s = ref_symmetric(w, bits)
        return w / s, s

    assert "round" in check_symmetric_per_channel(no_round).message

    def wrong_qmax(w, bits):
        scale = w.abs().amax(dim=1, keepdim=True) / 2**bits
        return torch.round(w / scale), scale

    assert not check_symmetric_per_channel(wrong_qmax)

    def boom(w, bits):
        raise RuntimeError("oops")

    assert "RuntimeError" in check_symmetric_per_channel(boom).message


def test_sqnr():
    def ref(x, x_hat):
        return 10 * math.log10(float((x**2).sum() / ((x - x_hat) ** 2).sum()))

    assert check_sqnr(ref)
    assert "sign" in check_sqnr(lambda x, y: -ref(x, y)).message
    assert "factor of 2" in check_sqnr(lambda x, y: ref(x, y) / 2).message
    assert "decibels" in check_sqnr(lambda x, y: float((x**2).sum() / ((x - y) ** 2).sum())).message


def test_int4_bytes():
    n, k, g = 896, 4864, 128
    assert check_int4_bytes(n * k // 2 + (k // g) * n * 2 * 2)
    assert "scale and a zero" in check_int4_bytes(n * k // 2).message
    assert "two weights" in check_int4_bytes(n * k).message
    assert "bf16" in check_int4_bytes(n * k // 2 + (k // g) * n * 8).message
    assert not check_int4_bytes(12345)

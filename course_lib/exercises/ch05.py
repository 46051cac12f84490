"""Exercises for notebook 05 (quantization): each check says what is wrong, not just "wrong"."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import Feedback, fail, ok


def _probe(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 64, generator=g)
    w[2, 5] = 9.0  # an outlier, so per-tensor and per-channel give different answers
    return w


def check_symmetric_per_channel(fn: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]) -> Feedback:
    """``fn(w, bits) -> (q, scale)``: symmetric, one scale per output row, q in [-(2^(b-1)-1), 2^(b-1)-1]."""
    from ..quantization import quantize

    w = _probe()
    for bits in (8, 4):
        try:
            q, scale = fn(w.clone(), bits)
        except Exception as e:  # the learner's code, any error is feedback
            return fail(f"your function raised {type(e).__name__}: {e}")
        ref = quantize(w, bits, symmetric=True, granularity="per_channel")
        qmax = 2 ** (bits - 1) - 1
        if not isinstance(q, torch.Tensor) or q.shape != w.shape:
            return fail(f"q should be a tensor shaped like w {tuple(w.shape)}, got {getattr(q, 'shape', type(q))}")
        if torch.is_floating_point(q) and not torch.equal(q, q.round()):
            return fail("q holds fractions: round w / scale to the nearest integer")
        if q.max() > qmax or q.min() < -qmax:
            return fail(f"at {bits} bits q must stay in [-{qmax}, {qmax}]; clamp after rounding "
                        f"(you have [{int(q.min())}, {int(q.max())}])")
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if scale.numel() == 1:
            return fail("your scale is a single number (per-tensor); per-channel needs one scale per row: "
                        "w.abs().amax(dim=1, keepdim=True) / qmax")
        if scale.numel() != w.shape[0]:
            return fail(f"expected {w.shape[0]} scales (one per output row), got {scale.numel()}: reduce over dim=1")
        if not torch.allclose(scale.reshape(-1), ref.scale.reshape(-1), rtol=1e-4):
            return fail(f"scales differ from max|w_row| / {qmax}; did you divide by 2^bits instead of 2^(bits-1)-1?")
        if not torch.equal(q.float(), ref.q.float()):
            return fail(f"at {bits} bits {int((q.float() != ref.q.float()).sum())} values differ: q = round(w / scale)")
    return ok("Correct: one scale per output channel, 0 maps to 0, the largest weight of each row to ±qmax.")


def check_sqnr(fn: Callable[[torch.Tensor, torch.Tensor], float]) -> Feedback:
    """``fn(x, x_hat) -> dB``: 10 log10(sum x^2 / sum (x - x_hat)^2)."""
    from ..quantization import fake_quantize, sqnr_db

    x = _probe(1)
    x_hat = fake_quantize(x, 4, True, "per_channel")
    try:
        got = float(fn(x, x_hat))
    except Exception as e:
        return fail(f"your function raised {type(e).__name__}: {e}")
    want = sqnr_db(x, x_hat)
    if math.isclose(got, want, rel_tol=1e-3):
        return ok(f"Correct: {got:.2f} dB. Each extra bit halves the step, so adds about 6 dB.")
    if math.isclose(got, want / 2, rel_tol=1e-3):
        return fail("off by a factor of 2: power ratios take 10·log10, you used 20·log10 of a power or "
                    "10·log10 of an amplitude")
    if math.isclose(got, -want, rel_tol=1e-3):
        return fail("sign flipped: signal power goes on top, noise power below")
    if math.isclose(got, want / 10 * math.log(10), rel_tol=1e-3) or math.isclose(got, 10 ** (want / 10), rel_tol=1e-3):
        return fail("not in decibels: take 10 * log10 of the power ratio")
    return fail(f"expected {want:.2f} dB, got {got:.2f}: signal = (x**2).sum(), noise = ((x - x_hat)**2).sum()")


def check_int4_bytes(answer: int, out_features: int = 896, in_features: int = 4864, group_size: int = 128) -> Feedback:
    """Bytes an int4 layer really stores: packed weights plus a bf16 scale and zero per group (no bias)."""
    from ..quantization import Int4WeightOnlyLinear

    lin = torch.nn.Linear(in_features, out_features, bias=False)
    layer = Int4WeightOnlyLinear.from_linear(lin, group_size, kernel="reference")
    want = sum(b.numel() * b.element_size() for b in layer.buffers())
    packed = out_features * in_features // 2
    if answer == want:
        return ok(f"Correct: {want:,} bytes, {4 * in_features * out_features / want:.1f}x smaller than fp32.")
    if answer == packed:
        return fail("you counted the packed weights only; each group also stores a scale and a zero "
                    "(bf16, 2 bytes each)")
    if answer == out_features * in_features:
        return fail("that is one byte per weight; int4 packs two weights into each byte")
    if answer == packed + out_features * in_features // group_size * 8:
        return fail("scales and zeros are stored in bf16 (2 bytes), not fp32")
    return fail(f"not quite: weights take N*K/2 = {packed:,} bytes; add (K / group_size) * N groups "
                "x 2 values x 2 bytes")

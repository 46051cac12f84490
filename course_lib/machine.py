"""Measuring this machine: the two roofline figures (memory bandwidth, compute peak) and what a GEMV gets.

:mod:`course_lib.roofline` does the arithmetic with a :class:`~course_lib.roofline.Hardware`; this module fills
one in by measuring, with the harness of :mod:`course_lib.timing`:

* the **bandwidth** with a STREAM-style streaming read (or copy / triad) of arrays far larger than any cache;
* the **compute peak** with square matmuls grown until they are compute-bound;
* apart from both, the weight bytes per second a batch-1 matrix-vector product (a decode step's own kernel)
  streams: an achieved rate, never used as a roof.

It imports roofline, never the other way: the arithmetic runs (and is tested) without timing anything.
"""

from __future__ import annotations

import torch

from ._checks import check_int, check_number
from .roofline import Hardware
from .timing import benchmark, supported_dtypes

BANDWIDTH_KINDS = ("read", "copy", "triad")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_bandwidth(size_mb: int = 256, repeat: int = 5, device: str | torch.device = "cpu",
                      kind: str = "copy") -> float:
    """Achieved memory bandwidth in GB/s, STREAM-style, over ``size_mb`` MB per array.

    ``read`` (sum(a)) only reads: size bytes moved, the pattern of a decode step,
    which streams every weight once and writes almost nothing.
    ``copy`` (b = a) reads and writes each byte: 2 x size bytes moved.
    ``triad`` (a = b + s*c) reads two arrays and writes one: 3 x size bytes.
    The arrays are far larger than any CPU cache, so this measures DRAM, not cache.
    """
    check_int("size_mb", size_mb, 1)
    check_int("repeat", repeat, 1)
    if kind not in BANDWIDTH_KINDS:
        raise ValueError(f"kind must be one of {BANDWIDTH_KINDS}, got {kind!r}")
    dev = torch.device(device)
    n = size_mb * 1024 * 1024 // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    if kind == "read":
        res = benchmark(lambda: src.sum(), warmup=2, repeat=repeat, device=dev)
        return n * 4 / res.median / 1e9
    dst = torch.empty_like(src)
    if kind == "copy":
        res = benchmark(lambda: dst.copy_(src), warmup=2, repeat=repeat, device=dev)
        return 2 * n * 4 / res.median / 1e9
    other = torch.ones_like(src)
    res = benchmark(lambda: torch.add(src, other, alpha=3.0, out=dst), warmup=2, repeat=repeat, device=dev)
    return 3 * n * 4 / res.median / 1e9


def measure_matmul_flops(n: int = 1024, dtype: torch.dtype = torch.float32, repeat: int = 5,
                         device: str | torch.device = "cpu") -> float:
    """Achieved matmul throughput in GFLOP/s for an n x n x n product (2 n^3 FLOPs)."""
    check_int("n", n, 1, " (the matrix size)")

    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    res = benchmark(lambda: a @ b, warmup=2, repeat=repeat, device=dev)
    return 2 * n**3 / res.median / 1e9


def measure_peak_flops(dtype: torch.dtype = torch.float32, max_n: int = 2048, repeat: int = 3,
                       device: str | torch.device = "cpu", min_seconds: float = 0.05) -> tuple[float, int]:
    """The compute peak: best GFLOP/s of square matmuls grown from 256 until compute-bound. Returns (GFLOP/s, n).

    An n x n product does 2 n^3 FLOPs on 3 n^2 numbers, so its FLOPs per byte grow
    with n; small ones are limited by memory and call overhead. The size doubles
    until one product takes ``min_seconds`` (or ``max_n`` is reached), so a slow
    dtype is not run at sizes that would take minutes.
    """
    check_int("max_n", max_n, 1, " (the largest matrix size tried)")
    check_int("repeat", repeat, 1)
    check_number("min_seconds", min_seconds, ">= 0 (how long one product must take)", lambda v: v >= 0)
    best, best_n, n = 0.0, 0, min(256, max_n)
    while True:
        rate = measure_matmul_flops(n, dtype, repeat=repeat, device=device)
        if rate > best:
            best, best_n = rate, n
        if n >= max_n or 2 * n**3 / (rate * 1e9) >= min_seconds:
            return best, best_n
        n = min(2 * n, max_n)


def measure_gemv_bandwidth(rows: int = 8192, cols: int = 8192, dtype: torch.dtype = torch.float32,
                           repeat: int = 5, device: str | torch.device = "cpu") -> float:
    """GB/s of weight bytes streamed by a matrix x vector product: the decode step's own pattern.

    A streaming read says what the memory *can* deliver; this says what a linear
    layer *gets* at batch 1 with this dtype's kernel. It is an achieved rate, not a
    ceiling: a kernel that converts or computes slowly falls short of the read.
    """
    check_int("rows", rows, 1)
    check_int("cols", cols, 1)

    dev = torch.device(device)
    w = torch.randn(rows, cols, device=dev).to(dtype)
    x = torch.randn(1, cols, device=dev).to(dtype)
    res = benchmark(lambda: torch.nn.functional.linear(x, w), warmup=2, repeat=repeat, device=dev)
    return w.numel() * w.element_size() / res.median / 1e9


def measure_machine(device: str | torch.device = "cpu", quick: bool = False, *, matmul_n: int | None = None,
                    stream_mb: int | None = None, gemv_shape: tuple[int, int] | None = None,
                    repeat: int | None = None) -> Hardware:
    """This machine's roofs, measured now, per supported dtype, and what a GEMV achieves.

    * ``bandwidth_gbs``: a streaming read (``measure_bandwidth(kind="read")``);
    * ``gflops``: the compute peak of each dtype, from square matmuls grown until
      they are compute-bound (:func:`measure_peak_flops`, up to ``matmul_n``);
    * ``gemv_gbs``: weight bytes per second a batch-1 linear layer streams - an
      achieved figure, never used as a peak (a GEMV does ~1 FLOP per byte: it is
      limited by memory or by its kernel, so its FLOP rate says nothing about the
      compute roof).
    The keyword sizes override the defaults (tests use tiny ones).
    """
    dev = torch.device(device)
    big = dev.type == "cuda"
    stream_mb = stream_mb or (1024 if big else (128 if quick else 512))
    matmul_n = matmul_n or (8192 if big else (2048 if quick else 4096))
    rows, cols = gemv_shape or ((16384 if big else (2048 if quick else 4096)), 8192)
    rep = repeat or (3 if quick else 5)
    bw = measure_bandwidth(size_mb=stream_mb, repeat=rep, device=dev, kind="read")
    flops, gemv, sizes = {}, {}, {}
    for name, ok in supported_dtypes(dev).items():
        if ok and name in TORCH_DTYPES:
            dt = TORCH_DTYPES[name]
            flops[name], sizes[name] = measure_peak_flops(dt, matmul_n, repeat=rep, device=dev)
            gemv[name] = measure_gemv_bandwidth(rows, cols, dt, repeat=rep, device=dev)
    label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "this CPU"
    return Hardware(f"{label} (measured)", bw, flops, "measured on this machine", gemv, dict(flops), sizes)

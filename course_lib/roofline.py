"""The roofline model of LLM inference: how fast *can* this machine go?

A decode step must read every weight once (memory-bound); a prefill step does
a lot of arithmetic per weight read (compute-bound). The time of a step is
bounded below by max(bytes / bandwidth, FLOPs / peak FLOP/s). This module
measures the two machine figures.
"""

from __future__ import annotations

import torch


def measure_bandwidth(size_mb: int = 256, repeat: int = 5, device: str | torch.device = "cpu") -> float:
    """Achieved memory bandwidth in GB/s, STREAM-style copy of ``size_mb`` MB.

    A copy reads and writes each byte, so it moves 2 x size bytes. The buffer
    is far larger than any CPU cache, so this measures DRAM, not cache.
    """
    if size_mb < 1 or repeat < 1:
        raise ValueError("size_mb and repeat must be >= 1")
    dev = torch.device(device)
    n = size_mb * 1024 * 1024 // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    from .timing import benchmark

    res = benchmark(lambda: dst.copy_(src), warmup=2, repeat=repeat, device=dev)
    return 2 * src.numel() * 4 / res.median / 1e9

def measure_matmul_flops(n: int = 1024, dtype: torch.dtype = torch.float32, repeat: int = 5,
                         device: str | torch.device = "cpu") -> float:
    """Achieved matmul throughput in GFLOP/s for an n x n x n product (2 n^3 FLOPs)."""
    from .timing import benchmark

    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    res = benchmark(lambda: a @ b, warmup=2, repeat=repeat, device=dev)
    return 2 * n**3 / res.median / 1e9


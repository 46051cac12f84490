"""What chapter 05 derives by hand: integer ranges, quantize / dequantize, fake quantization, the error, int4 packing.

Map a float tensor to ``bits``-bit integers with a scale (and, asymmetric, a zero point) per tensor, per output
channel or per group of ``group_size`` input columns; measure the error (MSE, SQNR); store two 4-bit values per
byte; round activations to int8 per token (W8A8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

GRANULARITIES = ("per_tensor", "per_channel", "per_group")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: symmetric uses [-(2^(b-1)-1), 2^(b-1)-1] so 0 sits in the middle; asymmetric [0, 2^b-1]."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8, got {bits!r}")
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass(frozen=True)
class Quantized:
    """Integers ``q`` (same shape as the input) and the parameters to map them back.

    ``scale`` and ``zero_point`` broadcast against ``q`` viewed as groups:
    shape (N, K // group_size, 1) for per_group, (N, 1) per_channel, () per_tensor.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    symmetric: bool
    granularity: str
    group_size: int | None


def _grouped(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """View ``x`` so that one scale covers the last dim (per_channel / per_group) or everything."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "per_tensor":
        return x.reshape(1, -1)
    if x.dim() != 2:
        raise ValueError(f"{granularity} needs a 2-D weight (out_features, in_features), got shape {tuple(x.shape)}")
    if granularity == "per_channel":
        return x
    if not isinstance(group_size, int) or group_size < 1 or x.shape[1] % group_size:
        raise ValueError(
            f"group_size {group_size!r} must be a positive int that divides in_features={x.shape[1]}; "
            f"for example {[g for g in (32, 64, 128, 256) if x.shape[1] % g == 0] or [x.shape[1]]}"
        )
    return x.reshape(x.shape[0], x.shape[1] // group_size, group_size)


def quantize(x: torch.Tensor, bits: int = 8, symmetric: bool = True, granularity: str = "per_channel",
             group_size: int | None = None) -> Quantized:
    """Round ``x`` to ``bits``-bit integers: ``q = clamp(round(x / scale) + zero_point)``."""
    qmin, qmax = qrange(bits, symmetric)
    g = _grouped(x.detach().float(), granularity, group_size)
    if symmetric:
        # The largest magnitude maps to qmax; zero stays exactly zero.
        scale = g.abs().amax(-1, keepdim=True) / qmax
        zero = torch.zeros_like(scale)
    else:
        # [min, max] (widened to contain 0, so 0 is exact) maps to [0, 2^b - 1].
        lo = g.amin(-1, keepdim=True).clamp(max=0)
        hi = g.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.round(-lo / scale.clamp(min=1e-12)).clamp(qmin, qmax)
    scale = scale.clamp(min=1e-12)  # an all-zero group would divide by zero
    q = torch.clamp(torch.round(g / scale) + zero, qmin, qmax)
    if granularity == "per_tensor":
        scale, zero = scale.reshape(()), zero.reshape(())
    return Quantized(q.reshape(x.shape).to(torch.int8 if symmetric else torch.uint8),
                     scale, zero, bits, symmetric, granularity, group_size)


def dequantize(qt: Quantized) -> torch.Tensor:
    """Back to float: ``x_hat = (q - zero_point) * scale``."""
    q = qt.q.float()
    if qt.granularity == "per_tensor":
        return (q - qt.zero_point) * qt.scale
    g = _grouped(q, qt.granularity, qt.group_size)
    return ((g - qt.zero_point) * qt.scale).reshape(qt.q.shape)


def fake_quantize(x: torch.Tensor, bits: int = 8, symmetric: bool = True, granularity: str = "per_channel",
                  group_size: int | None = None) -> torch.Tensor:
    """Quantize then dequantize: the float tensor the quantized model effectively uses."""
    return dequantize(quantize(x, bits, symmetric, granularity, group_size)).to(x.dtype)


@torch.no_grad()
def fake_quantize_model_(model: nn.Module, bits: int, symmetric: bool = True, granularity: str = "per_channel",
                         group_size: int | None = None) -> int:
    """Round every ``nn.Linear`` weight except the output head in place (simulated: still float storage).

    Any bit width from 2 to 8, any granularity: the tool to see *quality* vs bits
    before paying for packed layers. Returns the number of layers rounded.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    if not layers:
        raise ValueError("the model has no nn.Linear layers to quantize")
    for lin in layers:
        lin.weight.copy_(fake_quantize(lin.weight, bits, symmetric, granularity, group_size))
    return len(layers)


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error."""
    return float(((x.detach().float() - x_hat.detach().float()) ** 2).mean())


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|x|^2 / |x - x_hat|^2). ~6 dB per bit."""
    x, x_hat = x.detach().float(), x_hat.detach().float()
    noise = ((x - x_hat) ** 2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10((x.float() ** 2).sum() / noise))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in [0, 15] -> (N, K/2) uint8: column 2j in the low nibble, 2j+1 in the high."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: (N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def round_activation_groups(x: torch.Tensor, group_size: int = 32) -> torch.Tensor:
    """(rows, K) activations rounded to int8 per group of ``group_size`` inputs and scaled back, in float32: the
    numbers W4A8 multiplies (llama.cpp's Q8_0 blocks at 32). Scale d = max|x| * (1/127) per group, q = x / d
    rounded half to even: the native kernel's arithmetic, operation for operation (one multiply, one division)."""
    rows, k = x.shape
    if k % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the activations' width ({k})")
    xg = x.detach().float().reshape(rows, k // group_size, group_size)
    d = xg.abs().amax(-1, keepdim=True) * (1.0 / 127)
    q = torch.where(d > 0, torch.round(xg / torch.where(d > 0, d, torch.ones_like(d))), torch.zeros_like(xg))
    return (q * d).reshape(rows, k)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) symmetric int8: ``x ~ q * scale`` with one fp32 scale per row of (rows, K) ``x``."""
    scale = (x.detach().float().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
    q = torch.clamp(torch.round(x.float() / scale), -127, 127).to(torch.int8)
    return q, scale

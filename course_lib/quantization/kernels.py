"""The integer kernels the packed layers can call, and the byte layouts and alignment each one needs.

* ``torch._weight_int8pack_mm`` (int8 weights, CPU): only on widths and pointers proven safe (it can crash the
  process otherwise, which no ``try`` catches).
* ``aten._weight_int4pack_mm_for_cpu`` / ``aten._weight_int4pack_mm`` (int4, CPU / CUDA): each reads its own tiled
  byte layout, which depends on the CPU's ISA; :func:`cpu_int4_layout` and :func:`cuda_int4_layout` find where each
  nibble lands, so a kernel-packed weight can always be read back (and saved) in the portable
  :func:`~course_lib.quantization.primitives.pack_int4` form.
* ``torch._int_mm`` (int8 x int8 -> int32, W8A8), padded where CUDA wants more rows.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

INT4_MID = 8  # the int4 layer computes (q - 8) * scale + offset, as the aten int4 kernels do
INT4_CPU = "aten._weight_int4pack_mm_for_cpu"
INT4_CUDA = "aten._weight_int4pack_mm"  # the tensor-core kernel (tinygemm); bf16 activations, sm80 or newer
# Measured on torch 2.13 CPU with bf16 activations: _weight_int8pack_mm segfaults or returns inf / garbage whenever
# in_features % 16 == 8 and passes every case with in_features % 16 == 0 (docs/quantization.md, "the int8 kernel's
# alignment"). The cause is alignment: the kernel's vector loads want every int8 weight row on a 16-byte boundary
# and every activation row on a 32-byte one; K % 16 == 0 gives aligned rows and the forward pass checks the two
# base pointers. A crash can't be caught, so only widths in the passing family are ever offered as a candidate.
INT8_KERNEL_K_MULTIPLE = 16
INT8_KERNEL_ALIGN = (16, 32)  # bytes: weight rows, activation rows
INT8PACK = "aten._weight_int8pack_mm"
INT_MM = "torch._int_mm"  # int8 x int8 -> int32 (W8A8)
REFERENCE = "reference"  # dequantize (unpack, scale) + F.linear in the compute dtype, every call
FLOAT = "F.linear (float copy)"  # the float layer it replaced: dequantized once, held in float
KERNEL_REQUESTS = ("auto", "packed", "reference", "stream")  # "stream": packed + .streaming's kernels
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# Cached per layer shape: the probe and saving read every int4 layer's layout, which takes seconds for a big
# layer, and a model has a handful of shapes (docs/quantization.md, "int4 layouts").
@functools.lru_cache(maxsize=16)
def cpu_int4_layout(n: int, k: int) -> torch.Tensor:
    """Where each of the N*K nibbles lands in the aten CPU int4 layout (it depends on the CPU's ISA).

    Packing an index pattern, one hex digit at a time, reveals the permutation,
    so a kernel-packed weight can be saved in the portable ``pack_int4`` form.
    """
    idx = torch.arange(n * k, dtype=torch.int64).reshape(n, k)
    where = torch.zeros(n * k, dtype=torch.int64)
    digits = max(1, math.ceil(math.log(n * k, 16)))
    for d in range(digits):
        probe = ((idx >> (4 * d)) & 0xF).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).reshape(-1)
        nib = torch.stack([packed & 0xF, packed >> 4], -1).reshape(-1).to(torch.int64)
        where |= nib << (4 * d)
    return where  # nibble position p holds element where[p] of the row-major (N, K) matrix


def _inner_k_tiles(k: int) -> int:
    """The CUDA int4 layout tiles K by ``inner_k_tiles * 16``: the largest of 8, 4, 2 that divides ``in_features``."""
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise RuntimeError(f"the CUDA int4 kernel needs in_features % 32 == 0, got {k}")


def cuda_int4pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int4 values on a GPU -> the CUDA kernel's int32 tiled layout.

    Its input is uint8 with column 2j in the *high* nibble and 2j+1 in the low one (the opposite of
    ``pack_int4``, which follows the CPU kernel).
    """
    q = q.to(torch.int32)
    u8 = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(u8, _inner_k_tiles(q.shape[1]))


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit value of a packed tensor, low nibble first, in memory order (int32 words read as bytes)."""
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([b & 0xF, b >> 4], -1).reshape(-1)


@functools.lru_cache(maxsize=8)
def cuda_int4_layout(n: int, k: int, device: torch.device) -> torch.Tensor:
    """Where each of the N*K nibbles lands in the CUDA int4 layout, found like :func:`cpu_int4_layout`."""
    idx = torch.arange(n * k, dtype=torch.int64, device=device).reshape(n, k)
    where = torch.zeros(n * k, dtype=torch.int64, device=device)
    for d in range(max(1, math.ceil(math.log(n * k, 16)))):
        where |= nibbles(cuda_int4pack((idx >> (4 * d)) & 0xF)).to(torch.int64) << (4 * d)
    return where


def _misaligned(t: torch.Tensor, boundary: int) -> bool:
    # torch.compile traces without real pointers (and its own buffers are aligned): check in eager mode only
    return not torch.compiler.is_compiling() and t.data_ptr() % boundary != 0


def _aligned(x: torch.Tensor) -> torch.Tensor:
    return x.clone() if _misaligned(x, INT8_KERNEL_ALIGN[1]) else x  # a fresh tensor is 64-byte aligned


def int8pack_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if _misaligned(w, INT8_KERNEL_ALIGN[0]):  # only a weight someone swapped in by hand: never call the kernel
        return F.linear(x, w.to(x.dtype)) * scales
    return torch._weight_int8pack_mm(_aligned(x), w, scales)


def int_mm_padded(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(xq, w.T)`` (int32); on CUDA it needs more than 16 rows in multiples of 8: pad with zeros."""
    rows = xq.shape[0]
    if xq.device.type == "cuda" and (rows <= 16 or rows % 8):
        padded = max(32, -(-rows // 8) * 8)
        xq = torch.cat([xq, xq.new_zeros(padded - rows, xq.shape[1])])
        return torch._int_mm(xq, w.t())[:rows]
    return torch._int_mm(xq, w.t())

"""Quantization: primitives, packed int8 / int4 / W8A8 layers, GPTQ, AWQ and SmoothQuant.

Decode reads every weight once per token, so it is limited by memory bandwidth:
store the weights in fewer bytes and each token gets cheaper. This module has
four layers of the same idea.

1. **Primitives** a learner derives by hand: map a float tensor to ``bits``-bit
   integers with a scale (and, asymmetric, a zero point) per tensor, per
   output channel or per group of ``group_size`` input columns; measure the
   error (MSE, SQNR).
2. **Packed layers** that really store the integers - int8 in one byte each,
   int4 two per byte - and W8A8 (int8 weights times int8 activations rounded
   per token at run time, ``torch._int_mm``). Which kernel runs is *measured*
   on this machine, once per layer shape (``course_lib.kernel_choice``): the
   integer kernels (``torch._weight_int8pack_mm``,
   ``aten._weight_int4pack_mm_for_cpu``) in each compute dtype, and the
   reference path (unpack, dequantize, ``F.linear``); each is checked against
   the dequantized weights first, and the fastest correct one is kept in
   ``layer.kernel`` / ``layer.compute_dtype`` (``layer.choice`` has every
   candidate's time). ``kernel="auto"`` adds the float layer it replaced as a
   candidate, so no layer ends up slower than it was.
3. **GPTQ** (Frantar et al., 2022), *error-compensating*: round-to-nearest
   (RTN) rounds every weight on its own; GPTQ rounds one input column at a time
   and pushes the rounding error onto the columns not yet rounded, weighted by
   how the calibration activations correlate (the Hessian ``X^T X``). It
   changes only the Linear weights and works at 4 bits, where RTN hurts most.
4. **Activation-aware scaling**: a few input channels carry much larger
   activations than the rest, and their weights matter most. **AWQ** (Lin et
   al., 2023; int4) multiplies each input channel's weights by
   ``s = mean|x|^alpha`` (alpha searched on a grid to minimize the layer's
   output error on calibration data) before rounding and divides the input by
   ``s``; **SmoothQuant** (Xiao et al., 2022; W8A8) moves activation outliers
   into the weights with ``s = max|x|^a / max|w|^(1-a)``. The ``1/s`` is folded
   into the preceding RMSNorm where the input comes straight from one, else
   kept as the layer's ``input_scale``.

``quantize_(model, QuantConfig(...))`` replaces ``nn.Linear`` layers (and GPT-2's ``Conv1D``, a Linear with its
weight stored transposed) in place. ``model.save_pretrained(folder)`` then stores the packed tensors and
``course_lib.load_model(folder)`` rebuilds them (see "saving and loading" below).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from . import kernel_choice
from ._checks import check_flag, check_int, check_number
from ._files import move_files_into, replace_folder, writing_folder
from .kernel_choice import Candidate

log = logging.getLogger(__name__)

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the aten int4 kernel takes
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ACTIVATIONS = ("none", "int8")  # "int8": W8A8, the activations rounded per token at run time
METHODS = ("rtn", "gptq", "awq")
AWQ_ALPHAS = tuple(i / 10 for i in range(11))  # the grid AWQ searches for its scale exponent
INT4_MID = 8  # the int4 layer computes (q - 8) * scale + offset, as the aten int4 kernels do


# --- 1. primitives ----------------------------------------------------------------


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


# --- 2. packed layers -----------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in [0, 15] -> (N, K/2) uint8: column 2j in the low nibble, 2j+1 in the high."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: (N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


# Cached per layer shape: the probe and saving read every int4 layer's layout, and computing it takes 12 s for
# 8192 x 2048 on 2 cores. A model has a handful of shapes (SmolLM2-135M: 4, 18 MB of cache).
@functools.lru_cache(maxsize=16)
def _cpu_int4_layout(n: int, k: int) -> torch.Tensor:
    """Where each of the N*K nibbles lands in the aten CPU int4 layout (it depends on the CPU's ISA).

    Packing an index pattern, one hex digit at a time, reveals the permutation,
    so a kernel-packed weight can be saved in the portable :func:`pack_int4` form.
    """
    idx = torch.arange(n * k, dtype=torch.int64).reshape(n, k)
    where = torch.zeros(n * k, dtype=torch.int64)
    digits = max(1, math.ceil(math.log(n * k, 16)))
    for d in range(digits):
        probe = ((idx >> (4 * d)) & 0xF).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).reshape(-1)
        nibbles = torch.stack([packed & 0xF, packed >> 4], -1).reshape(-1).to(torch.int64)
        where |= nibbles << (4 * d)
    return where  # nibble position p holds element where[p] of the row-major (N, K) matrix


INT4_CPU = "aten._weight_int4pack_mm_for_cpu"
INT4_CUDA = "aten._weight_int4pack_mm"  # the tensor-core kernel (tinygemm); bf16 activations, sm80 or newer


def _inner_k_tiles(k: int) -> int:
    """The CUDA int4 layout tiles K by ``inner_k_tiles * 16``: the largest of 8, 4, 2 that divides ``in_features``."""
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise RuntimeError(f"the CUDA int4 kernel needs in_features % 32 == 0, got {k}")


def _cuda_int4pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int4 values on a GPU -> the CUDA kernel's int32 tiled layout.

    Its input is uint8 with column 2j in the *high* nibble and 2j+1 in the low one (the opposite of
    :func:`pack_int4`, which follows the CPU kernel).
    """
    q = q.to(torch.int32)
    u8 = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(u8, _inner_k_tiles(q.shape[1]))


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit value of a packed tensor, low nibble first, in memory order (int32 words read as bytes)."""
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([b & 0xF, b >> 4], -1).reshape(-1)


@functools.lru_cache(maxsize=8)
def _cuda_int4_layout(n: int, k: int, device: torch.device) -> torch.Tensor:
    """Where each of the N*K nibbles lands in the CUDA int4 layout, found like :func:`_cpu_int4_layout`."""
    idx = torch.arange(n * k, dtype=torch.int64, device=device).reshape(n, k)
    where = torch.zeros(n * k, dtype=torch.int64, device=device)
    for d in range(max(1, math.ceil(math.log(n * k, 16)))):
        where |= _nibbles(_cuda_int4pack((idx >> (4 * d)) & 0xF)).to(torch.int64) << (4 * d)
    return where



# --- which kernel runs: candidates measured on this machine (course_lib.kernel_choice) ----------------------
# Measured on torch 2.13 CPU (AVX-512 with bf16), each case in its own process, K = 8..1192 step 8 (and some
# larger widths), N in {16, 48}, 1..33 rows: with bf16 activations _weight_int8pack_mm segfaults or returns inf /
# garbage whenever in_features % 16 == 8 and passes every case with in_features % 16 == 0; K % 8 != 0 is worse.
# The cause is alignment: the kernel's vector loads want every int8 weight row on a 16-byte boundary and every
# activation row on a 32-byte one (a weight at an 8-byte offset, or bf16 activations at a 16-byte offset, crash
# even with K = 256). K % 16 == 0 gives aligned rows; the forward pass checks the two base pointers.
# A crash can't be caught, so only widths in the passing family are ever offered as a candidate.
INT8_KERNEL_K_MULTIPLE = 16
INT8_KERNEL_ALIGN = (16, 32)  # bytes: weight rows, activation rows
INT8PACK = "aten._weight_int8pack_mm"
INT_MM = "torch._int_mm"  # int8 x int8 -> int32 (W8A8)
REFERENCE = "reference"  # dequantize (unpack, scale) + F.linear in the compute dtype, every call
FLOAT = "F.linear (float copy)"  # the float layer it replaced: dequantized once, held in float
KERNEL_REQUESTS = ("auto", "packed", "reference")
AUTO_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what compute_dtype="auto" measures
TORCH_OPS_ROWS = (1, 7)  # probe rows for paths made of ordinary torch ops (no row tiling of their own)
REF_ROWS = 64  # output channels the correctness reference covers (no float copy of a vocabulary-sized head)


def _misaligned(t: torch.Tensor, boundary: int) -> bool:
    # torch.compile traces without real pointers (and its own buffers are aligned): check in eager mode only
    return not torch.compiler.is_compiling() and t.data_ptr() % boundary != 0


def _aligned(x: torch.Tensor) -> torch.Tensor:
    return x.clone() if _misaligned(x, INT8_KERNEL_ALIGN[1]) else x  # a fresh tensor is 64-byte aligned


def _int8pack_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if _misaligned(w, INT8_KERNEL_ALIGN[0]):  # only a weight someone swapped in by hand: never call the kernel
        return F.linear(x, w.to(x.dtype)) * scales
    return torch._weight_int8pack_mm(_aligned(x), w, scales)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


class _PackedLinear(nn.Module):
    """What the packed layers share: the kernel request, the measured choice, an optional input scale.

    ``kernel``: "auto" measures every candidate kernel and compute dtype (the float layer it replaced
    included, so the layer is never slower than that layer was here); "packed" measures only the candidates
    that keep the integers (memory stays small, whatever the speed); "reference" always dequantizes +
    ``F.linear``. ``compute_dtype``: the activations' dtype for the kernel, or "auto" (measured).
    ``input_scale`` (AWQ / SmoothQuant, when no norm could absorb it): the input is multiplied by it first.
    """

    out_features: int
    in_features: int
    _CAST_SOURCE = "scales"  # a buffer that tells the layer's device
    _KERNELS: tuple[str, ...] = ()  # kernels a request may name (it then runs where safe, else the reference)

    def _init_choice(self, kernel: str, compute_dtype, float_dtype: torch.dtype | None,
                     input_scale: torch.Tensor | None) -> None:
        allowed = KERNEL_REQUESTS + self._KERNELS
        if kernel not in allowed:
            raise ValueError(f"kernel must be one of {allowed}, got {kernel!r}")
        if not (compute_dtype == "auto" or compute_dtype in AUTO_DTYPES):
            raise ValueError(f"compute_dtype must be 'auto' or one of {AUTO_DTYPES}, got {compute_dtype!r}")
        self.kernel_request = kernel
        self.compute_request = compute_dtype
        self.float_dtype = float_dtype or (compute_dtype if compute_dtype != "auto" else torch.float32)
        self.register_buffer("input_scale", None if input_scale is None
                             else input_scale.detach().float().reshape(-1).contiguous())
        self.register_buffer("weight_float", None, persistent=False)
        self.choice = None
        self._select()

    # what each layer type defines
    def _candidates(self, device: torch.device) -> list[Candidate]:
        raise NotImplementedError

    def _reference(self, device: torch.device):
        raise NotImplementedError

    def _apply_choice(self, cand: Candidate) -> None:
        """Make ``cand`` the path ``forward`` takes (repack, float copy, compute-dtype scales)."""
        raise NotImplementedError

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _device(self) -> torch.device:
        return getattr(self, self._CAST_SOURCE).device

    def _dtypes(self) -> tuple[torch.dtype, ...]:
        if self.compute_request != "auto":
            return (self.compute_request,)
        if self._device().type == "cuda":
            return (torch.bfloat16, torch.float16)  # fp32 matmuls are the slow path on every GPU we target
        return AUTO_DTYPES

    def _key(self) -> tuple:
        d = self._device()
        return (type(self).__name__, self.out_features, self.in_features, getattr(self, "group_size", None),
                self.kernel_request, str(self.compute_request), self.float_dtype, d.type, d.index)

    def _float_candidate(self) -> Candidate:
        store = self._float_store = {}

        def prepare():
            store["w"] = self.dequantized_weight().to(self.float_dtype)

        return Candidate(FLOAT, FLOAT, self.float_dtype, lambda x: F.linear(x, store["w"]), preferred=False,
                         prepare=prepare, probe_rows=TORCH_OPS_ROWS)

    def _select(self) -> None:
        """Measure (or take the cached choice for this shape), check it on this layer's weights, apply it."""
        self.weight_float = None
        self._float_store = {}
        device = self._device()
        cands = self._candidates(device)
        fallback = next(c for c in cands if c.kernel == REFERENCE)  # every layer type offers one
        if self.kernel_request == "auto":
            cands.append(self._float_candidate())
        elif self.kernel_request not in ("packed", REFERENCE):  # one named kernel, where it is safe and correct
            cands = [c for c in cands if c.kernel == self.kernel_request] or [fallback]
        probes = kernel_choice.Probes(self._reference(device), self.in_features, device)
        names = {c.name: c for c in cands}
        try:
            fresh = self._key() not in kernel_choice.kernel_choices()
            choice = kernel_choice.choose(self._key(), cands, probes, self.in_features, device)
            cand = names[choice.name]
            # cached from a layer of the same shape: check this one's weights too (a kernel can be wrong silently)
            why = None if fresh else kernel_choice.check(cand, probes, 0.05)
            if why is not None:
                raise RuntimeError(why)
        except RuntimeError as e:
            log.info("%d x %d layer: %s; using the reference path", self.out_features, self.in_features,
                     str(e).splitlines()[0][:200])
            cand = fallback
            choice = kernel_choice.Choice(cand.name, REFERENCE, cand.dtype, {}, {"error": str(e)[:200]})
        self.choice = choice
        self.compute_dtype = cand.dtype
        self._apply_choice(cand)
        self.kernel = cand.kernel
        if cand.kernel == FLOAT:
            if "w" not in self._float_store:
                cand.prepare()
            self.weight_float = self._float_store["w"]
        self._float_store = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            x2 = x2 * self.input_scale.to(x2.dtype)
        y = self._matmul(x2.to(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._after_load()

    def _after_load(self) -> None:
        if self.kernel == FLOAT:
            self.weight_float = self.dequantized_weight().to(self.float_dtype)

    def _apply(self, fn, recurse=True):
        """``model.half()`` / ``.float()`` / ``.to(dtype)`` / ``.to(device)`` reach a packed layer through its buffers.

        The integers stay; the scales (and bias) take the new dtype, the compute dtype is pinned to it (the user
        asked for that dtype) and the kernel is chosen again, since a kernel that is safe and fast in one dtype
        or on one device need not be on another. Each device's int4 kernel has its own byte layout, so the
        integers go over in the portable layout and are repacked for the kernel chosen there.
        """
        src = getattr(self, self._CAST_SOURCE)
        probe = fn(torch.empty(0, dtype=self.float_dtype, device=src.device))
        changed = probe.dtype != self.float_dtype or probe.device != src.device
        if changed:
            self._to_portable()
            self.weight_float = None  # rebuilt by the new choice; no point casting or moving it
        super()._apply(fn, recurse)
        if changed:
            log.info("%d x %d layer: %s %s -> %s %s", self.out_features, self.in_features, self.float_dtype,
                     src.device, probe.dtype, probe.device)
            if probe.dtype != self.float_dtype:
                self.compute_request = probe.dtype
                self.float_dtype = probe.dtype
            self._after_cast()
            self._select()
        return self

    def _to_portable(self) -> None:
        pass

    def _after_cast(self) -> None:
        pass

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if hasattr(self, "group_size") else ""
        s = ", input_scale" if self.input_scale is not None else ""
        return (f"in={self.in_features}, out={self.out_features}{g}, kernel={self.kernel}, "
                f"compute={_dtype_name(self.compute_dtype)}{s}")


def _scale_dtype(compute_dtype) -> torch.dtype:
    """The dtype a new layer stores its scales (and int4 offsets) in: the compute dtype, bf16 for "auto"."""
    return torch.bfloat16 if compute_dtype == "auto" else compute_dtype


def _fresh_scales(t: torch.Tensor, compute_dtype) -> torch.Tensor:
    """Scales just computed (fp32) as a new layer stores them: in the compute dtype, bf16 for "auto" (as the
    fixed default always did); a kernel chosen in another dtype then stores them in its own (no second copy)."""
    return t.to(_scale_dtype(compute_dtype))


class Int8WeightOnlyLinear(_PackedLinear):
    """y = x @ (q * scale)^T + b with int8 ``q`` (one byte per weight) and a scale per output channel."""

    _KERNELS = (INT8PACK,)

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype | str = "auto", kernel: str = "packed",
                 float_dtype: torch.dtype | None = None, input_scale: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        q = q.to(torch.int8).contiguous()
        if q.data_ptr() % 64:  # e.g. a tensor read from a safetensors file: the kernel needs aligned rows
            q = q.clone()
        self.register_buffer("weight_int8", q)
        # "auto" keeps the dtype given (a file's scales load exactly as saved); a fixed compute dtype casts
        self.register_buffer("scales", scale.reshape(-1).to(scale.dtype if compute_dtype == "auto"
                                                            else compute_dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._init_choice(kernel, compute_dtype, float_dtype, input_scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | str = "auto",
                    kernel: str = "packed") -> Int8WeightOnlyLinear:
        """Round-to-nearest, symmetric, per output channel."""
        qt = quantize(linear.weight, 8, symmetric=True, granularity="per_channel")
        return cls(qt.q, _fresh_scales(qt.scale, compute_dtype), linear.bias, compute_dtype, kernel,
                   float_dtype=linear.weight.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]

    def _reference(self, device):
        w = self.weight_int8[:REF_ROWS].float() * self.scales[:REF_ROWS, None].float()
        return lambda x: x.float() @ w.T

    def _candidates(self, device):
        w, out = self.weight_int8, []
        # the int8 kernel: CPU only (no CUDA int8 weight-only kernel to call), and only on widths proven safe
        safe = device.type == "cpu" and self.in_features % INT8_KERNEL_K_MULTIPLE == 0
        if device.type == "cpu" and not safe:
            log.info("%d x %d layer: %s is only proven safe for in_features %% %d == 0 (it crashes the process "
                     "on some other widths); not a candidate", self.out_features, self.in_features, INT8PACK,
                     INT8_KERNEL_K_MULTIPLE)
        for dt in self._dtypes():
            s = self.scales.to(dt)
            if safe and self.kernel_request != REFERENCE:
                out.append(Candidate(f"{INT8PACK} {_dtype_name(dt)}", INT8PACK, dt,
                                     lambda x, s=s: _int8pack_mm(x, w, s)))
            # dequantize + F.linear; under torch.compile the int8 -> float conversion fuses into the matmul
            out.append(Candidate(f"{REFERENCE} {_dtype_name(dt)}", REFERENCE, dt,
                                 lambda x, s=s, dt=dt: F.linear(x, w.to(dt)) * s, probe_rows=TORCH_OPS_ROWS))
        return out

    def _apply_choice(self, cand):
        if cand.kernel == INT8PACK and self.scales.dtype != cand.dtype:
            self.scales = self.scales.to(cand.dtype)  # the kernel reads them in its dtype: stored so, no copy

    def _matmul(self, x2):
        if self.kernel == FLOAT:
            return F.linear(x2, self.weight_float)
        if self.kernel == INT8PACK:
            return _int8pack_mm(x2, self.weight_int8, self.scales)
        return F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scales.to(x2.dtype)


class Int4WeightOnlyLinear(_PackedLinear):
    """Two 4-bit weights per byte; per group of ``group_size`` inputs a scale and a zero.

    The dequantized weight is ``(q - 8) * scale + zero`` (the aten kernel's
    convention), stored as ``scales_and_zeros`` of shape (K / group_size, N, 2).
    With the aten kernel the bytes are in its own CPU-specific tiled layout;
    the state dict always holds the portable :func:`pack_int4` layout.
    """

    _CAST_SOURCE = "scales_and_zeros"
    _KERNELS = (INT4_CPU, INT4_CUDA)

    def __init__(self, q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype | str = "auto", kernel: str = "packed",
                 float_dtype: torch.dtype | None = None, input_scale: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.kernel = REFERENCE  # the bytes below are portable until a kernel layout is chosen
        self.register_buffer("weight_packed", pack_int4(q))
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(
            scales_and_zeros.dtype if compute_dtype == "auto" else compute_dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._init_choice(kernel, compute_dtype, float_dtype, input_scale)

    @classmethod
    def from_quantized(cls, qt: Quantized, bias: torch.Tensor | None, compute_dtype: torch.dtype | str = "auto",
                       kernel: str = "packed", float_dtype: torch.dtype | None = None,
                       input_scale: torch.Tensor | None = None) -> Int4WeightOnlyLinear:
        """From an asymmetric 4-bit per-group :class:`Quantized` (integer zero points)."""
        if qt.bits != 4 or qt.symmetric or qt.granularity != "per_group":
            raise ValueError("Int4WeightOnlyLinear needs quantize(w, bits=4, symmetric=False, granularity='per_group')")
        scale = qt.scale.squeeze(-1)  # (N, K/g)
        # (q - zp) * s == (q - 8) * s + (8 - zp) * s
        zero = (INT4_MID - qt.zero_point.squeeze(-1)) * scale
        sz = torch.stack([scale, zero], -1).transpose(0, 1)  # (K/g, N, 2)
        return cls(qt.q, _fresh_scales(sz, compute_dtype), qt.group_size, bias, compute_dtype, kernel, float_dtype,
                   input_scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, compute_dtype: torch.dtype | str = "auto",
                    kernel: str = "packed") -> Int4WeightOnlyLinear:
        """Round-to-nearest, asymmetric, per group."""
        qt = quantize(linear.weight, 4, symmetric=False, granularity="per_group", group_size=group_size)
        return cls.from_quantized(qt, linear.bias, compute_dtype, kernel, float_dtype=linear.weight.dtype)

    def _kernel_layout(self, q: torch.Tensor, kernel: str) -> torch.Tensor:
        """(N, K) integers -> the bytes ``kernel`` reads."""
        if kernel == INT4_CUDA:
            return _cuda_int4pack(q)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)

    def _in_kernel_layout(self) -> bool:
        return self.kernel in (INT4_CPU, INT4_CUDA)

    def int_weight(self) -> torch.Tensor:
        """The (N, K) integers in [0, 15], whatever layout the bytes are in."""
        if not self._in_kernel_layout():
            return unpack_int4(self.weight_packed)
        if self.kernel == INT4_CUDA:
            where = _cuda_int4_layout(self.out_features, self.in_features, self.weight_packed.device)
            q = torch.empty(self.out_features * self.in_features, dtype=torch.uint8, device=where.device)
            q[where] = _nibbles(self.weight_packed)
            return q.reshape(self.out_features, self.in_features)
        where = _cpu_int4_layout(self.out_features, self.in_features)
        nib = torch.stack([self.weight_packed & 0xF, self.weight_packed >> 4], -1).reshape(-1)
        q = torch.empty(self.out_features * self.in_features, dtype=torch.uint8)
        q[where] = nib
        return q.reshape(self.out_features, self.in_features)

    def _dequant(self, q: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        n = q.shape[0]
        q = q.float().reshape(n, -1, self.group_size)
        sz = sz.float().transpose(0, 1)  # (N, K/g, 2)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(n, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self._dequant(self.int_weight(), self.scales_and_zeros)

    def _reference(self, device):
        # from the portable bytes (the layout during a choice): the first rows only, whatever the layer's size
        w = self._dequant(unpack_int4(self.weight_packed[:REF_ROWS]), self.scales_and_zeros[:, :REF_ROWS])
        return lambda x: x.float() @ w.T

    def _candidates(self, device):
        out, store = [], {}
        portable, g = self.weight_packed, self.group_size
        fast = INT4_CUDA if device.type == "cuda" else INT4_CPU if device.type == "cpu" else None

        def prepare():
            if "kp" not in store:  # refuses N not a multiple of 16, for example
                store["kp"] = self._kernel_layout(unpack_int4(portable).to(torch.int32), fast)

        for dt in self._dtypes():
            sz = self.scales_and_zeros.to(dt)
            if fast is not None and self.kernel_request != REFERENCE and (fast == INT4_CPU or dt == torch.bfloat16):
                op = torch.ops.aten._weight_int4pack_mm if fast == INT4_CUDA else \
                    torch.ops.aten._weight_int4pack_mm_for_cpu
                out.append(Candidate(f"{fast} {_dtype_name(dt)}", fast, dt,
                                     lambda x, sz=sz, op=op: op(x, store["kp"], g, sz), prepare=prepare))
            out.append(Candidate(f"{REFERENCE} {_dtype_name(dt)}", REFERENCE, dt,
                                 lambda x, sz=sz: F.linear(x, self._dequant(unpack_int4(portable), sz).to(x.dtype)),
                                 probe_rows=TORCH_OPS_ROWS))
        self._store = store
        return out

    def _apply_choice(self, cand):
        if cand.kernel in (INT4_CPU, INT4_CUDA):
            if "kp" not in self._store:
                cand.prepare()
            self.weight_packed = self._store["kp"]
            if self.scales_and_zeros.dtype != cand.dtype:  # the kernel reads them in its dtype: stored so
                self.scales_and_zeros = self.scales_and_zeros.to(cand.dtype)
        self._store = {}

    def _to_portable(self) -> None:
        if self._in_kernel_layout():
            self.weight_packed = pack_int4(self.int_weight())  # read the kernel's layout while it still matches
            self.kernel = REFERENCE

    def _matmul(self, x2):
        if self.kernel == FLOAT:
            return F.linear(x2, self.weight_float)
        sz = self.scales_and_zeros
        if self.kernel == INT4_CUDA:
            return torch.ops.aten._weight_int4pack_mm(x2, self.weight_packed, self.group_size, sz)
        if self.kernel == INT4_CPU:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_packed, self.group_size, sz)
        return F.linear(x2, self._dequant(unpack_int4(self.weight_packed), sz).to(x2.dtype))

    # The state dict holds the portable layout, so a file saved on an AVX-512
    # machine loads on an AVX2 one (the kernel's tiling differs between them).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._in_kernel_layout():
            destination[prefix + "weight_packed"] = pack_int4(self.int_weight())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight_packed"
        if key in state_dict and self._in_kernel_layout():
            q = unpack_int4(state_dict[key]).to(torch.int32).to(self.weight_packed.device)
            state_dict = dict(state_dict)
            state_dict[key] = self._kernel_layout(q, self.kernel)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) symmetric int8: ``x ~ q * scale`` with one fp32 scale per row of (rows, K) ``x``."""
    scale = (x.detach().float().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
    q = torch.clamp(torch.round(x.float() / scale), -127, 127).to(torch.int8)
    return q, scale


def _int_mm_padded(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(xq, w.T)`` (int32); on CUDA it needs more than 16 rows in multiples of 8: pad with zeros."""
    rows = xq.shape[0]
    if xq.device.type == "cuda" and (rows <= 16 or rows % 8):
        padded = max(32, -(-rows // 8) * 8)
        xq = torch.cat([xq, xq.new_zeros(padded - rows, xq.shape[1])])
        return torch._int_mm(xq, w.t())[:rows]
    return torch._int_mm(xq, w.t())


class Int8DynamicLinear(_PackedLinear):
    """W8A8: int8 weights (a scale per output channel) times int8 activations (a scale per token, found at run time).

    y = (q_x @ q_w^T) * s_x * s_w + b, the product accumulated in int32 (``torch._int_mm``). Rounding the
    activations too is what lets integer arithmetic do the work; its error is the activations' outliers'
    doing, which smoothing (``input_scale``, SmoothQuant) moves into the weights.
    """

    _KERNELS = (INT_MM,)

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype | str = "auto", kernel: str = "packed",
                 float_dtype: torch.dtype | None = None, input_scale: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.to(torch.int8).contiguous())
        self.register_buffer("scales", scale.reshape(-1).float().contiguous())  # fp32: the rescale is exact-ish
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._init_choice(kernel, compute_dtype, float_dtype, input_scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | str = "auto", kernel: str = "packed",
                    input_scale: torch.Tensor | None = None) -> Int8DynamicLinear:
        """Round-to-nearest, symmetric, per output channel (the weight as given: smoothing is applied before)."""
        qt = quantize(linear.weight, 8, symmetric=True, granularity="per_channel")
        return cls(qt.q, qt.scale, linear.bias, compute_dtype, kernel, linear.weight.dtype, input_scale)

    def _after_cast(self) -> None:
        self.scales = self.scales.float()  # fp32 whatever the model's dtype: the rescale is cheap, keep it exact

    def _device(self):
        return self.weight_int8.device

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]

    def _reference(self, device):
        w = self.weight_int8[:REF_ROWS].float() * self.scales[:REF_ROWS, None]

        def ref(x):
            q, s = quantize_activations(x)
            return (q.float() * s) @ w.T
        return ref

    def _candidates(self, device):
        w, ws, out = self.weight_int8, self.scales, []

        def int_mm(x):
            q, s = quantize_activations(x)
            return _int_mm_padded(q, w).float() * s * ws

        cuda_ok = device.type != "cuda" or (self.in_features % 8 == 0 and self.out_features % 8 == 0)
        if self.kernel_request != REFERENCE and cuda_ok:
            out.append(Candidate(INT_MM, INT_MM, torch.float32, int_mm))
        # fp16 is no candidate: sums of int8 products overflow its range (65504) at any useful width
        for dt in [d for d in self._dtypes() if d != torch.float16] or [torch.float32]:
            def deq(x, dt=dt):  # the same integers through a float matmul (exact in bf16: |q| <= 127)
                q, s = quantize_activations(x)
                return F.linear(q.to(dt), w.to(dt)).float() * s * ws
            out.append(Candidate(f"{REFERENCE} {_dtype_name(dt)}", REFERENCE, dt, deq, probe_rows=TORCH_OPS_ROWS))
        return out

    def _apply_choice(self, cand):
        pass

    def _matmul(self, x2):
        if self.kernel == FLOAT:
            return F.linear(x2, self.weight_float)
        q, s = quantize_activations(x2)
        if self.kernel == INT_MM:
            return _int_mm_padded(q, self.weight_int8).float() * s * self.scales
        dt = torch.float32 if self.compute_dtype == torch.float16 else self.compute_dtype
        return F.linear(q.to(dt), self.weight_int8.to(dt)).float() * s * self.scales


PACKED_LINEARS = (Int8WeightOnlyLinear, Int4WeightOnlyLinear, Int8DynamicLinear)


class Int8Embedding(nn.Module):
    """Embedding lookup from int8 rows with a scale per row; can share storage with an int8 lm_head."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.out_dtype = out_dtype
        # Same tensor objects as the lm_head's when tied: stored once, counted once.
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_int8).to(self.out_dtype)
        return rows * self.scales[ids].to(self.out_dtype).unsqueeze(-1)

    def _apply(self, fn, recurse=True):
        # model.half() / .float() / .to(dtype): the looked-up rows take the dtype a float tensor of ours would get
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype, device=self.scales.device)).dtype
        return super()._apply(fn, recurse)

# --- 3. config and quantize_ ----------------------------------------------------------


@dataclass(frozen=True)
class QuantConfig:
    """What ``quantize_`` does. Validated on creation.

    bits: 8 (int8, symmetric, one scale per output channel) or 4 (int4, asymmetric, per group).
    group_size: int4 only; one of 32, 64, 128, 256 (what the aten int4 kernel takes).
    method: "rtn" (round to nearest), "gptq" (error-compensating: needs calibration token ids) or "awq"
        (activation-aware scaling for int4: needs calibration token ids).
    activations: "none" (weight-only) or "int8" (W8A8: bits=8, activations rounded per token at run time).
    smooth: W8A8 only, SmoothQuant's alpha in [0, 1] (needs calibration): per input channel
        s = max|x|^alpha / max|w|^(1 - alpha) moves activation outliers into the weights (x / s, W * s).
    embeddings: "int8" quantizes the output head (and the input embedding, sharing its int8
        storage when the two are tied) to int8 per row; "float" leaves both as they are.
    compute_dtype: the activations' dtype for the kernel, or "auto": measured per layer shape on this machine.
    kernel: "packed" (default: the fastest correct kernel measured here among those that keep the integers),
        "auto" (the same, with the float matmul of the layer it replaced among the candidates, so no layer is
        slower than before; a layer that picks it holds a float copy, and the model gets no smaller), "reference"
        (dequantize + F.linear), or one kernel by name (e.g. "aten._weight_int8pack_mm"), used where it is safe.
    skip: regular expressions of module names left in float (``re.search``), the output head and the
        input embedding included (``skip=("lm_head",)``); checked when the config is created.
    """

    bits: int = 8
    group_size: int | None = None
    method: str = "rtn"
    embeddings: str = "int8"
    compute_dtype: str = "auto"
    kernel: str = "packed"
    skip: tuple[str, ...] = ()
    gptq_damp: float = 0.01
    gptq_block: int = 128
    activations: str = "none"
    smooth: float | None = None

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in (4, 8) or not isinstance(self.bits, int):
            raise ValueError(f"bits must be 8 or 4 for packed layers, got {self.bits!r} "
                             "(use fake_quantize to simulate 2-8 bits)")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("int8 uses one scale per output channel; leave group_size=None")
        if self.bits == 4 and (type(self.group_size) is not int or self.group_size not in INT4_GROUP_SIZES):
            # type() check: 128.0 == 128 would pass the `in` test and break the kernel later
            raise ValueError(f"int4 needs an int group_size in {INT4_GROUP_SIZES}, got {self.group_size!r}; "
                             "try QuantConfig(bits=4, group_size=64) (it must also divide the layers' in_features)")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r} "
                             "('int8' is W8A8: QuantConfig(bits=8, activations='int8'))")
        if self.activations == "int8" and self.bits != 8:
            raise ValueError("activations='int8' (W8A8) needs bits=8: QuantConfig(bits=8, activations='int8')")
        if self.activations == "int8" and self.method != "rtn":
            raise ValueError(f"W8A8 rounds weights to nearest (method='rtn'); got method={self.method!r}. "
                             "For activation outliers use smooth=0.5 (SmoothQuant) instead")
        if self.method == "awq" and self.bits != 4:
            raise ValueError("method='awq' is for int4: QuantConfig(bits=4, group_size=32, method='awq')")
        if self.smooth is not None:
            if self.activations != "int8":
                raise ValueError("smooth (SmoothQuant) is for W8A8: QuantConfig(bits=8, activations='int8', "
                                 "smooth=0.5)")
            if isinstance(self.smooth, bool) or not isinstance(self.smooth, (int, float)) \
                    or not 0 <= self.smooth <= 1:
                raise ValueError(f"smooth must be a number in [0, 1] (SmoothQuant's alpha, 0.5 is usual) or None, "
                                 f"got {self.smooth!r}")
        if self.embeddings not in ("int8", "float"):
            raise ValueError(f"embeddings must be 'int8' or 'float', got {self.embeddings!r}")
        if self.compute_dtype != "auto" and (not isinstance(self.compute_dtype, str)
                                             or self.compute_dtype not in COMPUTE_DTYPES):
            raise ValueError(f"compute_dtype must be 'auto' or one of {sorted(COMPUTE_DTYPES)}, "
                             f"got {self.compute_dtype!r}")
        named = (INT_MM,) if self.activations == "int8" else (INT8PACK,) if self.bits == 8 else (INT4_CPU, INT4_CUDA)
        if self.kernel not in KERNEL_REQUESTS + named:
            raise ValueError(f"kernel must be one of {KERNEL_REQUESTS + named} for {self.name}, got {self.kernel!r}")
        if not isinstance(self.skip, tuple):
            raise ValueError("skip must be a tuple of regular expressions, e.g. skip=('mlp.down_proj',)")
        for pattern in self.skip:
            if not isinstance(pattern, str):
                raise ValueError(f"skip patterns must be strings (regular expressions), got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"skip pattern {pattern!r} is not a valid regular expression ({e}); "
                                 "escape special characters, e.g. skip=(r'layers\\.0\\.mlp',)") from e
        check_number("gptq_damp", self.gptq_damp, "in (0, 1) (GPTQ's damping, a fraction of the mean diagonal; "
                     "0.01 is usual)", lambda v: 0 < v < 1)
        check_int("gptq_block", self.gptq_block, 1, " (columns per GPTQ block; 128 is usual)")

    @property
    def name(self) -> str:
        if self.activations == "int8":
            return "w8a8" + (f"-sq{self.smooth:g}" if self.smooth is not None else "")
        g = f"-g{self.group_size}" if self.group_size else ""
        prefix = "" if self.method == "rtn" else f"{self.method}-"
        return f"{prefix}int{self.bits}-wo{g}"

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq") or self.smooth is not None

    def dtype(self) -> torch.dtype | str:
        return "auto" if self.compute_dtype == "auto" else COMPUTE_DTYPES[self.compute_dtype]


@dataclass
class QuantReport:
    """What ``quantize_`` did, layer by layer."""

    quantized: dict[str, str]  # name -> kernel
    skipped: dict[str, str]  # name -> reason
    warnings: list[str] = field(default_factory=list)
    scaled: dict[str, str] = field(default_factory=dict)  # AWQ / SmoothQuant: name -> alpha and where s went

    def summary(self) -> str:
        kernels: dict[str, int] = {}
        for k in self.quantized.values():
            kernels[k] = kernels.get(k, 0) + 1
        text = f"{len(self.quantized)} layers quantized {kernels}, {len(self.skipped)} left in float"
        if self.scaled:
            folded = sum("folded" in v for v in self.scaled.values())
            text += (f"; {len(self.scaled)} scaled per input channel ({folded} folded into a norm, "
                     f"{len(self.scaled) - folded} with an input_scale)")
        if kernels.get(FLOAT):
            text += (f"; {kernels[FLOAT]} run the float matmul of the layer they replaced (measured faster here "
                     "than every integer kernel; kernel='packed' keeps the integers)")
        return text + "".join(f"\nWARNING: {w}" for w in self.warnings)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` holds packed int8/int4 layers from :func:`quantize_`."""
    return any(isinstance(m, (*PACKED_LINEARS, Int8Embedding)) for m in model.modules())


_is_quantized = is_quantized  # the older private name


def _conv1d_as_linear(conv: Conv1D) -> nn.Linear:
    """GPT-2's Conv1D is a Linear that stores its weight transposed (in, out): the same layer as ``nn.Linear``."""
    lin = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    return lin


def _quantize_linear(lin: nn.Linear, cfg: QuantConfig, hessian: torch.Tensor | None = None,
                     weight: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> nn.Module:
    """The packed layer ``cfg`` asks for: RTN, or GPTQ given a Hessian; ``weight`` replaces ``lin.weight``
    (already multiplied by AWQ / SmoothQuant scales, with ``input_scale`` undoing them on the input)."""
    dt, fd, kernel = cfg.dtype(), lin.weight.dtype, cfg.kernel
    w = lin.weight if weight is None else weight
    if cfg.activations == "int8":
        qt = quantize(w, 8, symmetric=True, granularity="per_channel")
        return Int8DynamicLinear(qt.q, qt.scale, lin.bias, dt, kernel, fd, input_scale)
    if hessian is not None:  # GPTQ rounds to the grid the layer will store (bf16 scales for "auto")
        qt = gptq_quantize_weight(w, hessian, cfg, scale_dtype=_scale_dtype(dt))
    elif cfg.bits == 8:
        qt = quantize(w, 8, symmetric=True, granularity="per_channel")
    else:
        qt = quantize(w, 4, symmetric=False, granularity="per_group", group_size=cfg.group_size)
    if cfg.bits == 8:
        return Int8WeightOnlyLinear(qt.q, _fresh_scales(qt.scale, dt), lin.bias, dt, kernel, fd, input_scale)
    return Int4WeightOnlyLinear.from_quantized(qt, lin.bias, dt, kernel, fd, input_scale)


def quantize_(model: nn.Module, cfg: QuantConfig, calibration: torch.Tensor | None = None) -> QuantReport:
    """Replace the model's ``nn.Linear`` (and GPT-2 ``Conv1D``) layers with packed int8/int4 layers, in place.

    The output head (``lm_head``) and input embedding follow ``cfg.embeddings`` and ``cfg.skip``.
    ``calibration``: (batch, seq) token ids, needed by ``method="gptq"`` / ``"awq"`` and ``smooth``
    (``course_lib.data.calibration_batches(tokenizer)``). Afterwards ``model.save_pretrained(folder)``
    stores the packed layers and ``course_lib.load_model(folder)`` rebuilds them.
    """
    if not isinstance(cfg, QuantConfig):
        raise ValueError(f"cfg must be a QuantConfig, got {type(cfg).__name__}")
    if is_quantized(model):
        raise ValueError("this model is already quantized; quantize a fresh float copy instead "
                         "(quantizing twice would round already-rounded weights)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head}
    if not linears and head is None:
        raise ValueError("the model has no nn.Linear layers to quantize (quantize_ handles nn.Linear and "
                         "transformers' Conv1D only)")
    if cfg.needs_calibration and calibration is None:
        what = f"method={cfg.method!r}" if cfg.method != "rtn" else f"smooth={cfg.smooth!r}"
        raise ValueError(f"{what} needs calibration token ids: "
                         "quantize_(model, cfg, calibration=course_lib.data.calibration_batches(tokenizer))")
    report = QuantReport({}, {})
    todo: dict[str, nn.Linear] = {}
    for name, lin in linears.items():
        reason = _cannot_take(name, lin, cfg)
        if reason:
            report.skipped[name] = reason
            log.info("left %s in float: %s", name, reason)
        else:
            todo[name] = lin
    if not todo and linears:
        reasons = sorted(set(report.skipped.values()))
        raise ValueError(f"no Linear layer can take {cfg.name}: all {len(linears)} projections would stay in float "
                         f"({'; '.join(reasons[:3])}){_fitting_group_hint(linears.values(), cfg)}")
    _warn_if_mostly_float(linears, report, cfg)
    for name, lin in todo.items():
        if isinstance(lin, Conv1D):  # same numbers, Linear layout: RTN and GPTQ then treat it like any Linear
            todo[name] = _conv1d_as_linear(lin)
            _set_module(model, name, todo[name])
    if cfg.method == "gptq":
        _gptq_model(model, todo, cfg, calibration, report)
    elif cfg.needs_calibration:  # AWQ, SmoothQuant
        _activation_aware_model(model, todo, cfg, calibration, report)
    else:
        for name, lin in tqdm(todo.items(), desc=f"quantizing ({cfg.name})", leave=False):
            new = _quantize_linear(lin, cfg)
            _set_module(model, name, new)
            report.quantized[name] = new.kernel
    _quantize_embeddings(model, head, emb, cfg, report)
    _install_save(model, cfg)
    log.info("quantize_ %s: %s", cfg.name, report.summary())
    return report


def _in_features(m: nn.Module) -> int:
    return m.nx if isinstance(m, Conv1D) else m.in_features


def _skip_pattern(name: str, cfg: QuantConfig) -> str | None:
    return next((p for p in cfg.skip if re.search(p, name)), None)


def _cannot_take(name: str, lin: nn.Module, cfg: QuantConfig) -> str | None:
    """Why this layer stays in float, or None."""
    pattern = _skip_pattern(name, cfg)
    if pattern is not None:
        return f"matches skip pattern {pattern!r}"
    if cfg.bits == 4 and _in_features(lin) % cfg.group_size:
        return f"in_features={_in_features(lin)} is not a multiple of group_size={cfg.group_size}"
    return None


def _fitting_group_hint(layers, cfg: QuantConfig) -> str:
    """For int4: the group sizes that divide every layer's in_features (SmolLM2's 576 takes 32 and 64, not 128)."""
    if cfg.bits != 4:
        return ""
    widths = sorted({_in_features(m) for m in layers})
    fits = [g for g in INT4_GROUP_SIZES if all(w % g == 0 for w in widths)]
    if fits:
        return f"; in_features {widths} all take group_size in {fits}, e.g. QuantConfig(bits=4, group_size={fits[-1]})"
    return f"; no int4 group size in {INT4_GROUP_SIZES} divides every in_features {widths}"


def _warn_if_mostly_float(linears: dict[str, nn.Module], report: QuantReport, cfg: QuantConfig) -> None:
    """Say so loudly when the group size, not the user's skip list, leaves most projections in float."""
    by_group = [n for n, r in report.skipped.items() if "group_size" in r]
    if 2 * len(by_group) > len(linears):
        msg = (f"{cfg.name} leaves {len(by_group)} of {len(linears)} projections in float because group_size="
               f"{cfg.group_size} does not divide their in_features{_fitting_group_hint(linears.values(), cfg)}; "
               "quality and size numbers from this run are mostly the float model's")
        report.warnings.append(msg)
        log.warning(msg)


def _quantize_embeddings(model: nn.Module, head: nn.Module | None, emb: nn.Module | None,
                         cfg: QuantConfig, report: QuantReport) -> None:
    """lm_head (and the input embedding) to int8 rows, or left alone, per ``cfg.embeddings`` and ``cfg.skip``."""
    if head is None or not isinstance(head, nn.Linear):
        return
    names = {id(m): n for n, m in model.named_modules()}
    head_name = names[id(head)]
    if cfg.embeddings == "float":
        report.skipped[head_name] = "embeddings='float' keeps the output head (and embedding) in float"
        return
    tied = emb is not None and getattr(emb, "weight", None) is head.weight
    head_skip = _skip_pattern(head_name, cfg)
    new_head = None
    if head_skip is not None:
        report.skipped[head_name] = f"matches skip pattern {head_skip!r}"
    else:
        # int8 even in an int4 config: the head is the widest layer and the most sensitive to error.
        kernel = cfg.kernel if cfg.kernel in (*KERNEL_REQUESTS, INT8PACK) else "auto"
        new_head = Int8WeightOnlyLinear.from_linear(head, cfg.dtype(), kernel)
        _set_module(model, head_name, new_head)
        report.quantized[head_name] = new_head.kernel
    if isinstance(emb, nn.Embedding):
        emb_name = names[id(emb)]
        emb_skip = _skip_pattern(emb_name, cfg)
        if emb_skip is not None or (tied and new_head is None):
            report.skipped[emb_name] = (f"matches skip pattern {emb_skip!r}" if emb_skip is not None
                                        else f"tied to {head_name}, which matches skip pattern {head_skip!r}")
        else:
            if tied:  # share the head's int8 rows: one copy, like the float model had
                new_emb = Int8Embedding(new_head.weight_int8, new_head.scales, emb.weight.dtype)
            else:
                qt = quantize(emb.weight, 8, symmetric=True, granularity="per_channel")
                new_emb = Int8Embedding(qt.q, qt.scale.reshape(-1).to(emb.weight.dtype), emb.weight.dtype)
            _set_module(model, emb_name, new_emb)
            report.quantized[emb_name] = "int8 lookup" + (" (tied to lm_head)" if tied else "")
    if new_head is not None and hasattr(model, "config"):
        model.config.tie_word_embeddings = False  # HF must not try to re-tie float weights onto our buffers


# --- saving and loading a quantized model -----------------------------------------------
# transformers' from_pretrained knows nothing of packed layers: given their state dict it would build float layers,
# find no `weight` for them and initialise them at random (a warning only). So a quantized model is saved under
# file names from_pretrained does not read - it then refuses the folder ("no model.safetensors") instead of
# loading noise - and course_lib.load_model(folder) rebuilds the packed layers from QUANT_FILE.

QUANT_FILE = "course_quant.json"
QUANT_WEIGHTS = "course_quant.safetensors"
QUANT_OUTPUTS = ("config.json", "generation_config.json", QUANT_WEIGHTS, QUANT_FILE)  # all a save writes
_FLOAT_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")


def _install_save(model: nn.Module, cfg: QuantConfig) -> None:
    """Make ``model.save_pretrained(folder)`` save the packed layers (instead of HF's float-only save)."""
    model.course_quant_config = cfg
    if hasattr(model, "save_pretrained"):
        # a partial, not a bound method: it survives copy.deepcopy (rebinds to the copy) and pickling
        model.save_pretrained = functools.partial(save_quantized, model)


def save_quantized(model: nn.Module, save_directory: str | os.PathLike, overwrite: bool = False,
                   **kwargs) -> Path:
    """Save a quantized model: config.json, the packed tensors (QUANT_WEIGHTS) and how to rebuild them (QUANT_FILE).

    ``model.save_pretrained(folder)`` lands here after :func:`quantize_`. Load with ``course_lib.load_model(folder)``.
    A non-empty folder is refused unless ``overwrite=True``, which replaces only the files listed in
    :data:`QUANT_OUTPUTS`. Atomic: the files are written beside the folder first and renamed into it, so a
    failed save (a full disk) leaves the folder as it was.
    """
    unsupported = sorted(k for k, v in kwargs.items() if k not in ("safe_serialization", "max_shard_size") and v)
    if unsupported:
        raise ValueError(f"save_pretrained of a quantized model takes only a folder; {unsupported} are not "
                         "supported (save it, then share the folder)")
    check_flag("overwrite", overwrite)
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; save_pretrained needs a folder")
    stale = [f for f in _FLOAT_WEIGHT_FILES if (folder / f).exists()] + sorted(
        p.name for p in folder.glob("model-*-of-*.safetensors"))
    if stale:
        raise ValueError(f"{folder} already holds float weights ({', '.join(stale)}); transformers would load those "
                         "beside the quantized ones. Save the quantized model to an empty folder")
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if present and not overwrite:
        raise ValueError(f"{folder} is not empty ({', '.join(present[:5])}{', ...' if len(present) > 5 else ''}); "
                         "save the quantized model to a new or empty folder, or pass overwrite=True to replace the "
                         f"files it writes ({', '.join(QUANT_OUTPUTS)}) and keep the others")
    cfg = getattr(model, "course_quant_config", None)
    layers: dict[str, dict] = {}
    for name, m in model.named_modules():
        if isinstance(m, PACKED_LINEARS):
            kind = {Int8WeightOnlyLinear: "int8", Int4WeightOnlyLinear: "int4", Int8DynamicLinear: "w8a8"}[type(m)]
            req = m.compute_request
            layers[name] = {"type": kind, "kernel": m.kernel_request,
                            "compute_dtype": req if req == "auto" else _dtype_name(req),
                            "float_dtype": _dtype_name(m.float_dtype)}
            if kind == "int4":
                layers[name]["group_size"] = m.group_size
        elif isinstance(m, Int8Embedding):
            layers[name] = {"type": "int8_embedding", "out_dtype": str(m.out_dtype)[6:]}
    if not layers:
        raise ValueError("this model has no packed layers; save it with the ordinary save_pretrained")
    # A tied head and embedding share one int8 tensor: store it once, note the second name (an alias).
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach().cpu().contiguous()
    meta = {"format": 1, "quant_config": None if cfg is None else {**asdict(cfg), "skip": list(cfg.skip)},
            "layers": layers, "aliases": aliases}
    with writing_folder(folder) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(tensors, str(tmp / QUANT_WEIGHTS), metadata={"format": "pt"})
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if folder.is_dir():
            move_files_into(tmp, folder, last=(QUANT_FILE,))
        else:
            replace_folder(tmp, folder)
    log.info("saved %d packed layers to %s (load with course_lib.load_model)", len(layers), folder)
    return folder


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by :func:`save_quantized`."""
    return (Path(path) / QUANT_FILE).is_file()


# What each field of QUANT_FILE must be: {field: (type, required)}; a layer's fields depend on its "type".
_QUANT_FILE_FIELDS = {"format": (int, True), "quant_config": ((dict, type(None)), True), "layers": (dict, True),
                      "aliases": (dict, True)}
_LINEAR_FIELDS = {"type": (str, True), "kernel": (str, True), "compute_dtype": (str, True),
                  "float_dtype": (str, False)}  # float_dtype: absent from the first files saved
_LAYER_FIELDS = {"int8": _LINEAR_FIELDS, "w8a8": _LINEAR_FIELDS, "int4": {**_LINEAR_FIELDS, "group_size": (int, True)},
                 "int8_embedding": {"type": (str, True), "out_dtype": (str, True)}}
_LAYER_TENSORS = {"int8": ("weight_int8", "scales"), "w8a8": ("weight_int8", "scales"),
                  "int4": ("weight_packed", "scales_and_zeros"), "int8_embedding": ("weight_int8", "scales")}


def _read_quant_file(path: Path) -> tuple[dict, QuantConfig | None]:
    """QUANT_FILE checked field by field, and the QuantConfig it records.

    A wrong type or a missing field is a ValueError naming the file and the field; a field this version does not
    know (a newer course_lib wrote it) is ignored with a warning.
    """
    def fail(where: str, what: str) -> ValueError:
        return ValueError(f"{path}: {where} {what}; the file is damaged or was edited: save the quantized "
                          "model again")

    def check(obj, where: str, spec: dict) -> None:
        if not isinstance(obj, dict):
            raise fail(where or "the file", f"must be a JSON object, got {type(obj).__name__}")
        for key, (typ, required) in spec.items():
            at = f"{where}[{key!r}]" if where else f"field {key!r}"
            if key not in obj:
                if required:
                    raise fail(at, "is missing")
            elif typ is not object and (isinstance(obj[key], bool) or not isinstance(obj[key], typ)):
                raise fail(at, f"has the wrong type ({type(obj[key]).__name__}): {obj[key]!r}")
        extra = sorted(set(obj) - set(spec))
        if extra:
            log.warning("%s: ignoring %s %s, unknown to this course_lib (saved by a newer version?)", path,
                        f"{where} fields" if where else "fields", ", ".join(map(repr, extra)))

    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); save the quantized model again") from e
    check(meta, "", _QUANT_FILE_FIELDS)
    if meta["format"] != 1:
        raise ValueError(f"{path} has format {meta['format']!r}; this course_lib reads format 1")
    for name, spec in meta["layers"].items():
        where = f"layers[{name!r}]"
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in _LAYER_FIELDS:
            raise fail(f"{where}['type']", f"must be one of {sorted(_LAYER_FIELDS)}, got {kind!r}")
        check(spec, where, _LAYER_FIELDS[kind])
        for key in ("compute_dtype", "float_dtype"):
            if key in spec and spec[key] not in COMPUTE_DTYPES and not (key == "compute_dtype" and spec[key] == "auto"):
                raise fail(f"{where}[{key!r}]", f"must be 'auto' or one of {sorted(COMPUTE_DTYPES)}, got {spec[key]!r}")
    for key, source in meta["aliases"].items():
        if not isinstance(source, str):
            raise fail(f"aliases[{key!r}]", f"must name a tensor, got {source!r}")
    qc = meta["quant_config"]
    if qc is None:
        return meta, None
    known = {f.name: (list if f.name == "skip" else object, True) for f in fields(QuantConfig)}
    check(qc, "quant_config", known)  # the values' types: QuantConfig checks them, naming the field
    try:
        cfg = QuantConfig(**{k: tuple(v) if k == "skip" else v for k, v in qc.items() if k in known})
    except ValueError as e:
        raise fail("quant_config", f"is invalid: {e}") from e
    return meta, cfg


def _packed_layer(spec: dict, get, dtype: torch.dtype) -> nn.Module:
    """One layer of a checked QUANT_FILE, built from its tensors (``get(key)``)."""
    if spec["type"] == "int8_embedding":
        return Int8Embedding(get("weight_int8"), get("scales"), dtype)
    cd = spec["compute_dtype"]
    common = dict(compute_dtype=cd if cd == "auto" else COMPUTE_DTYPES[cd], kernel=spec["kernel"],
                  float_dtype=COMPUTE_DTYPES.get(spec.get("float_dtype"), dtype), input_scale=get("input_scale"))
    if spec["type"] == "int4":
        return Int4WeightOnlyLinear(unpack_int4(get("weight_packed")), get("scales_and_zeros"), spec["group_size"],
                                    get("bias"), **common)
    cls = Int8WeightOnlyLinear if spec["type"] == "int8" else Int8DynamicLinear
    return cls(get("weight_int8"), get("scales"), get("bias"), **common)


def load_quantized(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`: float layers from its config, packed layers from the file.

    ``dtype`` is for the layers that stayed in float; each packed layer keeps the compute dtype it was saved with.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    meta, cfg = _read_quant_file(folder / QUANT_FILE)
    # clone: safetensors hands back tensors at 8-byte offsets, and the int8 kernel needs aligned rows
    tensors = {k: t.clone() for k, t in load_file(str(folder / QUANT_WEIGHTS)).items()}
    for key, source in meta["aliases"].items():
        if source not in tensors:
            raise ValueError(f"{folder / QUANT_FILE}: aliases[{key!r}] names {source!r}, which {QUANT_WEIGHTS} "
                             "does not hold; save the quantized model again")
        tensors[key] = tensors[source]
    for name, spec in meta["layers"].items():
        absent = [k for k in _LAYER_TENSORS[spec["type"]] if f"{name}.{k}" not in tensors]
        if absent:
            raise ValueError(f"{folder / QUANT_WEIGHTS} lacks {name}.{absent[0]}, which layer {name!r} of "
                             f"{QUANT_FILE} needs; save the quantized model again")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    built: dict[int, torch.Tensor] = {}  # storage of a file tensor -> the buffer built from it (re-ties aliases)
    for name, spec in meta["layers"].items():
        def get(key: str, name: str = name) -> torch.Tensor | None:
            t = tensors.get(f"{name}.{key}")
            return None if t is None else built.get(id(t), t)
        try:
            new = _packed_layer(spec, get, dtype)
            _set_module(model, name, new)
        except (ValueError, RuntimeError, AttributeError) as e:
            raise ValueError(f"{folder / QUANT_FILE}: layers[{name!r}] cannot be rebuilt ({e}); the file is damaged "
                             "or was edited: save the quantized model again") from e
        for key, buf in new.named_buffers(recurse=False):
            if f"{name}.{key}" in tensors and buf is not None:
                built.setdefault(id(tensors[f"{name}.{key}"]), buf)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or missing:
        raise ValueError(f"{folder / QUANT_WEIGHTS} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if cfg is not None:
        _install_save(model, cfg)
    else:
        model.save_pretrained = functools.partial(save_quantized, model)
    return model.eval()


# --- GPTQ -----------------------------------------------------------------------------


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig,
                         scale_dtype: torch.dtype = torch.float32) -> Quantized:
    """GPTQ on one weight (N, K) given H = 2 X^T X / n over its calibration inputs.

    Columns are rounded left to right; each column's error is spread over the
    later columns with the inverse Hessian (Cholesky form), in blocks of
    ``cfg.gptq_block`` columns for speed. Group scales are set from the
    already-updated weights when a group starts (the paper's choice).
    ``scale_dtype``: the dtype the packed layer stores its scales (and int4 offsets) in. Each column is rounded
    to that grid and its error measured against it: rounding to fp32 scales and storing bf16 ones afterwards
    adds an error nothing compensates (on SmolLM2-135M int4 g32 GPTQ closed 15% of RTN's prose-perplexity
    gap before this and the float stand-ins below, 27% after; docs/quantization.md).
    """
    W = weight.detach().float().clone()
    N, K = W.shape
    dev = W.device  # everything stays on the weight's device (a GPU does the Cholesky and the updates)
    H = hessian.float().to(dev).clone()
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += cfg.gptq_damp * torch.mean(torch.diag(H)) * torch.eye(K, device=dev)  # dampening keeps H invertible
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    bits, sym = cfg.bits, cfg.bits == 8
    gs = cfg.group_size or K
    qmin, qmax = qrange(bits, sym)
    Q = torch.zeros(N, K, device=dev)
    scales = torch.zeros(N, K // gs, device=dev)
    zeros = torch.zeros(N, K // gs, device=dev)

    def params(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, integer zero point, the zero point rounding sees) as the packed layer will store them."""
        qt = quantize(cols, bits, sym, "per_channel")
        scale, zero = qt.scale.reshape(-1), qt.zero_point.reshape(-1)
        if scale_dtype == torch.float32:
            return scale, zero, zero
        scale = scale.to(scale_dtype).float()
        if sym:
            return scale, zero, zero
        # the int4 layer stores (q - 8) * scale + offset with offset = (8 - zero) * scale in scale_dtype, so the
        # zero point it dequantizes with is 8 - offset / scale: near the integer, not on it
        offset = ((INT4_MID - zero) * scale).to(scale_dtype).float()
        return scale, zero, INT4_MID - offset / scale

    scale, zero, z_eff = params(W)  # int8: one scale per channel from the whole row
    for i1 in range(0, K, cfg.gptq_block):
        i2 = min(i1 + cfg.gptq_block, K)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if cfg.group_size and col % gs == 0:
                # scales from the weights as GPTQ has updated them so far
                scale, zero, z_eff = params(torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs])
                scales[:, col // gs], zeros[:, col // gs] = scale, zero
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scale + z_eff), qmin, qmax)
            Q[:, col] = q
            err = (w - (q - z_eff) * scale) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    if not cfg.group_size:
        scales[:, 0], zeros[:, 0] = scale, zero
    if cfg.group_size:
        return Quantized(Q.to(torch.uint8), scales.unsqueeze(-1), zeros.unsqueeze(-1), bits, sym, "per_group", gs)
    return Quantized(Q.to(torch.int8), scales, zeros, bits, sym, "per_channel", None)


def _blocks(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Group layer names by transformer block (``...layers.<i>.``) in order; GPTQ quantizes block by block."""
    groups: dict[int, list[str]] = {}
    for n in names:
        m = re.search(r"layers\.(\d+)\.", n)
        groups.setdefault(int(m.group(1)) if m else -1, []).append(n)
    return [groups[k] for k in sorted(groups)]


class _Hessian:
    """Forward hook: running mean of 2 x x^T over every token a layer sees (independent of token count)."""

    def __init__(self, k: int):
        self.H = torch.zeros(k, k)
        self.n = 0

    def __call__(self, module, inputs, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        self.H = self.H.to(x.device)  # kept where the layer runs: no copy of every activation to the CPU
        total = self.n + x.shape[0]
        self.H *= self.n / total
        self.H += (2 / total) * x.t() @ x
        self.n = total


class _StopForward(Exception):
    pass


def _decoder_stack(model: nn.Module, blocks: list[list[str]]) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks that ``blocks`` name (``model.layers`` in a Llama)."""
    parents = {re.search(r"(.*?layers)\.\d+\.", b[0]).group(1) for b in blocks}
    if len(parents) != 1:
        raise ValueError(f"GPTQ expects one stack of decoder blocks (...layers.<i>), found {sorted(parents)}")
    name = parents.pop()
    stack = model.get_submodule(name)
    if not isinstance(stack, nn.ModuleList):
        raise ValueError(f"GPTQ expects {name!r} to be an nn.ModuleList of decoder blocks, got {type(stack).__name__}")
    return name, stack


def _block_inputs(model: nn.Module, first: nn.Module, calibration: torch.Tensor, device) -> list[tuple]:
    """What the first decoder block receives for each calibration row: (hidden, other args, kwargs).

    A forward pre-hook with kwargs sees everything the model hands a block - the
    hidden states and, in transformers, the RoPE tables, the attention mask and the
    position ids - then stops the pass: the blocks after it run on these, one by one.
    """
    seen: list[tuple] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        for key in ("cache", "past_key_values", "past_key_value"):
            if kwargs.get(key) is not None:
                kwargs[key] = None  # a KV cache would grow each time a block is re-run on the same row
        seen.append((x, tuple(args[1:]), kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in calibration:  # one sequence at a time keeps memory flat
            try:
                model(input_ids=row[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return seen


def _run_block(block: nn.Module, inputs: list[tuple], stop_early: bool = False) -> list[torch.Tensor]:
    """The block on each cached input; with ``stop_early`` a hook may end a run (:class:`_StopForward`)."""
    outs = []
    for x, args, kwargs in inputs:
        try:
            y = block(x, *args, **kwargs)
        except _StopForward:
            if not stop_early:
                raise
            continue
        outs.append(y[0] if isinstance(y, tuple) else y)  # transformers 4.x returns a tuple, 5.x the tensor
    return outs


def _stop_when_all_seen(hess: dict[str, _Hessian], name: str, calls: dict[str, int]):
    """Forward hook of one layer of a group: add its input to its Hessian; once every layer of the group has
    seen this run's input (the same number of calls each), stop the run - the rest of the block is not needed."""
    def hook(module, inputs, output) -> None:
        hess[name](module, inputs, output)
        calls[name] = calls.get(name, 0) + 1
        if all(calls.get(n, 0) == calls[name] for n in hess):
            raise _StopForward

    return hook


def _float_stand_in(lin: nn.Linear, packed: nn.Module) -> nn.Linear:
    """A float Linear holding exactly ``packed``'s dequantized weight, in ``lin``'s dtype and device."""
    out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(packed.dequantized_weight().to(lin.weight))
        if lin.bias is not None:
            out.bias.copy_(lin.bias)
    return out


def _gptq_quantize_group(model: nn.Module, names: list[str], todo: dict[str, nn.Linear], hess: dict,
                         cfg: QuantConfig, packed: dict[str, nn.Module]) -> None:
    """Quantize ``names`` from their Hessians into ``packed``. Until the end the model runs float stand-ins of
    the packed layers: the layers calibrated later see these layers' rounding error, but not which kernel a
    timing picked for them (bf16 and fp32 activations give slightly different outputs, so Hessians, and
    then the integers, would change from run to run)."""
    for n in names:
        packed[n] = _quantize_linear(todo[n], cfg, hess[n].H)
        _set_module(model, n, _float_stand_in(todo[n], packed[n]))


@torch.no_grad()
def _gptq_model(model: nn.Module, todo: dict[str, nn.Linear], cfg: QuantConfig,
                calibration: torch.Tensor, report: QuantReport) -> None:
    """Sequential GPTQ (:func:`_gptq_calibrate`), then the packed layers replace their float stand-ins."""
    packed: dict[str, nn.Module] = {}
    _gptq_calibrate(model, todo, cfg, calibration, packed)
    for n, new in packed.items():
        _set_module(model, n, new)
        report.quantized[n] = new.kernel


def _gptq_calibrate(model: nn.Module, todo: dict[str, nn.Linear], cfg: QuantConfig,
                    calibration: torch.Tensor, packed: dict[str, nn.Module]) -> None:
    """Sequential GPTQ: each layer is calibrated on what the already-quantized layers before it produce.

    The model runs once up to the first block; after that each block's inputs are
    cached and passed on (block -> one layer's Hessian -> quantize it -> next layer
    of the block ... -> quantized block -> next block's inputs), so the cost is
    O(layers), not O(layers^2): a block runs once per layer it holds, plus once.
    """
    if calibration.dim() != 2 or calibration.dtype != torch.long:
        raise ValueError(f"calibration must be (batch, seq) token ids (torch.long), got {tuple(calibration.shape)} "
                         f"{calibration.dtype}")
    device = next(model.parameters()).device
    groups = _blocks(model, list(todo))
    outside = [g for g in groups if not re.search(r"layers\.\d+\.", g[0])]
    for names in outside:  # Linear layers outside the decoder stack: calibrated by whole forward passes
        hess = {n: _Hessian(todo[n].in_features) for n in names}
        handles = [todo[n].register_forward_hook(hess[n]) for n in names]
        try:
            for row in calibration:
                model(input_ids=row[None].to(device))
        finally:
            for h in handles:
                h.remove()
        _gptq_quantize_group(model, names, todo, hess, cfg, packed)
    per_block = {int(re.search(r"layers\.(\d+)\.", g[0]).group(1)): g for g in groups if g not in outside}
    if not per_block:
        return
    stack_name, stack = _decoder_stack(model, list(per_block.values()))
    inputs = _block_inputs(model, stack[0], calibration, device)
    last = max(per_block)
    for i in tqdm(range(last + 1), desc="GPTQ blocks", leave=False):
        # True-sequential within the block (the reference's default): each layer's Hessian comes from a run of
        # the block in which the layers before it are already quantized, so o_proj sees the error of the rounded
        # q/k/v and down_proj that of gate/up, and GPTQ compensates for it. With Hessians from the float block
        # it does not: on SmolLM2-135M int4 g32 that closed 10% of RTN's prose-perplexity gap instead of 69%
        # (first 6 blocks; docs/quantization.md, "GPTQ on the real model").
        # Layers that read the same input (q/k/v; gate/up) get their Hessians from one run: none of them changes
        # what the others see. Each run stops as soon as the group has seen its inputs, so only the last run
        # (below) goes through the whole block.
        for group in _input_groups(per_block.get(i, []), f"{stack_name}.{i}."):
            hess = {n: _Hessian(todo[n].in_features) for n in group}
            calls: dict[str, int] = {}
            handles = [todo[n].register_forward_hook(_stop_when_all_seen(hess, n, calls)) for n in group]
            try:
                _run_block(stack[i], inputs, stop_early=True)  # on what the quantized layers before it produce
            finally:
                for h in handles:
                    h.remove()
            _gptq_quantize_group(model, group, todo, hess, cfg, packed)
        if i < last:  # the quantized block's outputs are the next block's inputs
            inputs = [(y, args, kwargs) for y, (_, args, kwargs) in zip(_run_block(stack[i], inputs), inputs)]


# --- activation-aware scaling: AWQ (int4) and SmoothQuant (W8A8) --------------------------------------------
# Both multiply each input channel of a weight by s and divide the layer's input by s: the product x W^T is
# unchanged in float, but the rounding is not. Where the input comes straight from a norm (q/k/v after
# input_layernorm, gate/up after post_attention_layernorm in Llama, Qwen2, Mistral) the 1/s is folded into the
# norm's weight, for free; elsewhere (o_proj, down_proj) the layer keeps an input_scale vector (K multiplies per
# token). Layers sharing a norm share one s.

SHARED_INPUTS = {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "input_layernorm",
                 ("mlp.gate_proj", "mlp.up_proj"): "post_attention_layernorm"}
MAX_CALIB_ROWS = 2048  # activation rows kept per layer group for the scale search


def awq_scales(x: torch.Tensor, weights: list[torch.Tensor], cfg: QuantConfig,
               alphas: tuple[float, ...] = AWQ_ALPHAS) -> tuple[torch.Tensor, float, dict[float, float]]:
    """AWQ's search: s = mean|x|^alpha per input channel, alpha on a grid, minimizing the output error.

    ``x``: (rows, K) calibration inputs of the layers in ``weights`` (each (N, K), sharing that input). For each
    alpha the weights are multiplied by s, rounded to int4 (RTN, ``cfg.group_size``) and divided by s again;
    the error is || x W^T - x W_hat^T ||^2 summed over the layers. alpha = 0 is s = 1, plain RTN, so the chosen
    s is never worse than RTN on these activations. Returns (s, alpha, error per alpha).
    """
    x = x.float()
    mag = x.abs().mean(0).clamp_min(1e-6)
    ws = [w.detach().float() for w in weights]
    refs = [x @ w.T for w in ws]
    errs: dict[float, float] = {}
    best = (math.inf, None, None)
    for a in alphas:
        s = mag**a
        s = s / (s.max() * s.min()).sqrt()  # centre the range so neither end under- or overflows
        err = 0.0
        for w, ref in zip(ws, refs):
            w_hat = fake_quantize(w * s, 4, False, "per_group", cfg.group_size) / s
            err += float(((x @ w_hat.T - ref) ** 2).sum())
        errs[a] = err
        if err < best[0]:
            best = (err, a, s)
    return best[2], best[1], errs


def smoothquant_scales(x: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant: s = max|x|^alpha / max|w|^(1 - alpha) per input channel (the max over every layer's rows)."""
    xmax = x.float().abs().amax(0).clamp_min(1e-5)
    wmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0).clamp_min(1e-5)
    return (xmax**alpha / wmax ** (1 - alpha)).clamp_min(1e-5)


@torch.no_grad()
def _fold_into_norm(norm: nn.Module, s: torch.Tensor) -> bool:
    """Divide a norm's output by ``s`` through its weight (and bias); False (and unchanged) where that is not
    what the norm computes (e.g. Gemma's ``x * (1 + weight)``), checked on random inputs."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.shape != s.shape:
        return False
    b = getattr(norm, "bias", None)
    x = torch.randn(4, s.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    before = norm(x).float()
    saved = (w.detach().clone(), None if b is None else b.detach().clone())
    w.div_(s.to(w.device, w.dtype))
    if b is not None:
        b.div_(s.to(b.device, b.dtype))
    after = norm(x).float()
    want = before / s.to(before.device)
    if (after - want).norm() <= 1e-2 * want.norm():
        return True
    w.copy_(saved[0])
    if b is not None:
        b.copy_(saved[1])
    return False


def _input_groups(names: list[str], block_prefix: str) -> list[list[str]]:
    """``names`` (one block's layers, in order) grouped by the input they share (q/k/v; gate/up); others alone."""
    groups, seen = [], set()
    for n in names:
        if n in seen:
            continue
        rel = n[len(block_prefix):]
        group = next((g for g in SHARED_INPUTS if rel in g), None)
        members = [m for m in names if group and m[len(block_prefix):] in group] or [n]
        seen.update(members)
        groups.append(members)
    return groups


class _Inputs:
    """Forward hook: the inputs a layer sees, as (rows, K) float32, up to ``MAX_CALIB_ROWS`` rows."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []
        self.n = 0

    def __call__(self, module, inputs, output) -> None:
        if self.n < MAX_CALIB_ROWS:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()[: MAX_CALIB_ROWS - self.n]
            self.rows.append(x)
            self.n += x.shape[0]

    def x(self) -> torch.Tensor:
        return torch.cat(self.rows)


def _scale_group(model: nn.Module, block: nn.Module | None, prefix: str, members: list[str],
                 todo: dict[str, nn.Linear], x: torch.Tensor, cfg: QuantConfig, report: QuantReport) -> None:
    """Find s for one group of layers sharing an input, fold 1/s into the norm or keep it per layer, quantize."""
    weights = [todo[n].weight for n in members]
    if cfg.method == "awq":
        s, alpha, _ = awq_scales(x, weights, cfg)
        how = f"awq alpha={alpha:g}"
    else:
        alpha = float(cfg.smooth)
        s = smoothquant_scales(x, weights, alpha)
        how = f"smoothquant alpha={alpha:g}"
    s = s.to(weights[0].device)
    rel = [n[len(prefix):] for n in members]
    shared = next((g for g in SHARED_INPUTS if rel[0] in g), None)
    folded = False
    if block is not None and shared is not None and hasattr(block, SHARED_INPUTS[shared]):
        # every consumer of the norm must take W * s: the quantized members, and any sibling left in float
        siblings = [block.get_submodule(r) for r in shared if r not in rel and _has_submodule(block, r)]
        if all(isinstance(m, nn.Linear) for m in siblings):
            folded = _fold_into_norm(block.get_submodule(SHARED_INPUTS[shared]), s)
            if folded:
                with torch.no_grad():
                    for m in siblings:
                        m.weight.mul_(s.to(m.weight.dtype))
    for n in members:
        lin = todo[n]
        w = lin.weight.detach().float() * s
        new = _quantize_linear(lin, cfg, weight=w.to(lin.weight.dtype),
                               input_scale=None if folded else 1 / s)
        _set_module(model, n, new)
        report.quantized[n] = new.kernel
        report.scaled[n] = f"{how}, " + (f"folded into {prefix}{SHARED_INPUTS[shared]}" if folded else "input_scale")


def _has_submodule(m: nn.Module, name: str) -> bool:
    try:
        m.get_submodule(name)
        return True
    except AttributeError:
        return False


@torch.no_grad()
def _activation_aware_model(model: nn.Module, todo: dict[str, nn.Linear], cfg: QuantConfig,
                            calibration: torch.Tensor, report: QuantReport) -> None:
    """AWQ / SmoothQuant, block by block like GPTQ: cached block inputs, each group of layers sharing an input
    scaled and quantized in forward order, so later groups see the rounding of the earlier ones."""
    if calibration.dim() != 2 or calibration.dtype != torch.long:
        raise ValueError(f"calibration must be (batch, seq) token ids (torch.long), got {tuple(calibration.shape)} "
                         f"{calibration.dtype}")
    device = next(model.parameters()).device
    groups = _blocks(model, list(todo))
    outside = [g for g in groups if not re.search(r"layers\.\d+\.", g[0])]
    for names in outside:  # layers outside the decoder stack: inputs from whole forward passes, no norm to fold
        hooks = {n: _Inputs() for n in names}
        handles = [todo[n].register_forward_hook(hooks[n]) for n in names]
        try:
            for row in calibration:
                model(input_ids=row[None].to(device))
        finally:
            for h in handles:
                h.remove()
        for n in names:
            _scale_group(model, None, "", [n], todo, hooks[n].x(), cfg, report)
    per_block = {int(re.search(r"layers\.(\d+)\.", g[0]).group(1)): g for g in groups if g not in outside}
    if not per_block:
        return
    stack_name, stack = _decoder_stack(model, list(per_block.values()))
    inputs = _block_inputs(model, stack[0], calibration, device)
    last = max(per_block)
    for i in tqdm(range(last + 1), desc=f"{cfg.name} blocks", leave=False):
        prefix = f"{stack_name}.{i}."
        for members in _input_groups(per_block.get(i, []), prefix):
            hook = _Inputs()
            handle = todo[members[0]].register_forward_hook(hook)
            try:
                _run_block(stack[i], inputs)
            finally:
                handle.remove()
            _scale_group(model, stack[i], prefix, members, todo, hook.x(), cfg, report)
        if i < last:
            inputs = [(y, args, kwargs) for y, (_, args, kwargs) in zip(_run_block(stack[i], inputs), inputs)]

"""Packed layers that really store the integers: int8 weight-only, int4 weight-only, W8A8, and the int8 embedding.

int8 takes one byte per weight, int4 two per byte; W8A8 rounds the activations to int8 per token at run time and
multiplies integers (``torch._int_mm``). Which kernel a layer runs is *measured* on this machine, once per layer
shape (:mod:`.kernel_choice`): the integer kernels (:mod:`.kernels`) in each compute dtype, and the reference path
(unpack, dequantize, ``F.linear``); each is checked against the dequantized weights first, and the fastest correct
one is kept in ``layer.kernel`` / ``layer.compute_dtype`` (``layer.choice`` has every candidate's time).
``kernel="auto"`` adds the float layer it replaced as a candidate, so no layer ends up slower than it was.

Each layer class names its ``KIND`` and says how to describe (:meth:`saved_spec`) and rebuild
(:meth:`from_saved`) itself, so saving and loading (:mod:`.save`) need no table of layer types.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import kernel_choice, native, streaming
from .kernel_choice import Candidate
from .kernels import (
    COMPUTE_DTYPES,
    FLOAT,
    INT4_CPU,
    INT4_CUDA,
    INT4_MID,
    INT8_KERNEL_K_MULTIPLE,
    INT8PACK,
    INT_MM,
    KERNEL_REQUESTS,
    REFERENCE,
    cpu_int4_layout,
    cuda_int4_layout,
    cuda_int4pack,
    dtype_name,
    int8pack_mm,
    int_mm_padded,
    nibbles,
)
from .native import rows_major
from .primitives import Quantized, pack_int4, quantize, quantize_activations, round_activation_groups, unpack_int4
from .streaming import STREAM, STREAM_REQUEST, STREAM_ROWS, pack_int4_halves, unpack_int4_halves

if TYPE_CHECKING:  # annotations only: the config module does not build layers, and layers read a config's fields
    from .config import QuantConfig

log = logging.getLogger(__name__)

AUTO_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what compute_dtype="auto" measures
TORCH_OPS_ROWS = (1, 7)  # probe rows for paths made of ordinary torch ops (no row tiling of their own)
REF_ROWS = 64  # output channels the correctness reference covers (no float copy of a vocabulary-sized head)
SAVED_LAYERS: dict[str, type[nn.Module]] = {}  # kind -> class; each class below adds itself (``KIND``)

# How a saved layer reads its tensors back: the buffer name -> the tensor (None when the file has none).
Getter = Callable[[str], "torch.Tensor | None"]


class SavedLayer(nn.Module):
    """A layer :mod:`.save` can store: its ``KIND``, the settings to write, and how to rebuild it from them."""

    KIND = ""
    SAVED_FIELDS: dict[str, tuple[type, bool]] = {}  # what saved_spec writes: {field: (JSON type, required)}
    SAVED_TENSORS: tuple[str, ...] = ()  # the buffers a saved file must hold for this layer

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.KIND:
            SAVED_LAYERS[cls.KIND] = cls

    def saved_spec(self) -> dict:
        """What, besides its tensors, rebuilding this layer takes (JSON)."""
        raise NotImplementedError

    @classmethod
    def from_saved(cls, get: Getter, spec: dict, dtype: torch.dtype) -> nn.Module:
        """The layer rebuilt from its tensors (``get(buffer_name)``) and :meth:`saved_spec`; ``dtype``: the model's."""
        raise NotImplementedError


class _PackedLinear(SavedLayer):
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
    SAVED_FIELDS = {"type": (str, True), "kernel": (str, True), "compute_dtype": (str, True),
                    "float_dtype": (str, False)}  # float_dtype: absent from the first files saved
    SAVED_TENSORS = ("weight_int8", "scales")
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

    def _streaming(self, device: torch.device) -> bool:
        """Offer the streaming kernel? Asked for (``kernel="stream"``) and available here."""
        if self.kernel_request != STREAM_REQUEST:
            return False
        ok, why = streaming.available(device)
        if not ok:
            log.info("%d x %d layer: no streaming kernel (%s)", self.out_features, self.in_features, why)
        return ok

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
        elif self.kernel_request not in ("packed", REFERENCE, STREAM_REQUEST):  # one named kernel, where safe + correct
            cands = [c for c in cands if c.kernel == self.kernel_request] or [fallback]
        elif self.kernel_request == STREAM_REQUEST and native.built():
            # The native kernels stream at the memory's bandwidth, but one cold call of a small layer takes tens of
            # µs, too short for a timing to tell them from ATen's reliably: a "stream" request takes them (checked;
            # the reference stays as the fallback), and the engines bench measures the whole step.
            cands = [c for c in cands if c.kernel in (STREAM, REFERENCE)]
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
                f"compute={dtype_name(self.compute_dtype)}{s}")


    def saved_spec(self) -> dict:
        req = self.compute_request
        return {"type": self.KIND, "kernel": self.kernel_request,
                "compute_dtype": req if req == "auto" else dtype_name(req), "float_dtype": dtype_name(self.float_dtype)}

    @staticmethod
    def _saved_settings(get: Getter, spec: dict, dtype: torch.dtype) -> dict:
        """The constructor keywords every packed linear takes, from its saved spec."""
        cd = spec["compute_dtype"]
        return dict(compute_dtype=cd if cd == "auto" else COMPUTE_DTYPES[cd], kernel=spec["kernel"],
                    float_dtype=COMPUTE_DTYPES.get(spec.get("float_dtype"), dtype), input_scale=get("input_scale"))


def stored_scale_dtype(compute_dtype) -> torch.dtype:
    """The dtype a new layer stores its scales (and int4 offsets) in: the compute dtype, bf16 for "auto"."""
    return torch.bfloat16 if compute_dtype == "auto" else compute_dtype


def _fresh_scales(t: torch.Tensor, compute_dtype) -> torch.Tensor:
    """Scales just computed (fp32) as a new layer stores them: in the compute dtype, bf16 for "auto" (as the
    fixed default always did); a kernel chosen in another dtype then stores them in its own (no second copy)."""
    return t.to(stored_scale_dtype(compute_dtype))


class Int8WeightOnlyLinear(_PackedLinear):
    """y = x @ (q * scale)^T + b with int8 ``q`` (one byte per weight) and a scale per output channel."""

    KIND = "int8"
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
    def from_saved(cls, get: Getter, spec: dict, dtype: torch.dtype) -> Int8WeightOnlyLinear:
        return cls(get("weight_int8"), get("scales"), get("bias"), **cls._saved_settings(get, spec, dtype))

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
                out.append(Candidate(f"{INT8PACK} {dtype_name(dt)}", INT8PACK, dt,
                                     lambda x, s=s: int8pack_mm(x, w, s)))
            # dequantize + F.linear; under torch.compile the int8 -> float conversion fuses into the matmul
            out.append(Candidate(f"{REFERENCE} {dtype_name(dt)}", REFERENCE, dt,
                                 lambda x, s=s, dt=dt: F.linear(x, w.to(dt)) * s, probe_rows=TORCH_OPS_ROWS))
        if self._streaming(device):  # reads x in the model's dtype: no cast before or after the layer
            out.append(Candidate(f"{STREAM} {dtype_name(self.float_dtype)}", STREAM, self.float_dtype,
                                 self._stream_matmul))
        return out

    def _stream_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] <= STREAM_ROWS:
            return streaming.run("int8", x2, self.weight_int8, self.scales)
        return F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scales.to(x2.dtype)

    def _apply_choice(self, cand):
        if cand.kernel == INT8PACK and self.scales.dtype != cand.dtype:
            self.scales = self.scales.to(cand.dtype)  # the kernel reads them in its dtype: stored so, no copy

    def _matmul(self, x2):
        if self.kernel == FLOAT:
            return F.linear(x2, self.weight_float)
        if self.kernel == INT8PACK:
            return int8pack_mm(x2, self.weight_int8, self.scales)
        if self.kernel == STREAM:
            return self._stream_matmul(x2)
        return F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scales.to(x2.dtype)


class Int4WeightOnlyLinear(_PackedLinear):
    """Two 4-bit weights per byte; per group of ``group_size`` inputs a scale and a zero.

    The dequantized weight is ``(q - 8) * scale + zero`` (the aten kernel's
    convention), stored as ``scales_and_zeros`` of shape (K / group_size, N, 2).
    With the aten kernel the bytes are in its own CPU-specific tiled layout;
    the state dict always holds the portable :func:`pack_int4` layout.
    """

    KIND = "int4"
    SAVED_FIELDS = {**_PackedLinear.SAVED_FIELDS, "group_size": (int, True)}
    SAVED_TENSORS = ("weight_packed", "scales_and_zeros")
    _CAST_SOURCE = "scales_and_zeros"
    _KERNELS = (INT4_CPU, INT4_CUDA)
    _LAYOUTS = (INT4_CPU, INT4_CUDA, STREAM)  # kernels that read their own byte layout (not pack_int4's)

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

    def saved_spec(self) -> dict:
        return {**super().saved_spec(), "group_size": self.group_size}

    @classmethod
    def from_saved(cls, get: Getter, spec: dict, dtype: torch.dtype) -> Int4WeightOnlyLinear:
        return cls(unpack_int4(get("weight_packed")), get("scales_and_zeros"), spec["group_size"], get("bias"),
                   **cls._saved_settings(get, spec, dtype))

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
            return cuda_int4pack(q)
        if kernel == STREAM:
            return pack_int4_halves(q, self.group_size)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)

    def _in_kernel_layout(self) -> bool:
        return self.kernel in self._LAYOUTS

    def int_weight(self) -> torch.Tensor:
        """The (N, K) integers in [0, 15], whatever layout the bytes are in."""
        if not self._in_kernel_layout():
            return unpack_int4(self.weight_packed)
        if self.kernel == STREAM:
            return unpack_int4_halves(self.weight_packed, self.group_size)
        if self.kernel == INT4_CUDA:
            where = cuda_int4_layout(self.out_features, self.in_features, self.weight_packed.device)
            q = torch.empty(self.out_features * self.in_features, dtype=torch.uint8, device=where.device)
            q[where] = nibbles(self.weight_packed)
            return q.reshape(self.out_features, self.in_features)
        where = cpu_int4_layout(self.out_features, self.in_features)
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
                out.append(Candidate(f"{fast} {dtype_name(dt)}", fast, dt,
                                     lambda x, sz=sz, op=op: op(x, store["kp"], g, sz), prepare=prepare))
            out.append(Candidate(f"{REFERENCE} {dtype_name(dt)}", REFERENCE, dt,
                                 lambda x, sz=sz: F.linear(x, self._dequant(unpack_int4(portable), sz).to(x.dtype)),
                                 probe_rows=TORCH_OPS_ROWS))
        if self._streaming(device):
            def prepare_stream():
                if "sp" not in store:
                    store["sp"] = pack_int4_halves(unpack_int4(portable), g)
                    # one output channel's scales and zeros side by side: the row the kernel streams next to them
                    store["sz"] = rows_major(self.scales_and_zeros)

            out.append(Candidate(f"{STREAM} {dtype_name(self.float_dtype)}", STREAM, self.float_dtype,
                                 lambda x: self._stream_matmul(x, store["sp"], store["sz"]), prepare=prepare_stream))
        self._store = store
        return out

    def _stream_matmul(self, x2: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] <= STREAM_ROWS:
            return streaming.run("int4", x2, packed, sz, self.group_size)
        return F.linear(x2, self._dequant(unpack_int4_halves(packed, self.group_size), sz).to(x2.dtype))

    def _apply_choice(self, cand):
        if cand.kernel == STREAM:
            if "sp" not in self._store:
                cand.prepare()
            self.weight_packed = self._store["sp"]
            self.scales_and_zeros = self._store["sz"]
        elif cand.kernel in (INT4_CPU, INT4_CUDA):
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
        if self.kernel == STREAM:
            return self._stream_matmul(x2, self.weight_packed, sz)
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


class Int4A8Linear(Int4WeightOnlyLinear):
    """W4A8: the int4 layer (groups of 32) with its activations rounded to int8 per group of 32 at run time.

    llama.cpp's Q4_0 x Q8_0. Rounding the activations lets the decode kernel multiply integers: the native
    kernel (``kernel="stream"``, AVX512-VNNI) takes two integer dot-product instructions per 128 weights where
    the bf16 path takes four, and the int4 path is bound by its instructions, not its bytes. Every other kernel
    (and the reference) computes the same numbers on the rounded activations
    (:func:`.primitives.round_activation_groups`), so the layer's output never depends on which kernel ran.
    """

    KIND = "w4a8"
    GROUP = 32  # the activations' group: the weights' group, so one scale per lane of the kernel's sums

    def __init__(self, q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, *args, **kwargs):
        if group_size != self.GROUP:
            raise ValueError(f"W4A8 rounds the activations in the weights' groups of {self.GROUP}; got "
                             f"group_size={group_size} (use QuantConfig(bits=4, group_size=32, activations='int8'))")
        super().__init__(q, scales_and_zeros, group_size, *args, **kwargs)

    def _rounded(self, x: torch.Tensor) -> torch.Tensor:
        """The activations every path multiplies, in their own dtype."""
        return round_activation_groups(x, self.GROUP).to(x.dtype)

    def _on_rounded(self, c: Candidate) -> Candidate:
        return replace(c, run=lambda x, run=c.run: run(self._rounded(x)))

    def _reference(self, device):
        ref = super()._reference(device)
        return lambda x: ref(round_activation_groups(x, self.GROUP))  # float32: the reference rounds nothing else

    def _candidates(self, device):
        # the weight-only candidates, each fed the rounded activations; the streaming one rounds in its kernel
        return [c if c.kernel == STREAM else self._on_rounded(c) for c in super()._candidates(device)]

    def _float_candidate(self) -> Candidate:
        return self._on_rounded(super()._float_candidate())

    def _stream_matmul(self, x2: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] <= STREAM_ROWS:
            return streaming.run("int4_a8", x2, packed, sz)
        return super()._stream_matmul(self._rounded(x2), packed, sz)

    def _matmul(self, x2):
        if self.kernel == STREAM:
            return self._stream_matmul(x2, self.weight_packed, self.scales_and_zeros)
        return super()._matmul(self._rounded(x2))


class Int8DynamicLinear(_PackedLinear):
    """W8A8: int8 weights (a scale per output channel) times int8 activations (a scale per token, found at run time).

    y = (q_x @ q_w^T) * s_x * s_w + b, the product accumulated in int32 (``torch._int_mm``). Rounding the
    activations too is what lets integer arithmetic do the work; its error is the activations' outliers'
    doing, which smoothing (``input_scale``, SmoothQuant) moves into the weights.
    """

    KIND = "w8a8"
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
    def from_saved(cls, get: Getter, spec: dict, dtype: torch.dtype) -> Int8DynamicLinear:
        return cls(get("weight_int8"), get("scales"), get("bias"), **cls._saved_settings(get, spec, dtype))

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
            return int_mm_padded(q, w).float() * s * ws

        cuda_ok = device.type != "cuda" or (self.in_features % 8 == 0 and self.out_features % 8 == 0)
        if self.kernel_request != REFERENCE and cuda_ok:
            out.append(Candidate(INT_MM, INT_MM, torch.float32, int_mm))
        # fp16 is no candidate: sums of int8 products overflow its range (65504) at any useful width
        for dt in [d for d in self._dtypes() if d != torch.float16] or [torch.float32]:
            def deq(x, dt=dt):  # the same integers through a float matmul (exact in bf16: |q| <= 127)
                q, s = quantize_activations(x)
                return F.linear(q.to(dt), w.to(dt)).float() * s * ws
            out.append(Candidate(f"{REFERENCE} {dtype_name(dt)}", REFERENCE, dt, deq, probe_rows=TORCH_OPS_ROWS))
        return out

    def _apply_choice(self, cand):
        pass

    def _matmul(self, x2):
        if self.kernel == FLOAT:
            return F.linear(x2, self.weight_float)
        q, s = quantize_activations(x2)
        if self.kernel == INT_MM:
            return int_mm_padded(q, self.weight_int8).float() * s * self.scales
        dt = torch.float32 if self.compute_dtype == torch.float16 else self.compute_dtype
        return F.linear(q.to(dt), self.weight_int8.to(dt)).float() * s * self.scales


PACKED_LINEARS = (Int8WeightOnlyLinear, Int4WeightOnlyLinear, Int8DynamicLinear)


class Int8Embedding(SavedLayer):
    """Embedding lookup from int8 rows with a scale per row; can share storage with an int8 lm_head."""

    KIND = "int8_embedding"
    SAVED_FIELDS = {"type": (str, True), "out_dtype": (str, True)}
    SAVED_TENSORS = ("weight_int8", "scales")

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

    def saved_spec(self) -> dict:
        return {"type": self.KIND, "out_dtype": str(self.out_dtype)[6:]}

    @classmethod
    def from_saved(cls, get: Getter, spec: dict, dtype: torch.dtype) -> Int8Embedding:
        return cls(get("weight_int8"), get("scales"), dtype)


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` holds packed int8/int4 layers from :func:`~course_lib.quantization.quantize_`."""
    return any(isinstance(m, SavedLayer) for m in model.modules())


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted) was."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def packed_linear(lin: nn.Linear, cfg: QuantConfig, qt: Quantized | None = None, weight: torch.Tensor | None = None,
                  input_scale: torch.Tensor | None = None) -> nn.Module:
    """The packed layer ``cfg`` asks for in place of ``lin``: holding ``qt`` (the integers a method chose, e.g.
    GPTQ's), or else ``weight`` (default ``lin.weight``; AWQ / SmoothQuant pass it multiplied by their scales, with
    ``input_scale`` undoing them on the input) rounded to nearest."""
    dt, fd, kernel = cfg.dtype(), lin.weight.dtype, cfg.kernel
    w = lin.weight if weight is None else weight
    if cfg.activations == "int8" and cfg.bits == 4:
        if qt is None:
            qt = quantize(w, 4, symmetric=False, granularity="per_group", group_size=cfg.group_size)
        return Int4A8Linear.from_quantized(qt, lin.bias, dt, kernel, fd, input_scale)
    if cfg.activations == "int8":
        if qt is None:
            qt = quantize(w, 8, symmetric=True, granularity="per_channel")
        return Int8DynamicLinear(qt.q, qt.scale, lin.bias, dt, kernel, fd, input_scale)
    if qt is None and cfg.bits == 8:
        qt = quantize(w, 8, symmetric=True, granularity="per_channel")
    elif qt is None:
        qt = quantize(w, 4, symmetric=False, granularity="per_group", group_size=cfg.group_size)
    if cfg.bits == 8:
        return Int8WeightOnlyLinear(qt.q, _fresh_scales(qt.scale, dt), lin.bias, dt, kernel, fd, input_scale)
    return Int4WeightOnlyLinear.from_quantized(qt, lin.bias, dt, kernel, fd, input_scale)

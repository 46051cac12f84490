"""Decode kernels that stream: a matrix-vector product written as one reduction that inductor compiles.

At one row of activations (a decode step) a matmul is a matrix-vector product: every weight is read once and
used for one multiply-add, so the kernel's speed is the speed it reads the weights at. The ATen kernels a CPU
decode step calls for it (``F.linear``, ``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) are tuned for
many rows and read a weight matrix well below the memory's bandwidth at one. The same product written as a
broadcast multiply and a sum over the input dimension, ``(x.float()[:, None, :] * w.float()).sum(-1)``, is one
reduction that ``torch.compile`` (inductor) turns into a single vectorized loop: each weight is loaded once,
converted in registers and accumulated in float32; int8 weights are scaled after the sum (one scale per output
channel), int4 nibbles are unpacked in registers and each group's scale and offset applied to its partial sum.
(Measured cold on one 2-core machine, that loop read no faster than ``F.linear``: it requests nothing ahead, so
a core waits on memory. The native kernels below prefetch; docs/decode.md has the numbers.) gpt-fast's GPU
form ``F.linear(x, w.to(dtype)) * scale`` does the opposite on a CPU: it writes the whole float weight first.

The kernels here pass the checks of the kernel choice (:mod:`.kernel_choice`) like every kernel; the compiled
reductions are also *timed* against the ATen kernels and never assumed faster, while the native kernels below,
where built, are taken once checked (a single cold call of a small layer is too short to time reliably; the
engines bench measures the whole step):

* the packed layers offer them for ``kernel="stream"`` (:func:`int8_gemv`, :func:`int4_gemv`; int4 in
  :func:`pack_int4_halves` layout, where the two nibbles of a byte are the two halves of a group, so each
  half of the activations is read contiguously);
* :func:`stream_` swaps a float model's ``nn.Linear`` layers for :class:`StreamingLinear`, which measures
  ``F.linear`` against :func:`float_gemv` per shape.

Where this machine can build them, the native kernels of :mod:`.native` (the same products written by hand in
C++, with the rows ahead prefetched: inductor's loop leaves a core waiting on memory at about half the
bandwidth) do the work instead of the reductions; :func:`implementation` says which runs. Either reads the weight
once per row, so it only serves up to :data:`STREAM_ROWS` rows; more rows (a prompt's prefill) take the
layer's other path. Outside a compiled region the reductions run through one ``torch.compile`` per kernel
(dynamic shapes: a layer of a new shape does not recompile); inside one (the compiled decode step) they, or the
native kernels' operators, are traced into the step's own graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..device import compile_supported, own_code
from . import kernel_choice, native
from .kernel_choice import Candidate
from .primitives import round_activation_groups

log = logging.getLogger(__name__)

STREAM = "streaming GEMV"  # the kernel's name in the choice table and layer.kernel (native or reduction)
STREAM_REQUEST = "stream"  # kernel= request: the native kernels where built, else the packed ones plus these
STREAM_ROWS = 2  # the reduction reads the weight once per row: beyond this many rows the layer's other path runs
LINEAR = "F.linear"
PROFILE_EVENT = "course_lib.streaming"  # what a call from eager code is recorded as, when a profiler runs


# --- the kernels (plain torch: what inductor compiles) -------------------------------------


def float_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(R, K) x (N, K) float weights -> (R, N) float32, as one reduction over K."""
    return (x.float()[:, None, :] * w.float()).sum(-1)


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(R, K) x (N, K) int8 with a scale per output channel -> (R, N) float32; the scale multiplies the sum."""
    return (x.float()[:, None, :] * q.float()).sum(-1) * scales.float()


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(R, K) x int4 weights -> (R, N) float32.

    ``packed``: (N, K/2) uint8 in :func:`pack_int4_halves` layout; ``scales_and_zeros``: (K/g, N, 2), the weight
    being ``(q - 8) * scale + zero`` per group (the layer's convention). Per group: the partial sum of x times
    ``q - 8``, times the group's scale, plus the zero times the group's sum of x.
    """
    r, n, half = x.shape[0], packed.shape[0], group_size // 2
    groups = x.shape[1] // group_size
    xg = x.float().reshape(r, 1, groups, 2, half)
    p = packed.reshape(n, groups, half)
    lo = (p & 15).float() - 8
    hi = (p >> 4).float() - 8
    part = (xg[:, :, :, 0] * lo + xg[:, :, :, 1] * hi).sum(-1)  # (R, N, groups)
    scale = scales_and_zeros[..., 0].float().t()  # (N, groups)
    zero = scales_and_zeros[..., 1].float().t()
    return (part * scale).sum(-1) + (xg.sum((-1, -2)) * zero).sum(-1)


def int4_a8_gemv(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """W4A8: x rounded to int8 per group of 32 (:func:`.primitives.round_activation_groups`), times int4 weights
    in groups of 32 -> (R, N) float32 (the native kernel multiplies the integers; this is the same product)."""
    return int4_gemv(round_activation_groups(x, 32), packed, scales_and_zeros, 32)


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"float": float_gemv, "int8": int8_gemv, "int4": int4_gemv,
                                                   "int4_a8": int4_a8_gemv}
_COMPILED: dict[tuple, Callable[..., torch.Tensor]] = {}


def _compiled(key: tuple) -> Callable[..., torch.Tensor]:
    """The compiled kernel for one (kind, dtypes, grad mode): each gets its own copy of the function's code, since
    dynamo keeps at most ``recompile_limit`` (8) graphs per code object and fails (fullgraph) beyond; one copy per
    key leaves each with a few (one row or several, weights that require grad or not)."""
    return torch.compile(own_code(KERNELS[key[0]]), dynamic=True, fullgraph=True)


def implementation() -> str:
    """Which kernels :func:`run` calls here: the native C++ ones, or the compiled reductions (and why)."""
    ok, why = native.available()
    return "native C++ (csrc/gemv.cpp)" if ok else f"compiled reductions (native kernels: {why})"


def _native(kind: str, args: tuple) -> bool:
    """Can the native kernel take this call? (built here; up to :func:`.native.max_rows` rows, no gradient; int4
    groups of 32k)"""
    x = args[0]
    if x.device.type != "cpu" or x.shape[0] > native.max_rows(kind, x, args[1]) or (torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return False
    if (kind == "int4" and args[3] % 32) or (kind == "int4_a8" and not native.vnni()):
        return False
    return native.ready()


def run(kind: str, *args) -> torch.Tensor:
    """Run kernel ``kind`` (of :data:`KERNELS`): the native kernel where built, else the reduction; traced into
    the caller's graph when compiling, else the reduction compiled once per kind, dtypes and grad mode (dynamic
    shapes: a layer of a new shape reuses the graph)."""
    if _native(kind, args):
        return native.KERNELS[kind](*args)
    if torch.compiler.is_compiling():
        return KERNELS[kind](*args)
    key = (kind, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
           *(a.dtype for a in args if isinstance(a, torch.Tensor)))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = _compiled(key)
    if torch.autograd.profiler._is_profiler_enabled:  # named in a profile (anatomy.profile_step); free otherwise
        with torch.profiler.record_function(f"{PROFILE_EVENT} {kind}"):
            return compiled(*args)
    return compiled(*args)


def available(device: torch.device) -> tuple[bool, str]:
    """Can the streaming kernels be offered here? CPU with inductor's C++ backend only (other devices: not tested)."""
    if device.type != "cpu":
        return False, f"the streaming kernels are offered on the CPU only (not {device.type})"
    if native.available()[0]:  # built now, at choice time: a compiled step only asks native.built()
        return True, ""
    return compile_supported(device)


# --- the int4 layout they read ---------------------------------------------------------------


def pack_int4_halves(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) integers in [0, 15] -> (N, K/2) uint8: in each group the low nibbles hold its first half, the high
    nibbles its second half (so each half of a group's activations is one contiguous run)."""
    n, k = q.shape
    if group_size % 2 or k % group_size:
        raise ValueError(f"group_size must be even and divide in_features ({k}), got {group_size}")
    g = q.to(torch.uint8).reshape(n, k // group_size, 2, group_size // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4_halves(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_halves`: (N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    n, half = packed.shape[0], group_size // 2
    p = packed.reshape(n, -1, half)
    return torch.stack([p & 15, p >> 4], 2).reshape(n, -1)


# --- float layers ------------------------------------------------------------------------------


class StreamingLinear(nn.Linear):
    """An ``nn.Linear`` whose few-row kernel is measured here: ``F.linear`` or the streaming reduction.

    Same parameters (shared with the layer it replaced, so tied weights stay tied), same state dict; only the
    kernel differs, and only at up to :data:`STREAM_ROWS` rows. ``choice`` holds every candidate's time.
    """

    kernel: str = LINEAR
    choice: kernel_choice.Choice | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> StreamingLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias  # the same Parameters
        new.select()
        return new

    def _stream(self, x2: torch.Tensor) -> torch.Tensor:
        # detached: dynamo gives a Parameter static shapes (force_parameter_static_shapes), so every layer shape
        # would compile its own graph and the ninth would hit the recompile limit
        y = run("float", x2, self.weight.detach())
        return y if self.bias is None else y + self.bias.float()

    def select(self) -> kernel_choice.Choice:
        """Measure (or take the cached choice for this shape and dtype) and keep the fastest correct kernel."""
        w, dev = self.weight, self.weight.device
        dt = w.dtype
        name = str(dt).removeprefix("torch.")
        cands = [Candidate(f"{LINEAR} {name}", LINEAR, dt, lambda x: F.linear(x, self.weight, self.bias))]
        ok, why = available(dev)
        if ok:
            cands.append(Candidate(f"{STREAM} {name}", STREAM, dt, lambda x: self._rows(x), preferred=False))
            if native.built():  # too short a call to time reliably: the native kernel is taken (see layers._select)
                cands = cands[1:]
        else:
            log.info("%d x %d layer: no streaming kernel (%s)", self.out_features, self.in_features, why)
        ref_w = w.detach()[:64].float()
        ref_b = None if self.bias is None else self.bias.detach()[:64].float()

        def reference(x):
            return F.linear(x.float(), ref_w, ref_b)

        # the packed layers' key shape (type, N, K, group, request, compute, float dtype, device): one choice table
        key = ("StreamingLinear", self.out_features, self.in_features, None, STREAM_REQUEST, str(dt), dt, dev.type,
               dev.index)
        probes = kernel_choice.Probes(reference, self.in_features, dev)
        with torch.no_grad():
            self.choice = kernel_choice.choose(key, cands, probes, self.in_features, dev)
        self.kernel = self.choice.kernel
        return self.choice

    def _rows(self, x2: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x2, self.weight, self.bias)
        rows = x2.shape[0]
        if rows <= STREAM_ROWS or _native("float", (x2, self.weight)):  # bf16: up to 16 rows, the weight read once
            return self._stream(x2).to(x2.dtype)
        return F.linear(x2, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != STREAM:
            return F.linear(x, self.weight, self.bias)
        y = self._rows(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel}"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each tensor counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def streams_from_memory(model: nn.Module) -> bool:
    """Is the model bigger than the last-level cache (so a decode step reads it from memory: time kernels cold)?"""
    dev = next((t.device for t in model.parameters()), torch.device("cpu"))
    return weight_bytes(model) > kernel_choice.last_level_cache_bytes(dev)


def stream_(model: nn.Module, cold: bool | None = None) -> dict[str, str]:
    """Swap every plain ``nn.Linear`` of a float model for a :class:`StreamingLinear`, in place; name -> kernel.

    Each shape's kernel is measured once (``F.linear`` or the streaming reduction, whichever is faster at one
    row), timed cold when ``cold`` is True, or, with ``cold=None``, when the model is bigger than the
    last-level cache. Compiling the reduction takes seconds to a minute the first time in a process.
    """
    if cold is not None and not isinstance(cold, bool):
        raise ValueError(f"cold must be True, False or None (decide from the model's size), got {cold!r}")
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    if not targets:
        raise ValueError("the model has no plain nn.Linear layer to stream (stream_ takes float nn.Linear layers; "
                         "a quantized model streams through quantize_(model, preset('int8-wo-stream')))")
    out = {}
    with kernel_choice.timed_cold(streams_from_memory(model) if cold is None else cold):
        for name, lin in targets:
            new = StreamingLinear.from_linear(lin)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            out[name] = new.kernel
    return out

"""Where the parameters are and where the time goes: the anatomy of a decoder LM.

Used by the core-concepts chapter: parameters -> bytes -> FLOPs per token, and
a profile of one decode step grouped into kinds of work; the engines bench: ATen calls per step and the share of
a step in weight matmuls (:func:`profile_step`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from .device import device_of
from .generation import hf_forward
from .quantization.streaming import PROFILE_EVENT as STREAM_EVENT
from .timing import synchronize

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


def parameter_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per component: embedding, attention, mlp, norm, lm_head (tied weights counted once)."""
    out: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embed" in name:
            kind = "embedding"
        elif "lm_head" in name:
            kind = "lm_head"
        elif "self_attn" in name or "attention" in name:
            kind = "attention"
        elif "mlp" in name:
            kind = "mlp"
        elif "norm" in name:
            kind = "norm"
        else:
            kind = "other"
        out[kind] += p.numel()
    return dict(out)


def estimated_weight_bytes(n_params: int, fmt: str = "fp32") -> float:
    """Bytes ``n_params`` weights would take in ``fmt`` (fp32, bf16, fp16, int8, int4): count x bytes per weight.

    An estimate from a parameter count (scales and packing ignored); what a real model holds, as stored, is
    :func:`course_lib.metrics.stored_weight_bytes`.
    """
    if fmt not in BYTES_PER_PARAM:
        raise ValueError(f"unknown format {fmt!r}; choose from {sorted(BYTES_PER_PARAM)}")
    return n_params * BYTES_PER_PARAM[fmt]


def matmul_flops_per_token(model: torch.nn.Module) -> int:
    """FLOPs of the weight matmuls for one token: 2 x (inputs x outputs) for every Linear.

    The embedding is a lookup (no FLOPs); the LM head is a Linear even when
    tied to the embedding. Attention over the context adds 4 x layers x
    context x hidden more, which grows with the context (see the roofline chapter).
    """
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


_KINDS = (
    ("matmul", ("addmm", "mm", "bmm", "matmul", "linear")),
    ("attention", ("scaled_dot_product", "softmax", "flash", "efficient_attention")),
    ("norm", ("rsqrt", "pow", "mean", "rms_norm", "layer_norm")),
    ("elementwise", ("mul", "add", "silu", "neg", "cat", "sub", "div", "exp", "sigmoid")),
    ("copy / layout", ("copy_", "to", "contiguous", "clone", "view", "reshape", "transpose",
                       "slice", "select", "expand", "index", "empty", "zeros", "unsqueeze", "t")),
)


def _kind_of(op: str) -> str:
    name = op.removeprefix("aten::")
    for kind, keys in _KINDS:
        if any(name == k or name.startswith(k + "_") or (k in name and len(k) > 3) for k in keys):
            return kind
    return "other"


@torch.inference_mode()
def profile_decode_step(model, context: int = 64, steps: int = 5) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Profile ``steps`` single-token decode steps after a ``context``-token prefill.

    Returns (milliseconds per step by kind of work, top operators by self time).
    The gap between the profiled total and the wall time of the same steps is
    Python and framework overhead, reported as its own kind.
    """
    if context < 1 or steps < 1:
        raise ValueError("context and steps must be >= 1")
    device = device_of(model)
    on_cuda = device.type == "cuda"
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0)).to(device)
    logits, past = hf_forward(model, ids)
    nxt = logits.argmax(-1, keepdim=True)
    hf_forward(model, nxt, past)  # warm-up step
    # On CUDA an operator's CPU time is only its launch: the work is the kernel's time on the GPU, which the
    # profiler records with the CUDA activity (and the loop is synchronized so the wall time counts it too).
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, past = hf_forward(model, nxt, past)
            nxt = logits.argmax(-1, keepdim=True)
        synchronize(device)
        wall = time.perf_counter() - t0
    by_kind: dict[str, float] = defaultdict(float)
    ops = []
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        us = (getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)) if on_cuda \
            else ev.self_cpu_time_total
        ms = us / 1e3 / steps
        by_kind[_kind_of(ev.key)] += ms
        ops.append((ev.key, ms))
    # The profiler itself slows Python down, so this "overhead" is an upper bound.
    by_kind["python / framework"] = max(0.0, wall * 1e3 / steps - sum(by_kind.values()))
    ops.sort(key=lambda x: -x[1])
    return dict(by_kind), ops[:12]


# The kernels that multiply by a weight matrix: ATen's and the native ones (self time), and the streaming
# reductions (their own events)
WEIGHT_MATMULS = ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
                  "aten::_weight_int4pack_mm", "aten::_int_mm", "course_lib::gemv_float", "course_lib::gemv_int8",
                  "course_lib::gemv_int4", "course_lib::gemv_int4_a8")  # the last four: the native decode kernels
_NOT_A_MATVEC = ("mean", "amax", "exp", "softmax", "rsqrt", "pow", "max", "argmax")


def is_matrix_kernel(name: str) -> bool:
    """Does a profiler event name a weight matmul: an ATen matmul, a streaming kernel called from eager code
    (``course_lib.streaming ...``), or a kernel inductor generated for a reduction that is a matrix-vector product
    (``graph_N_cpp_fused_..._sum_M``, named in a profile when compiled with inductor's
    ``cpp.enable_kernel_profile``, without a norm's or a softmax's ops)?"""
    if name in WEIGHT_MATMULS or name.startswith(STREAM_EVENT):
        return True
    return "cpp_fused" in name and "_sum" in name and not any(k in name for k in _NOT_A_MATVEC)


@torch.inference_mode()
def profile_step(step: Callable[[], object], steps: int = 3) -> dict[str, float]:
    """Profile ``steps`` calls of one decode step (after one unprofiled call): ATen calls per step, the step's
    milliseconds under the profiler, the part in weight matmuls (:func:`is_matrix_kernel`) and its share.

    The profiler adds a cost per recorded call, so the shares of a step made of many small calls lean towards
    "everything else"; the ATen count is exact.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    events = prof.events()
    aten = sum(1 for e in events if e.name.startswith("aten::"))
    matrix_us = sum(e.cpu_time_total if not e.name.startswith("aten::") else e.self_cpu_time_total
                    for e in events if is_matrix_kernel(e.name))
    step_ms = wall * 1e3 / steps
    matrix_ms = min(matrix_us / 1e3 / steps, step_ms)
    return {"aten_calls": aten / steps, "step_ms": step_ms, "matrix_ms": matrix_ms,
            "matrix_share": matrix_ms / step_ms if step_ms > 0 else 0.0}

"""The roofline model of LLM inference: how fast *can* this machine go?

A step of the model has to move some bytes (weights, KV cache, activations)
and do some arithmetic (FLOPs). Neither can go faster than the hardware
allows, so a step takes at least

    max(bytes / bandwidth, FLOPs / peak FLOP/s)  (+ a fixed per-step overhead)

* **decode** (one new token per sequence) reads *every weight once* to do ~2
  FLOPs per weight per sequence: about 1 FLOP per byte at batch 1 in bf16, far
  below what any chip can compute per byte moved. It is memory-bound: tokens/s
  ~ bandwidth / model bytes. Fewer bytes per weight (quantization) or more
  sequences per weight read (batching) are what speed it up.
* **prefill** (the whole prompt at once) does T times more arithmetic for the
  same weight read: compute-bound for prompts of more than a few hundred tokens.

This module measures the two machine figures - the compute peak with a
compute-bound square matmul, the bandwidth with a streaming read - and, apart
from them, what a matrix-vector product (the decode step's own kernel) achieves.
It counts bytes and FLOPs from a model config and predicts step latency. The *per-step overhead* (Python, the
framework, kernel launches) is measured, not guessed: it is the decode time of
a model with the same depth but almost no width.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field

import torch

from ._checks import check_int, check_number

log = logging.getLogger(__name__)

DTYPE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}
BANDWIDTH_KINDS = ("read", "copy", "triad")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- measuring the machine -------------------------------------------------------

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
    from .timing import benchmark

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
    from .timing import benchmark

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
    from .timing import benchmark

    check_int("rows", rows, 1)
    check_int("cols", cols, 1)

    dev = torch.device(device)
    w = torch.randn(rows, cols, device=dev).to(dtype)
    x = torch.randn(1, cols, device=dev).to(dtype)
    res = benchmark(lambda: torch.nn.functional.linear(x, w), warmup=2, repeat=repeat, device=dev)
    return w.numel() * w.element_size() / res.median / 1e9


@dataclass(frozen=True)
class Hardware:
    """The two roofline figures of a machine, and where they come from.

    ``bandwidth_gbs`` and ``gflops`` are the roofs: a streaming read and a
    compute-bound matmul (or a vendor's spec sheet). ``gemv_gbs`` is not a roof
    but what a batch-1 linear layer achieved here, kept apart so it can be
    compared with them.
    """

    name: str
    bandwidth_gbs: float
    gflops: dict  # dtype name ("fp32", "bf16", "fp16") -> peak GFLOP/s of a compute-bound matmul
    source: str  # "measured on this machine" or a vendor spec sheet
    # dtype -> GB/s of weights a batch-1 linear layer streams (measured; empty for vendor figures).
    gemv_gbs: dict = field(default_factory=dict)
    matmul_gflops: dict = field(default_factory=dict)  # the square-matmul figures behind gflops (measured only)
    matmul_n: dict = field(default_factory=dict)  # dtype -> the matmul size that reached the peak (measured only)

    def __post_init__(self):
        check_number("bandwidth_gbs", self.bandwidth_gbs, "> 0 and finite (GB/s)", lambda v: 0 < v < math.inf)
        for name, figures in (("gflops", self.gflops), ("gemv_gbs", self.gemv_gbs)):
            unknown = set(figures) - set(DTYPE_BITS)
            if unknown:
                raise ValueError(f"unknown dtype keys {sorted(unknown)} in {name}; use {sorted(DTYPE_BITS)}")
            bad = {k: v for k, v in figures.items()
                   if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < math.inf}
            if bad:
                raise ValueError(f"{name} figures must be > 0, got {bad}")

    def ridge(self, dtype: str) -> float:
        """FLOPs per byte where the roofs meet: a step left of it is memory-bound, right of it compute-bound."""
        return self.peak(dtype) / self.bandwidth_gbs

    def gemv_gflops(self, dtype: str) -> float | None:
        """GFLOP/s a batch-1 linear layer achieved (2 FLOPs per weight streamed); None if not measured."""
        gbs = self.gemv_gbs.get(dtype)
        return None if gbs is None else 2 * gbs / (DTYPE_BITS[dtype] / 8)

    def peak(self, dtype: str) -> float:
        """Peak GFLOP/s for ``dtype``; int8/int4 weight-only layers compute in bf16."""
        key = "bf16" if dtype in ("int8", "int4") and dtype not in self.gflops else dtype
        if key not in self.gflops:
            raise ValueError(f"{self.name} has no {dtype} figure; known: {sorted(self.gflops)}")
        return self.gflops[key]


# Published figures (vendor spec sheets: peak memory bandwidth, dense tensor-core
# throughput without sparsity). Real kernels reach roughly 60-90 % of these.
VENDOR_PRESETS: dict[str, Hardware] = {
    "NVIDIA H200 SXM (vendor spec)": Hardware("NVIDIA H200 SXM", 4800, {"fp32": 67_000, "bf16": 989_000,
                                                                        "fp16": 989_000}, "vendor spec sheet"),
    "NVIDIA H100 SXM (vendor spec)": Hardware("NVIDIA H100 SXM", 3350, {"fp32": 67_000, "bf16": 989_000,
                                                                        "fp16": 989_000}, "vendor spec sheet"),
    "NVIDIA A100 80GB SXM (vendor spec)": Hardware("NVIDIA A100 80GB SXM", 2039,
                                                   {"fp32": 19_500, "bf16": 312_000, "fp16": 312_000},
                                                   "vendor spec sheet"),
    "NVIDIA RTX 4090 (vendor spec)": Hardware("NVIDIA RTX 4090", 1008, {"fp32": 82_600, "bf16": 165_200,
                                                                        "fp16": 165_200}, "vendor spec sheet"),
    "NVIDIA L4 (vendor spec)": Hardware("NVIDIA L4", 300, {"fp32": 30_300, "bf16": 121_000, "fp16": 121_000},
                                        "vendor spec sheet"),
    "NVIDIA T4 (vendor spec)": Hardware("NVIDIA T4", 320, {"fp32": 8_100, "fp16": 65_000}, "vendor spec sheet"),
}


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
    from .timing import supported_dtypes

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


# --- counting bytes and FLOPs ----------------------------------------------------

@dataclass(frozen=True)
class ModelDims:
    """Shapes of a Llama-family model, read from a Hugging Face config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, cfg) -> ModelDims:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                   cfg.num_key_value_heads or cfg.num_attention_heads, head_dim, cfg.vocab_size)

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one block's linear layers: q, k, v, o projections and the SwiGLU MLP."""
        d, hd = self.hidden, self.head_dim
        attn = d * self.heads * hd * 2 + d * self.kv_heads * hd * 2
        return attn + 3 * d * self.intermediate

    @property
    def decode_params(self) -> int:
        """Weights read in one decode step: every block plus the output head (embeddings: one row, ignored)."""
        return self.layers * (self.layer_matmul_params + 2 * self.hidden) + self.vocab * self.hidden + self.hidden

    def kv_bytes_per_token(self, kv_bits: int = 16) -> float:
        """Cache bytes one token adds: K and V, every layer, every KV head."""
        return self.layers * 2 * self.kv_heads * self.head_dim * kv_bits / 8


@dataclass(frozen=True)
class StepCost:
    """Bytes moved and FLOPs done by one forward step."""

    phase: str  # "decode" or "prefill"
    batch: int
    tokens: int  # new tokens per sequence in this step (1 for decode)
    context: int  # tokens already in the cache before this step
    weight_bytes: float
    kv_bytes: float
    act_bytes: float
    flops: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.act_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte: where the step sits on the roofline's x axis."""
        return self.flops / self.bytes


def _dims(config) -> ModelDims:
    return config if isinstance(config, ModelDims) else ModelDims.from_config(config)


def _check(batch: int, weight_bits: float, kv_bits: float, act_bits: float) -> None:
    # bool is refused (batch=True is a slip, not 1), and so are fractional counts and NaN/inf bits: each would
    # give a byte count that looks like a prediction
    check_int("batch", batch, 1)
    for name, bits in (("weight_bits", weight_bits), ("kv_bits", kv_bits), ("act_bits", act_bits)):
        check_number(name, bits, "> 0 and finite (e.g. 32, 16, 8, 4)", lambda v: 0 < v < math.inf)


def decode_cost(config, batch: int = 1, context: int = 128, weight_bits: float = 16, kv_bits: float = 16,
                act_bits: float = 16) -> StepCost:
    """One decode step: each of ``batch`` sequences adds one token after ``context`` cached ones."""
    m = _dims(config)
    _check(batch, weight_bits, kv_bits, act_bits)
    check_int("context", context, 0, " (tokens already cached)")
    weight_bytes = m.decode_params * weight_bits / 8  # read once, shared by the whole batch
    kv_bytes = batch * m.kv_bytes_per_token(kv_bits) * (context + 1)  # read the cache, write one slot
    # Activations: a handful of hidden-size and intermediate-size vectors per layer, plus the logits.
    act_bytes = batch * (m.layers * (10 * m.hidden + 4 * m.intermediate) + m.vocab) * act_bits / 8
    attn_flops = m.layers * 4 * m.heads * m.head_dim * (context + 1)  # q.k and p.v over the context
    flops = batch * (2 * (m.decode_params - m.layers * 2 * m.hidden - m.hidden) + attn_flops)
    return StepCost("decode", batch, 1, context, weight_bytes, kv_bytes, act_bytes, flops)


def prefill_cost(config, batch: int = 1, prompt_len: int = 128, weight_bits: float = 16, kv_bits: float = 16,
                 act_bits: float = 16) -> StepCost:
    """Prefill of ``prompt_len`` tokens per sequence (logits for the last position only)."""
    m = _dims(config)
    _check(batch, weight_bits, kv_bits, act_bits)
    check_int("prompt_len", prompt_len, 1)
    t = prompt_len
    weight_bytes = m.decode_params * weight_bits / 8
    kv_bytes = batch * m.kv_bytes_per_token(kv_bits) * t  # written once
    act_bytes = batch * t * m.layers * (10 * m.hidden + 4 * m.intermediate) * act_bits / 8
    attn_flops = m.layers * 2 * m.heads * m.head_dim * t * (t + 1)  # causal: half of the T x T pairs
    flops = batch * (2 * t * m.layers * m.layer_matmul_params + 2 * m.vocab * m.hidden + attn_flops)
    return StepCost("prefill", batch, t, 0, weight_bytes, kv_bytes, act_bytes, flops)


# --- predicting ------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """Predicted time of one step, and which limit sets it."""

    seconds: float
    memory_s: float  # every byte at the streaming-read bandwidth (the memory roof)
    compute_s: float  # every FLOP at the matmul peak (the compute roof)
    overhead_s: float
    bound: str  # "memory", "compute" (which roof is higher) or "overhead"
    tokens_per_s: float  # tokens produced (decode) or consumed (prefill) per second, whole batch
    kernel_s: float = 0.0  # the memory side with weights at the rate a GEMV achieved here (= memory_s if unknown)


def predict(cost: StepCost, hw: Hardware, compute_dtype: str = "bf16", overhead_s: float = 0.0,
            bandwidth_gbs: float | None = None) -> Prediction:
    """max(bytes / bandwidth, FLOPs / peak) + overhead, for one step on ``hw``.

    ``bound`` compares the two roofs (equivalently: the step's FLOPs per byte
    against the ridge). The predicted time streams the weights at the rate a
    matrix-vector product achieved for ``compute_dtype`` when the machine has
    that figure (what a linear layer really gets; ``kernel_s``), everything else
    at the read bandwidth. ``bandwidth_gbs`` overrides both rates.
    """
    check_number("overhead_s", overhead_s, ">= 0 and finite (seconds per step)", lambda v: 0 <= v < math.inf)
    if bandwidth_gbs is not None:  # 0 would silently fall back to the machine's figure
        check_number("bandwidth_gbs", bandwidth_gbs, "> 0 and finite (GB/s), or None (the machine's figure)",
                     lambda v: 0 < v < math.inf)
    bw = bandwidth_gbs or hw.bandwidth_gbs
    weight_bw = bandwidth_gbs or hw.gemv_gbs.get(compute_dtype, bw)
    memory_s = cost.bytes / (bw * 1e9)
    kernel_s = cost.weight_bytes / (weight_bw * 1e9) + (cost.kv_bytes + cost.act_bytes) / (bw * 1e9)
    compute_s = cost.flops / (hw.peak(compute_dtype) * 1e9)
    roof = max(kernel_s, compute_s)
    bound = "overhead" if overhead_s > roof else ("memory" if memory_s >= compute_s else "compute")
    seconds = roof + overhead_s
    return Prediction(seconds, memory_s, compute_s, overhead_s, bound, cost.batch * cost.tokens / seconds, kernel_s)


def overhead_model(config, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A model with the same depth and heads as ``config`` but almost no width: its step time is overhead."""
    from transformers import AutoModelForCausalLM

    cfg = config.__class__.from_dict(config.to_dict())
    cfg.hidden_size = cfg.num_attention_heads * 8
    cfg.head_dim = 8
    cfg.intermediate_size = 16
    cfg.vocab_size = 256
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def measure_decode_step(model, context: int = 128, batch: int = 1, warmup: int = 3, repeat: int = 10):
    """Median time of one Hugging Face decode step at ``context`` cached tokens (a BenchResult).

    The cache is cropped back after each timed call, so every sample sees the
    same context length.
    """
    from .timing import benchmark

    check_int("context", context, 1, " (tokens in the cache before the timed step)")
    check_int("batch", batch, 1)
    dev = next(model.parameters()).device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, context), generator=g).to(dev)
    tok = torch.randint(0, vocab, (batch, 1), generator=g).to(dev)
    from .generation import hf_forward

    with torch.inference_mode():
        _, past = hf_forward(model, prompt)

    def step():
        hf_forward(model, tok, past)
        past.crop(-1)  # drop the token just added: every sample sees the same context

    return benchmark(step, warmup=warmup, repeat=repeat, device=dev)


def measure_step_overhead(config, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                          context: int = 128, repeat: int = 10) -> float:
    """Seconds of a decode step that moves almost no bytes: Python and framework cost per step."""
    model = overhead_model(config, dtype, device)
    return measure_decode_step(model, context=context, repeat=repeat).median


# --- the article's formula, for notebook 08 --------------------------------------

# Section 4 of the article, quoted: "V = P·C/H", with P the parameter count, C the
# computational complexity, H the hardware performance, V the inference speed; its
# example: P = 1e8, C = 1e9, H = 1e6 gives "V = 10^13"; halving P, dividing C by 4
# and doubling H gives "V' = 2.5 x 10^12", "模型的推理速度提高了约5倍" (about 5x faster).
ARTICLE_EXAMPLE = {
    "before": {"P": 1e8, "C": 1e9, "H": 1e6, "V_stated": 1e13},
    "after": {"P": 1e8 / 2, "C": 1e9 / 4, "H": 2e6, "V_stated": 2.5e12},
    "claim": "模型的推理速度提高了约5倍 (the inference speed rose about 5x)",
}


def article_formula(P: float, C: float, H: float) -> float:
    """The article's V = P * C / H, exactly as written (it is wrong: see notebook 08)."""
    return P * C / H


# --- the picture -----------------------------------------------------------------

def plot_roofline(hw: Hardware, points: list[dict] | None = None, dtype: str = "bf16", ax=None):
    """Log-log roofline of ``hw`` for ``dtype``: attainable GFLOP/s vs FLOPs per byte.

    ``points`` are dicts with ``label``, ``intensity`` (FLOP/byte) and
    ``gflops`` (achieved); they are drawn as markers. Returns the Figure.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
    else:
        fig = ax.figure
    peak = hw.peak(dtype)
    ridge = peak / hw.bandwidth_gbs
    xs = np.logspace(-2, 4, 200)
    ax.loglog(xs, np.minimum(xs * hw.bandwidth_gbs, peak), "k-", lw=2,
              label=f"{hw.name}: {hw.bandwidth_gbs:.0f} GB/s, {peak:.0f} GFLOP/s {dtype}")
    gemv = hw.gemv_gbs.get(dtype)
    if gemv:  # not a roof: what a batch-1 linear layer streamed here
        ax.loglog(xs, np.minimum(xs * gemv, peak), "k--", lw=1, label=f"achieved by a {dtype} GEMV: {gemv:.1f} GB/s")
    ax.axvline(ridge, color="grey", ls=":", lw=1)
    ax.text(ridge, peak * 0.5, f" ridge {ridge:.1f} FLOP/B", color="grey", fontsize=8)
    for p in points or []:
        ax.loglog(p["intensity"], p["gflops"], "o", label=p["label"])
    ax.set_xlabel("arithmetic intensity (FLOPs per byte moved)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("Roofline: left of the ridge memory-bound, right compute-bound")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def explain(config, hw: Hardware, weight_bits: float = 16, batch: int = 1, context: int = 512,
            compute_dtype: str = "bf16", overhead_s: float = 0.0) -> str:
    """One paragraph for the explorer widget: predicted decode and prefill speed, and what limits each."""
    dec = predict(decode_cost(config, batch, context, weight_bits, 16), hw, compute_dtype, overhead_s)
    pre = predict(prefill_cost(config, batch, context, weight_bits, 16), hw, compute_dtype, overhead_s)
    c = decode_cost(config, batch, context, weight_bits, 16)
    return (f"{hw.name} [{hw.source}]\n"
            f"decode : {dec.tokens_per_s:10.1f} tokens/s for the batch ({dec.tokens_per_s / batch:.1f} per sequence),"
            f" {dec.bound}-bound; moves {c.bytes / 1e6:.1f} MB, {c.flops / 1e9:.2f} GFLOP per step\n"
            f"prefill: {pre.tokens_per_s:10.1f} tokens/s ({context} tokens x {batch}), {pre.bound}-bound,"
            f" {pre.seconds * 1e3:.1f} ms")

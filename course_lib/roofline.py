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

* a **mixture of experts** reads at each step only the experts its tokens were routed to: k per layer for one
  token, the union for a batch (:func:`expected_experts`), so its bytes per step grow with the batch from the
  active parameters toward the total (:func:`moe_decode_cost`).

This module is the arithmetic only: a machine's two figures (:class:`Hardware`, measured or from a spec
sheet) and their ridge point, the bytes and FLOPs of a step counted from a model config, and the predicted step
latency. Nothing here runs a timing. The figures of *this* machine are measured by :mod:`course_lib.machine`
(the compute peak with a compute-bound square matmul, the bandwidth with a streaming read, and apart from them
what a matrix-vector product - the decode step's own kernel - achieves); the *per-step overhead* (Python, the
framework, kernel launches) is measured, not guessed, by :func:`course_lib.decode_speed.measure_step_overhead`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from ._checks import check_int, check_number

DTYPE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}


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


# --- mixture of experts: the bytes a step reads depend on the batch ------------------

def expected_experts(experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts that ``tokens`` tokens touch in one layer, on average, when each picks ``top_k`` of
    ``experts`` uniformly at random: E * (1 - (1 - k/E)^B).

    One token leaves a given expert out with probability 1 - k/E; B independent tokens all leave it out with
    probability (1 - k/E)^B. One token reads k experts; a large batch reads nearly all E.
    """
    check_int("experts", experts, 1, " (experts per MoE layer)")
    check_int("top_k", top_k, 1, " (experts each token is routed to)")
    if top_k > experts:
        raise ValueError(f"top_k ({top_k}) must be <= experts ({experts}): a token cannot pick more experts than "
                         "the layer has")
    check_int("tokens", tokens, 0, " (tokens in the step: the batch at decode)")
    return experts * (1 - (1 - top_k / experts) ** tokens)


@dataclass(frozen=True)
class MoEDims:
    """Shapes of a mixture-of-experts decoder whose every MLP is ``experts`` SwiGLU experts, ``top_k`` per token.

    Read from a transformers config (OlmoeConfig, Qwen3MoeConfig, MixtralConfig); models with shared experts
    or with dense MLP layers between the MoE ones are refused (their bytes would be counted wrong).
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    top_k: int
    expert_intermediate: int

    def __post_init__(self):
        for name in ("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab", "experts", "top_k",
                     "expert_intermediate"):
            check_int(name, getattr(self, name), 1)
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= experts ({self.experts})")

    @classmethod
    def from_config(cls, cfg) -> MoEDims:
        experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
        if not experts:
            raise ValueError(f"{type(cfg).__name__} has no experts (num_experts / num_local_experts): use "
                             "ModelDims.from_config for a dense model")
        if getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1:
            raise ValueError("this config mixes dense MLP layers with MoE layers (mlp_only_layers / "
                             "decoder_sparse_step); MoEDims counts every layer as MoE")
        if getattr(cfg, "shared_expert_intermediate_size", 0) or getattr(cfg, "n_shared_experts", 0):
            raise ValueError("this config has shared experts, which MoEDims does not count")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size  # Qwen3-MoE names it apart
        return cls(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                   cfg.num_key_value_heads or cfg.num_attention_heads, head_dim, cfg.vocab_size, experts,
                   cfg.num_experts_per_tok, inter)

    @property
    def attention_params(self) -> int:
        """q, k, v, o projections of one layer."""
        d, hd = self.hidden, self.head_dim
        return d * self.heads * hd * 2 + d * self.kv_heads * hd * 2

    @property
    def expert_params(self) -> int:
        """One expert: gate, up and down projections."""
        return 3 * self.hidden * self.expert_intermediate

    def decode_params(self, experts_read: float) -> float:
        """Weights one decode step reads when each layer reads ``experts_read`` distinct experts (router, norms
        and output head included; the embedding is one row per token and is left out, as in ModelDims)."""
        per_layer = self.attention_params + self.experts * self.hidden + experts_read * self.expert_params
        return self.layers * (per_layer + 2 * self.hidden) + self.vocab * self.hidden + self.hidden

    @property
    def active_decode_params(self) -> float:
        """Weights a single token reads: top_k experts per layer."""
        return self.decode_params(self.top_k)

    @property
    def all_decode_params(self) -> float:
        """Weights a step reads when its tokens touch every expert (what a large batch converges to)."""
        return self.decode_params(self.experts)

    def kv_bytes_per_token(self, kv_bits: int = 16) -> float:
        """Cache bytes one token adds: K and V, every layer, every KV head."""
        return self.layers * 2 * self.kv_heads * self.head_dim * kv_bits / 8


def moe_decode_cost(config, batch: int = 1, context: int = 128, weight_bits: float = 16, kv_bits: float = 16,
                    act_bits: float = 16, experts_read: float | None = None) -> StepCost:
    """One decode step of a mixture-of-experts model: like :func:`decode_cost`, but each layer reads only the
    experts the batch's tokens are routed to.

    ``experts_read`` is the number of distinct experts per layer the step reads; None is the expectation under
    uniform routing, :func:`expected_experts` (experts, top_k, batch). Pass a count measured from the router to
    predict one real step.
    """
    m = config if isinstance(config, MoEDims) else MoEDims.from_config(config)
    _check(batch, weight_bits, kv_bits, act_bits)
    check_int("context", context, 0, " (tokens already cached)")
    if experts_read is None:
        experts_read = expected_experts(m.experts, m.top_k, batch)
    check_number("experts_read", experts_read, f"between 1 and experts ({m.experts}) per layer",
                 lambda v: 1 <= v <= m.experts)
    weight_bytes = m.decode_params(experts_read) * weight_bits / 8
    kv_bytes = batch * m.kv_bytes_per_token(kv_bits) * (context + 1)
    act_bytes = batch * (m.layers * (10 * m.hidden + 4 * m.top_k * m.expert_intermediate) + m.vocab) * act_bits / 8
    attn_flops = m.layers * 4 * m.heads * m.head_dim * (context + 1)
    # every token still computes only its own top_k experts: the FLOPs follow the active weights
    flops = batch * (2 * (m.active_decode_params - m.layers * 2 * m.hidden - m.hidden) + attn_flops)
    return StepCost("decode", batch, 1, context, weight_bytes, kv_bytes, act_bytes, flops)


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

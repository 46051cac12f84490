"""KV-cache memory of attention variants (MHA, GQA, MQA, MLA, sliding windows) read from published model configs.

Every decode step reads the whole KV cache, and a server must hold it for every sequence, so the bytes one
token adds to it decide how long a context and how large a batch fit beside the weights. Those bytes are set
by a handful of config.json fields:

* multi-head attention (MHA): every query head has its own K and V: 2 * layers * heads * head_dim values;
* grouped-query (GQA) and multi-query (MQA) attention: groups of query heads share one K/V head
  (``num_key_value_heads``; Falcon's ``multi_query``: one for all);
* multi-head latent attention (MLA, DeepSeek-V2/V3): one compressed latent of ``kv_lora_rank`` values plus a
  ``qk_rope_head_dim`` positional key per layer, shared by all heads, from which K and V are rebuilt;
* a sliding window (``sliding_window``; Gemma-2 on every other layer, ``layer_types``) keeps only the last W
  tokens of the layers that use it, so their part of the cache stops growing.

The published configs below are data (with the config fields and the paper or model card they come from);
:func:`kv_layout` reads them, or any transformers config, through transformers' own config classes, and
:func:`transformers_cache_bytes` lets transformers itself allocate the cache on the meta device (shapes, no
memory) as a check of the arithmetic.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ._checks import check_int, check_number


@dataclass(frozen=True)
class Published:
    """A published model: the config.json fields that shape its KV cache, its size, and where both are stated."""

    hub_id: str
    config: dict  # config.json fields (model_type first), as the model's repository publishes them
    params_b: float  # total parameters, billions, as its authors state them
    source: str

    def __post_init__(self):
        if not isinstance(self.config, dict) or "model_type" not in self.config:
            raise ValueError(f"{self.hub_id}: config must be a dict of config.json fields with a model_type")
        check_number("params_b", self.params_b, "> 0 (billions of parameters)", lambda v: v > 0)


PUBLISHED: dict[str, Published] = {
    "Llama-2-7B": Published(
        "meta-llama/Llama-2-7b-hf",
        dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
        6.74, "Touvron et al. 2023, 'Llama 2' (arXiv:2307.09288): the 7B model uses multi-head attention; "
              "6.74B parameters in its safetensors files"),
    "Llama-3-8B": Published(
        "meta-llama/Meta-Llama-3-8B",
        dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
        8.03, "Meta Llama 3 model card: 'Grouped-Query Attention (GQA) for improved inference scalability'; 8.03B"),
    "Qwen2.5-7B": Published(
        "Qwen/Qwen2.5-7B",
        dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, use_sliding_window=False,
             max_position_embeddings=131072),
        7.61, "Qwen2.5-7B model card: 7.61B parameters, 28 layers, 'Attention Heads (GQA): 28 for Q and 4 for KV'"),
    "SmolLM2-135M": Published(
        "HuggingFaceTB/SmolLM2-135M",
        dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
             max_position_embeddings=8192),
        0.135, "SmolLM2 model card (Allal et al. 2025, arXiv:2502.02737): 135M parameters; the course's real "
               "model (GQA, 9 query heads sharing 3 KV heads)"),
    "Falcon-7B": Published(
        "tiiuae/falcon-7b",
        dict(model_type="falcon", hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
             multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False, vocab_size=65024),
        6.92, "Falcon-7B model card and Almazrouei et al. 2023 (arXiv:2311.16867): multi-query attention "
              "(Shazeer 2019), one K/V head for all 71 query heads; 6.92B parameters"),
    "Mistral-7B-v0.1": Published(
        "mistralai/Mistral-7B-v0.1",
        dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, sliding_window=4096,
             max_position_embeddings=32768),
        7.24, "Jiang et al. 2023, 'Mistral 7B' (arXiv:2310.06825): GQA with 8 KV heads and sliding-window "
              "attention, W = 4096, a rolling buffer cache of W tokens; 7.24B parameters"),
    "Gemma-2-9B": Published(
        "google/gemma-2-9b",
        dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
             num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
             sliding_window=4096, max_position_embeddings=8192),
        9.24, "Gemma Team 2024, 'Gemma 2' (arXiv:2408.00118): local sliding-window (4096) and global attention "
              "in every other layer, GQA; 9.24B parameters"),
    "DeepSeek-V2": Published(
        "deepseek-ai/DeepSeek-V2",
        dict(model_type="deepseek_v2", hidden_size=5120, num_hidden_layers=60, num_attention_heads=128,
             num_key_value_heads=128, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
             qk_nope_head_dim=128, v_head_dim=128, vocab_size=102400, intermediate_size=12288,
             moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
             first_k_dense_replace=1, n_group=8, topk_group=3, topk_method="group_limited_greedy"),
        236.0, "DeepSeek-AI 2024, 'DeepSeek-V2' (arXiv:2405.04434), Table 1: MLA caches (d_c + d_h^R) * l values "
               "per token, d_c = kv_lora_rank = 512, d_h^R = qk_rope_head_dim = 64; 236B total (21B active)"),
    "DeepSeek-V3": Published(
        "deepseek-ai/DeepSeek-V3",
        dict(model_type="deepseek_v3", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
             num_key_value_heads=128, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
             qk_nope_head_dim=128, v_head_dim=128, vocab_size=129280, intermediate_size=18432,
             moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
             first_k_dense_replace=3, n_group=8, topk_group=4),
        671.0, "DeepSeek-AI 2024, 'DeepSeek-V3 Technical Report' (arXiv:2412.19437): MLA as in V2 (kv_lora_rank "
               "512, rope dim 64), 61 layers; 671B total (37B active)"),
}


def published_config(name: str):
    """The transformers config of a published model of :data:`PUBLISHED` (its fields, transformers' defaults)."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown published model {name!r}; choose one of {sorted(PUBLISHED)}")
    fields = dict(PUBLISHED[name].config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@dataclass(frozen=True)
class KVLayout:
    """What one token stores in each layer's cache, and how many layers keep only a window of tokens."""

    kind: str  # "MHA", "GQA", "MQA" or "MLA"
    layers: int
    values_per_layer: int  # cached numbers one token adds to one layer: 2 * kv_heads * head_dim, or MLA's latent
    sliding_layers: int = 0  # layers that keep only the last `window` tokens
    window: int = 0

    def __post_init__(self):
        if self.kind not in ("MHA", "GQA", "MQA", "MLA"):
            raise ValueError(f"kind must be one of MHA, GQA, MQA, MLA, got {self.kind!r}")
        check_int("layers", self.layers, 1)
        check_int("values_per_layer", self.values_per_layer, 1)
        check_int("sliding_layers", self.sliding_layers, 0)
        check_int("window", self.window, 0, " (0 = no sliding window)")
        if self.sliding_layers > self.layers or (self.sliding_layers > 0) != (self.window > 0):
            raise ValueError(f"sliding_layers ({self.sliding_layers}) must be <= layers ({self.layers}), and "
                             f"given exactly when window ({self.window}) is")

    @property
    def description(self) -> str:
        """The variant in words, e.g. 'GQA, window 4096 on 21 of 42 layers'."""
        if not self.sliding_layers:
            return self.kind
        where = "all layers" if self.sliding_layers == self.layers else f"{self.sliding_layers} of {self.layers} layers"
        return f"{self.kind}, window {self.window} on {where}"

    def bytes_per_token(self, kv_bits: float = 16) -> float:
        """Bytes one token adds to the cache while the context is shorter than any window."""
        _check_bits(kv_bits)
        return self.layers * self.values_per_layer * kv_bits / 8

    def bytes(self, context: int, batch: int = 1, kv_bits: float = 16) -> float:
        """Cache bytes for ``batch`` sequences of ``context`` tokens (a windowed layer holds min(context, window))."""
        check_int("context", context, 0, " (tokens per sequence)")
        check_int("batch", batch, 1)
        _check_bits(kv_bits)
        full = self.layers - self.sliding_layers
        held = full * context + self.sliding_layers * min(context, self.window)
        return batch * held * self.values_per_layer * kv_bits / 8

    def context_to_outweigh(self, weight_bytes: float, batch: int = 1, kv_bits: float = 16) -> int | None:
        """The shortest context at which ``batch`` sequences' cache holds more bytes than ``weight_bytes``;
        None if it never does (every layer keeps a window, and the full windows still weigh less)."""
        check_number("weight_bytes", weight_bytes, "> 0", lambda v: 0 < v < math.inf)
        check_int("batch", batch, 1)
        per_token = batch * self.bytes_per_token(kv_bits)  # every layer grows until the window fills
        t = math.floor(weight_bytes / per_token) + 1
        if not self.sliding_layers or t <= self.window:
            return t
        growing = batch * (self.layers - self.sliding_layers) * self.values_per_layer * kv_bits / 8
        if growing == 0:
            return None
        at_window = self.bytes(self.window, batch, kv_bits)
        return self.window + math.floor((weight_bytes - at_window) / growing) + 1


def _check_bits(kv_bits) -> None:
    check_number("kv_bits", kv_bits, "> 0 and finite (bits per cached value: 32, 16, 8, 4)",
                 lambda v: 0 < v < math.inf)


def _field(cfg, name: str, default=None):
    value = cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)
    return default if value is None else value


def kv_layout(config) -> KVLayout:
    """The cache layout of a transformers config (or a dict of config.json fields with a ``model_type``)."""
    if isinstance(config, dict):
        fields = dict(config)
        if "model_type" not in fields:
            raise ValueError("a config dict needs its 'model_type' (e.g. 'llama'), as config.json has it")
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    layers = _field(config, "num_hidden_layers")
    heads = _field(config, "num_attention_heads")
    if not isinstance(layers, numbers.Integral) or not isinstance(heads, numbers.Integral):
        raise ValueError(f"{type(config).__name__} has no num_hidden_layers / num_attention_heads: not a decoder "
                         "config this table can read")
    rank = _field(config, "kv_lora_rank", 0)
    if rank:  # MLA: one latent (+ the decoupled RoPE key) per token and layer, shared by every head
        kind, values = "MLA", rank + _field(config, "qk_rope_head_dim", 0)
    else:
        head_dim = _field(config, "head_dim") or _field(config, "hidden_size") // heads
        if _field(config, "multi_query", False) and not _field(config, "new_decoder_architecture", False):
            kv = 1  # Falcon's flag: one K/V head for all query heads
        else:
            kv = _field(config, "num_key_value_heads") or _field(config, "num_kv_heads") or heads
        kind = "MHA" if kv == heads else "MQA" if kv == 1 else "GQA"
        values = 2 * kv * head_dim
    window = _field(config, "sliding_window", 0) if _field(config, "use_sliding_window", True) else 0
    types = _field(config, "layer_types")
    if types is not None:
        sliding = sum(t == "sliding_attention" for t in types) if window else 0
    else:
        sliding = layers if window else 0
    return KVLayout(kind, layers, values, sliding, window if sliding else 0)


def attention_table(context: int = 32768, batch: int = 1, weight_bits: float = 16, kv_bits: float = 16) -> list[dict]:
    """One row per published model: its variant, KV bytes per token, the cache at ``context`` tokens for
    ``batch`` sequences, its weights, and the context at which the cache outweighs the weights."""
    check_number("weight_bits", weight_bits, "> 0 and finite (16 = bf16 weights)", lambda v: 0 < v < math.inf)
    rows = []
    for name, pub in PUBLISHED.items():
        lay = kv_layout(pub.config)
        weights = pub.params_b * 1e9 * weight_bits / 8
        cross = lay.context_to_outweigh(weights, batch, kv_bits)
        rows.append(dict(model=name, attention=lay.description, layers=lay.layers,
                         values_per_token_layer=lay.values_per_layer, KiB_per_token=lay.bytes_per_token(kv_bits) / 1024,
                         cache_GB=lay.bytes(context, batch, kv_bits) / 1e9, weights_GB=weights / 1e9,
                         cache_outweighs_weights_at=cross))
    return rows


def cache_nbytes(cache) -> int:
    """Bytes a cache holds: the course's :class:`~course_lib.kv_cache.KVCache` or a transformers cache."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"cannot read the size of a {type(cache).__name__}: expected the course's KVCache or a "
                         "transformers Cache (with .layers)")
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def transformers_cache_bytes(config, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """The bytes of the cache transformers itself allocates for a prefill of ``context`` tokens, computed on the
    meta device: the model's own classes run on shapes only, so even a 671B config costs no memory."""
    check_int("context", context, 1)
    check_int("batch", batch, 1)
    if isinstance(config, dict):
        fields = dict(config)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    ids = torch.zeros(batch, context, dtype=torch.long, device="meta")
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None)  # transformers 5.x names it `cache`, earlier versions past_key_values
    return cache_nbytes(out.past_key_values if cache is None else cache)

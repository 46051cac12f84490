"""The KV cache: the keys and values of earlier tokens, kept so each decode step computes only the new one's.

Generating token ``t+1`` needs attention over every earlier token. Without a
cache the model recomputes the keys and values of the whole sequence at every
step, so step ``t`` costs O(t) matmuls and a whole generation O(n^2). The keys
and values of earlier tokens never change (causal attention: a token only
looks back), so we can compute them once and keep them: the **KV cache**.
Each decode step then runs the model on *one* token and reads the cache.

The cache here is **static**: one preallocated tensor per layer for K and for V, filled position by position.
Fixed shapes are what ``torch.compile`` (and CUDA graphs) need, and no memory is reallocated during decoding.
The model that fills it, written from scratch, is :class:`course_lib.scratch_llama.ScratchLlama`; the paged
cache of the serving engine is :mod:`course_lib.paged_kv`; the same caches storing 8 or 4 bits per number are
in :mod:`course_lib.kv_quant`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_int


@dataclass(frozen=True)
class LlamaShape:
    """The few numbers of a config that the forward pass needs."""

    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    rope_theta: float

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @classmethod
    def from_config(cls, cfg) -> LlamaShape:
        """Read a Hugging Face Llama/Qwen2/Mistral-style config."""
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return cls(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                   cfg.num_key_value_heads or cfg.num_attention_heads, head_dim, cfg.vocab_size,
                   cfg.rms_norm_eps, float(theta))


# --- the cache ------------------------------------------------------------------

class KVCache:
    """Preallocated keys and values: ``k[layer]`` has shape (B, n_kv_heads, max_len, head_dim).

    ``length`` slots are filled. Slot index is the order tokens arrived in
    (left padding included); the RoPE *position* of a token is passed
    separately, so padded rows still see positions 0, 1, 2, ...
    """

    def __init__(self, shape: LlamaShape, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        check_int("batch", batch, 1)  # True is a slip, not a batch of 1
        check_int("max_len", max_len, 1, " (the most tokens the cache holds)")
        size = (batch, shape.n_kv_heads, max_len, shape.head_dim)
        self.k = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.n_layers)]
        self.v = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.n_layers)]
        self.max_len = max_len
        self.length = 0
        # RoPE's cos and sin for every slot's position, (1, max_len, head_dim) each, where the model that made the
        # cache fills them (ScratchLlama.new_cache): a static decode step reads its token's row instead of
        # computing them again (in a compiled graph, again in every layer)
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def nbytes(self) -> int:
        """Memory held by the keys and values (all of it reserved up front; the RoPE tables are not counted)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (B, n_kv, T, D) keys/values at slots [length, length+T); return all filled slots."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len={self.max_len}; make a larger cache")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self._read(self.k[layer][:, :, :end]), self._read(self.v[layer][:, :, :end])

    def write_slot(self, layer: int, slot: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, n_kv, T, D) keys/values at slots ``slot .. slot + T - 1`` (``slot`` a 0-d tensor: the static,
        compilable path; T is 1 at a decode step); return every slot (the caller masks the empty ones)."""
        t = k.shape[2]
        idx = slot.view(1) if t == 1 else slot + torch.arange(t, device=slot.device)
        self.k[layer].index_copy_(2, idx, k)
        self.v[layer].index_copy_(2, idx, v)
        return self._read(self.k[layer]), self._read(self.v[layer])

    def _read(self, t):
        """What attention reads from stored slots: the tensor itself here; the quantized cache dequantizes."""
        return t

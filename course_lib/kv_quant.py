"""KV-cache quantization: keys and values stored in 8 or 4 bits, dequantized where attention reads them.

At long contexts and large batches the KV cache, not the weights, is most of what a decode step reads (notebook
08 prints where). Storing it in fewer bits shrinks that read and fits more sequences in the same memory; this is
llama.cpp's ``-ctk q8_0 -ctv q8_0`` and vLLM's ``--kv-cache-dtype fp8``.

Each key or value *vector* (one token, one KV head, ``head_dim`` numbers) is cut into groups of ``group_size``
channels (default: the whole head) and each group gets its own numbers:

* **8 bits** - symmetric: ``x ~ scale * q`` with ``q`` an int8 in [-127, 127] and ``scale = max|x| / 127``;
* **4 bits** - asymmetric: ``x ~ min + scale * q`` with ``q`` in [0, 15] and ``scale = (max - min) / 15``,
  two codes packed per byte (llama.cpp's Q4_1 layout).

Scales and minimums are stored as float16, as llama.cpp's blocks store theirs (an overflow needs values
above 65,504 x 127 for int8: keys and values are far smaller). A token is quantized once, when its keys and
values are written; every later step reads it back through :meth:`QuantizedKV.dequantize`, so a token's
own attention already sees the rounded values (the cache is written before attention reads it).

Three places use it, one storage class (:class:`QuantizedKV`) for all:

* :class:`QuantizedKVCache` - the course's static cache (:mod:`course_lib.kv_cache`) for
  :class:`course_lib.scratch_llama.ScratchLlama` (``scratch.new_cache(batch, max_len, kv_quant=cfg)``);
* the paged cache of the serving engine (:class:`course_lib.paged_kv.PagedKVCache` with ``kv_quant=cfg``);
* :func:`quantized_cache` - a transformers ``Cache`` whose layers subclass transformers' own quantized-cache
  seam (``BaseQuantizedLayer`` with its ``_quantize`` / ``_dequantize`` hooks), for any Hugging Face model's
  forward and ``generate`` (``past_key_values=quantized_cache(model, cfg)``).

Dequantizing the whole cache before attention, as done here, *adds* work on a CPU: the saving is memory (a
bigger batch or a longer context in the same bytes). The speed-up needs a kernel that dequantizes inside
attention, in registers (llama.cpp's, vLLM's); docs/kv_quant.md has the measurements.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

try:  # the seam every quantized layer of transformers' QuantizedCache subclasses (transformers >= 5.2x)
    from transformers.cache_utils import BaseQuantizedLayer as _QuantizedSeam
except ImportError:  # earlier 5.x: QuantizedLayer is that seam (update, below, replaces its residual logic)
    from transformers.cache_utils import QuantizedLayer as _QuantizedSeam

from ._checks import check_int
from .kv_cache import KVCache, LlamaShape

KV_BITS = (8, 4)
SCALE_DTYPE = torch.float16


# --- the config -------------------------------------------------------------------

@dataclass(frozen=True)
class KVQuantConfig:
    """How keys and values are stored: ``bits`` (8 or 4) and ``group_size`` channels of a head per scale.

    ``group_size=None`` gives one scale per token and KV head (the whole ``head_dim``); a divisor of
    ``head_dim`` (e.g. 32) gives finer groups: more scales, less error.
    """

    bits: int = 8
    group_size: int | None = None

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in KV_BITS:
            raise ValueError(f"bits must be one of {KV_BITS} (8: int8 with a scale per group, 4: packed 4-bit "
                             f"with a scale and a minimum per group), got {self.bits!r}")
        if self.group_size is not None:
            check_int("group_size", self.group_size, 2, " (channels of a head that share a scale, a divisor of "
                      "head_dim such as 32), or None for one scale per token and head")
            if self.bits == 4 and self.group_size % 2:
                raise ValueError(f"group_size must be even for bits=4 (two 4-bit codes share a byte), got "
                                 f"{self.group_size}; use e.g. 32, or None for the whole head")

    @property
    def name(self) -> str:
        """A short label: ``int8``, ``int4``, ``int4-g32``."""
        return f"int{self.bits}" + (f"-g{self.group_size}" if self.group_size else "")

    def group(self, head_dim: int) -> int:
        """The group size used for heads of ``head_dim`` channels (checked to divide it)."""
        g = self.group_size or head_dim
        if head_dim % g:
            divisors = [d for d in range(2, head_dim + 1) if head_dim % d == 0 and (self.bits == 8 or d % 2 == 0)]
            raise ValueError(f"group_size={g} does not divide head_dim={head_dim}; use one of {divisors}, or None "
                             "for one scale per token and head")
        return g

    def bytes_per_vector(self, head_dim: int) -> int:
        """Bytes one token's key (or value) of one KV head takes: codes plus float16 scales (and minimums)."""
        groups = head_dim // self.group(head_dim)
        per_group_meta = SCALE_DTYPE.itemsize * (1 if self.bits == 8 else 2)
        return head_dim * self.bits // 8 + groups * per_group_meta


def _shape(shape_or_config) -> LlamaShape:
    return shape_or_config if isinstance(shape_or_config, LlamaShape) else LlamaShape.from_config(shape_or_config)


def kv_bytes_per_token(shape_or_config, config: KVQuantConfig | None = None,
                       dtype: torch.dtype = torch.float32) -> int:
    """Bytes of KV cache one token takes in every layer: float ``dtype`` when ``config`` is None, else quantized.

    ``shape_or_config``: a :class:`~course_lib.kv_cache.LlamaShape` or a Hugging Face config.
    """
    s = _shape(shape_or_config)
    per_vector = s.head_dim * dtype.itemsize if config is None else config.bytes_per_vector(s.head_dim)
    return s.n_layers * 2 * s.n_kv_heads * per_vector


def max_batch(shape_or_config, budget_bytes: int, context: int, config: KVQuantConfig | None = None,
              dtype: torch.dtype = torch.float32) -> int:
    """The most sequences of ``context`` tokens whose KV cache fits in ``budget_bytes`` (0 if not even one)."""
    check_int("budget_bytes", budget_bytes, 1, " (memory for the KV cache, in bytes)")
    check_int("context", context, 1, " (tokens each sequence holds)")
    return budget_bytes // (kv_bytes_per_token(shape_or_config, config, dtype) * context)


# --- the storage ------------------------------------------------------------------

class QuantizedKV:
    """Keys or values of any leading shape ``(..., head_dim)``, stored quantized along ``head_dim``.

    It indexes like the float tensor it stands for, over the leading dimensions (``t[:, :, :n]``,
    ``t[index_tensor]``, ``t[idx] = x``, ``t.index_copy_(dim, index, x)``); writes quantize, and
    :meth:`dequantize` gives the float tensor back.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, config: KVQuantConfig):
        self.codes, self.scale, self.zero, self.config = codes, scale, zero, config

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * 8 // self.config.bits

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the float tensor this stands for."""
        return (*self.codes.shape[:-1], self.head_dim)

    def _parts(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, self.scale) if self.zero is None else (self.codes, self.scale, self.zero)

    def _map(self, fn) -> QuantizedKV:
        parts = [fn(p) for p in self._parts()]
        return QuantizedKV(parts[0], parts[1], parts[2] if len(parts) == 3 else None, self.config)

    @classmethod
    def empty(cls, size: tuple[int, ...], config: KVQuantConfig, device: torch.device | str = "cpu") -> QuantizedKV:
        """Zeros standing for a float tensor of ``size`` (last dimension: head_dim)."""
        *lead, d = size
        groups = d // config.group(d)
        code_dtype = torch.int8 if config.bits == 8 else torch.uint8
        codes = torch.zeros(*lead, d * config.bits // 8, dtype=code_dtype, device=device)
        scale = torch.zeros(*lead, groups, dtype=SCALE_DTYPE, device=device)
        zero = None if config.bits == 8 else torch.zeros(*lead, groups, dtype=SCALE_DTYPE, device=device)
        return cls(codes, scale, zero, config)

    @classmethod
    def quantize(cls, x: torch.Tensor, config: KVQuantConfig) -> QuantizedKV:
        """Quantize ``x`` (..., head_dim) group by group (see the module docstring for the two formats)."""
        *lead, d = x.shape
        g = config.group(d)
        xg = x.float().reshape(*lead, d // g, g)
        tiny = torch.finfo(torch.float32).tiny
        if config.bits == 8:
            scale = (xg.abs().amax(-1) / 127).to(SCALE_DTYPE)  # the codes use the scale as it is stored
            q = (xg / scale.float().clamp_min(tiny)[..., None]).round().clamp(-127, 127)
            return cls(q.to(torch.int8).reshape(*lead, d), scale, None, config)
        lo, hi = xg.amin(-1), xg.amax(-1)
        zero = lo.to(SCALE_DTYPE)
        scale = ((hi - zero.float()) / 15).to(SCALE_DTYPE)
        q = ((xg - zero.float()[..., None]) / scale.float().clamp_min(tiny)[..., None]).round().clamp(0, 15)
        q = q.to(torch.uint8).reshape(*lead, d)
        return cls(q[..., 0::2] | (q[..., 1::2] << 4), scale, zero, config)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float tensor (..., head_dim) in ``dtype``."""
        *lead, _ = self.codes.shape
        d, groups = self.head_dim, self.scale.shape[-1]
        if self.config.bits == 8:
            q = self.codes.to(dtype)
        else:  # unpack: the low nibble is the even channel, the high one the odd channel
            q = torch.stack([self.codes & 15, self.codes >> 4], dim=-1).to(dtype)
        # one new tensor, scaled (and shifted) in place: this runs over the whole cache at every step
        x = q.reshape(*lead, groups, d // groups).mul_(self.scale.to(dtype)[..., None])
        if self.zero is not None:
            x.add_(self.zero.to(dtype)[..., None])
        return x.reshape(*lead, d)

    def nbytes(self) -> int:
        """Memory held: codes, scales and minimums."""
        return sum(p.numel() * p.element_size() for p in self._parts())

    def _check_lead(self, dim: int) -> int:
        nd = self.codes.dim()
        dim = dim + nd if dim < 0 else dim
        if not 0 <= dim < nd - 1:
            raise ValueError(f"dim must name one of the leading dimensions 0..{nd - 2} (head_dim, the last, is "
                             f"where the codes are packed), got {dim}")
        return dim

    def __getitem__(self, idx) -> QuantizedKV:
        """Index the leading dimensions (the last one, head_dim, is never indexed)."""
        return self._map(lambda p: p[idx])

    def __setitem__(self, idx, x: torch.Tensor) -> None:
        """Quantize ``x`` and store it at ``idx`` of the leading dimensions."""
        for mine, new in zip(self._parts(), QuantizedKV.quantize(x, self.config)._parts()):
            mine[idx] = new

    def index_copy_(self, dim: int, index: torch.Tensor, x: torch.Tensor) -> QuantizedKV:
        """``Tensor.index_copy_`` for a leading ``dim``: quantize ``x`` and store it at ``index``."""
        dim = self._check_lead(dim)
        for mine, new in zip(self._parts(), QuantizedKV.quantize(x, self.config)._parts()):
            mine.index_copy_(dim, index, new)
        return self

    def index_select(self, dim: int, index: torch.Tensor) -> QuantizedKV:
        dim = self._check_lead(dim)
        return self._map(lambda p: p.index_select(dim, index))

    def repeat_interleave(self, repeats: int, dim: int) -> QuantizedKV:
        dim = self._check_lead(dim)
        return self._map(lambda p: p.repeat_interleave(repeats, dim=dim))

    @staticmethod
    def cat(items: list[QuantizedKV], dim: int) -> QuantizedKV:
        """Concatenate along a leading ``dim`` (e.g. -2, the sequence)."""
        dim = items[0]._check_lead(dim)
        parts = [torch.cat(ps, dim) for ps in zip(*(i._parts() for i in items))]
        return QuantizedKV(parts[0], parts[1], parts[2] if len(parts) == 3 else None, items[0].config)


# --- the course's static cache ------------------------------------------------------

class QuantizedKVCache(KVCache):
    """:class:`~course_lib.kv_cache.KVCache` with keys and values stored quantized (``k[layer]`` is a
    :class:`QuantizedKV` of logical shape (B, n_kv_heads, max_len, head_dim)); reads dequantize to ``dtype``."""

    def __init__(self, shape: LlamaShape, batch: int, max_len: int, config: KVQuantConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        check_int("batch", batch, 1)
        check_int("max_len", max_len, 1, " (the most tokens the cache holds)")
        if not isinstance(config, KVQuantConfig):
            raise ValueError(f"config must be a KVQuantConfig (e.g. KVQuantConfig(bits=8)), got {config!r}")
        size = (batch, shape.n_kv_heads, max_len, shape.head_dim)
        self.k = [QuantizedKV.empty(size, config, device) for _ in range(shape.n_layers)]
        self.v = [QuantizedKV.empty(size, config, device) for _ in range(shape.n_layers)]
        self.config, self.dtype = config, dtype
        self.max_len = max_len
        self.length = 0
        self.rope = None  # as KVCache's: filled by the model that makes the cache (ScratchLlama.new_cache)

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.k + self.v)

    def _read(self, t: QuantizedKV) -> torch.Tensor:
        return t.dequantize(self.dtype)


# --- transformers: a Cache whose layers use the library's quantized-cache seam -------------

class QuantizedKVLayer(_QuantizedSeam):
    """One layer of :func:`quantized_cache`: transformers' ``BaseQuantizedLayer`` with the course's format.

    Like transformers' own FP8 layer (and unlike its quanto/HQQ layers, which keep a float residual of recent
    tokens and re-quantize it in chunks), every token is quantized when it arrives and appended; ``update``
    returns every token so far dequantized, the new ones included.
    """

    is_croppable = False

    def __init__(self, config: KVQuantConfig):
        super().__init__()
        self.config = config
        self.cumulative_length = 0
        self._quantized_keys = self._quantized_values = None

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def _quantize(self, tensor: torch.Tensor) -> QuantizedKV:
        return QuantizedKV.quantize(tensor, self.config)

    def _dequantize(self, q_tensor: QuantizedKV) -> torch.Tensor:
        return q_tensor.dequantize(self.keys.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and append the new (B, H, T, D) keys and values; return all of them, dequantized."""
        self.cumulative_length += key_states.shape[-2]
        new_k, new_v = self._quantize(key_states), self._quantize(value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._quantized_keys, self._quantized_values = new_k, new_v
        else:
            self._quantized_keys = QuantizedKV.cat([self._quantized_keys, new_k], -2)
            self._quantized_values = QuantizedKV.cat([self._quantized_values, new_v], -2)
        return self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)

    def nbytes(self) -> int:
        """Memory held by this layer's quantized keys and values."""
        if not self.is_initialized:
            return 0
        return self._quantized_keys.nbytes() + self._quantized_values.nbytes()

    # Beam search and num_return_sequences act on the stored states (DynamicLayer's versions act on self.keys,
    # which stays empty here, and would silently do nothing).
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            self._quantized_keys = self._quantized_keys.index_select(0, idx)
            self._quantized_values = self._quantized_values.index_select(0, idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._quantized_keys = self._quantized_keys[indices]
            self._quantized_values = self._quantized_values[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._quantized_keys = self._quantized_keys.repeat_interleave(repeats, 0)
            self._quantized_values = self._quantized_values.repeat_interleave(repeats, 0)


class HFQuantizedKVCache(Cache):
    """A transformers ``Cache`` of :class:`QuantizedKVLayer`, one per decoder layer (full attention only)."""

    def __init__(self, model_config, config: KVQuantConfig):
        if not isinstance(config, KVQuantConfig):
            raise ValueError(f"config must be a KVQuantConfig (e.g. KVQuantConfig(bits=8)), got {config!r}")
        text = model_config.get_text_config(decoder=True)
        kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(f"the quantized KV cache is written for full-attention layers only; this model also "
                             f"has {sorted(kinds - {'full_attention'})}")
        config.group(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)  # refuse now
        self.config = config
        super().__init__(layers=[QuantizedKVLayer(config) for _ in range(text.num_hidden_layers)])

    def nbytes(self) -> int:
        """Memory held by every layer's quantized keys and values."""
        return sum(layer.nbytes() for layer in self.layers)


def quantized_cache(model, config: KVQuantConfig) -> HFQuantizedKVCache:
    """An empty quantized KV cache for a Hugging Face model: pass it as ``past_key_values`` to its forward or
    ``generate`` (one cache per sequence batch; it fills as the model runs)."""
    if getattr(model, "config", None) is None:
        raise ValueError(f"model must be a Hugging Face model with a config, got {type(model).__name__}")
    return HFQuantizedKVCache(model.config, config)


def cache_kwargs(model, config: KVQuantConfig | None) -> dict:
    """Keyword arguments that make one forward (or ``generate``) call of a Hugging Face model use a fresh
    quantized KV cache: ``{}`` when ``config`` is None. transformers 5.x names the argument ``cache``
    (``past_key_values`` before it)."""
    if config is None:
        return {}
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: quantized_cache(model, config), "use_cache": True}

"""A Llama-family forward pass written from scratch: the model every decode loop of the course runs.

This module runs the forward pass of a Hugging Face Llama-family model (Llama,
SmolLM2, Qwen2 with its q/k/v biases, the course's own ``course-tiny``) by hand:
it calls the model's own projection modules and writes the arithmetic between
them with plain tensor operations:

* **RMSNorm** - scale each vector by 1 / its root-mean-square (no mean subtraction);
* **RoPE** - rotate pairs of query/key channels by an angle proportional to the
  token's position, so q.k depends on the *distance* between tokens;
* **grouped-query attention (GQA)** - fewer key/value heads than query heads;
  each K/V head serves ``n_heads / n_kv_heads`` query heads, which shrinks the
  cache by the same factor;
* the **KV cache** of :mod:`course_lib.kv_cache` - each decode step runs the model on one token and reads
  the keys and values of the earlier ones from the cache;
* **fused projections** - q, k and v read the same input, and so do gate and up: where all of them are plain
  float ``nn.Linear`` layers, their weights are concatenated once and each group runs as *one* matmul, whose
  output is split back (as gpt-fast's ``wqkv`` does). One larger kernel instead of three small ones: fewer
  launches and less Python per token, and better use of a GPU that a 192-row matrix leaves mostly idle.

Tests check the logits against ``transformers`` within a tolerance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache, LlamaShape
from .kv_quant import KVQuantConfig, QuantizedKVCache
from .quantization import native

ATTENTION_KINDS = ("sdpa", "naive")
# Model families whose decoder is model.model.layers[i].{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj} with
# RMSNorm and RoPE: the layout the forward below is written for.
MODEL_TYPES = ("llama", "mistral", "qwen2")
LOOPS = "generate_kv_cache, CompiledDecoder, batched_generate and the serving engine"


# --- the building blocks --------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, computed in float32 (a sum of squares overflows fp16 easily)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, T, head_dim) for integer ``positions`` of shape (B, T).

    Channel pair i rotates at frequency theta^(-2i/head_dim): the first pairs
    spin fast (local order), the last ones slowly (long range).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # HF layout: the two halves of a head form the pairs
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys; pairs are (x[i], x[i + D/2])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, S, D) -> (B, n_kv * n_rep, S, D): each K/V head serves n_rep query heads."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out. Materialises the (T x S) score matrix per head."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """The same maths through PyTorch's fused kernel (flash / memory-efficient where available)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# --- fused projections ----------------------------------------------------------

def _version(t: torch.Tensor) -> int:
    """A tensor's in-place write counter (optimizer steps and load_state_dict bump it); -1 where untracked."""
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no counter
        return -1


def _fingerprint(mods: tuple[nn.Module, ...]) -> tuple:
    """What identifies the weights of ``mods`` now: the modules, their tensors, where those live and their writes."""
    out = []
    for m in mods:
        for t in (m.weight, m.bias):
            out.append(None if t is None else (id(t), t.data_ptr(), _version(t), tuple(t.shape)))
        out.append(id(m))
    return tuple(out)


def fusable(mods: tuple[nn.Module, ...]) -> bool:
    """Can these projections of one input run as one matmul? Only plain float ``nn.Linear`` layers can.

    Every module must be exactly ``nn.Linear`` (a quantized layer, a parametrized or a hooked one - e.g. torch's
    own pruning masks - keeps its own forward), with weights of one floating dtype and device, the same input
    width, and biases on all of them or on none. Pruning that removed rows or heads keeps them plain Linear
    layers, so a pruned model still fuses.
    """
    if any(type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in mods):
        return False
    ws = [m.weight for m in mods]
    if not ws[0].dtype.is_floating_point or len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
        return False
    biases = [m.bias for m in mods]
    if any(b is None for b in biases):
        return all(b is None for b in biases)
    return all(b.dtype == ws[0].dtype and b.device == ws[0].device for b in biases)


class FusedLinear(nn.Module):
    """Several ``nn.Linear`` layers of the same input as one: their weights concatenated, outputs split back.

    A copy of the weights (more memory: q/k/v and gate/up are most of a block), kept in step with the source
    modules by :meth:`sync`, which re-copies them when a module, a weight tensor or its in-place write count
    changed (training, ``load_state_dict``).
    """

    def __init__(self, mods: tuple[nn.Module, ...]):
        super().__init__()
        self.sizes = [m.out_features for m in mods]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor even when built in inference mode
            self.weight = nn.Parameter(torch.cat([m.weight for m in mods]), requires_grad=False)
            bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
            self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.key = _fingerprint(mods)

    def sync(self, mods: tuple[nn.Module, ...]) -> bool:
        """Re-copy the weights if ``mods`` changed since the last copy, in place (the same tensors, so a
        compiled graph or a CUDA graph that holds them stays valid). False when the shapes changed: rebuild."""
        key = _fingerprint(mods)
        if key == self.key:
            return True
        if [m.out_features for m in mods] != self.sizes or not fusable(mods) or \
                mods[0].weight.shape[1] != self.weight.shape[1] or mods[0].weight.dtype != self.weight.dtype or \
                mods[0].weight.device != self.weight.device or (mods[0].bias is None) != (self.bias is None):
            return False
        with torch.inference_mode(False), torch.no_grad():
            torch.cat([m.weight for m in mods], out=self.weight)
            if self.bias is not None:
                torch.cat([m.bias for m in mods], out=self.bias)
        self.key = key
        return True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def _fused(old: FusedLinear | None, mods: tuple[nn.Module, ...]) -> FusedLinear | None:
    """The fused projection of ``mods``: ``old`` kept (or refreshed in place) when it can be, None if unfusable."""
    if not fusable(mods):
        return None
    if old is not None and old.sync(mods):
        return old
    return FusedLinear(mods)


# --- the model ------------------------------------------------------------------

def _norm_eps(norm, default: float) -> float:
    """An RMSNorm module's epsilon (``variance_epsilon`` in transformers' Llama/Qwen2, ``eps`` in torch's)."""
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", None) or default))


class ScratchLlama:
    """The forward pass of a Hugging Face Llama-family model, by hand, calling the model's own layers.

    Only the arithmetic *between* the projections is written here (RMSNorm, RoPE,
    attention, SwiGLU, the residual adds). Every projection - q/k/v/o, gate/up/down,
    the embedding lookup and the output head - is the model's own module, called
    like a function. So whatever ``quantize_`` or ``prune_`` did to those modules
    (packed int8/int4 layers, fewer heads, a narrower MLP, biases) runs here too,
    under the eager loop, the static cache and ``torch.compile`` alike.

    With ``fuse=True`` (the default) a layer whose q/k/v (and, apart, gate/up) projections are all plain float
    ``nn.Linear`` layers (:func:`fusable`) runs each group as one matmul over concatenated weights
    (:class:`FusedLinear`); a quantized or otherwise replaced projection keeps being called on its own. The
    concatenated weights are a copy: about two thirds of the block weights held again. They are checked
    against the model's at the start of every sequence and re-copied when the model's weights were written
    since (a training step, ``load_state_dict``). ``fuse=False`` calls every module on its own and copies
    nothing.
    """

    def __init__(self, hf_model, attention: str = "sdpa", fuse: bool = True):
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if not isinstance(fuse, bool):
            raise ValueError(f"fuse must be True or False, got {fuse!r}")
        model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
        if model_type not in MODEL_TYPES or not hasattr(getattr(hf_model, "model", None), "layers"):
            raise ValueError(
                f"the from-scratch forward ({LOOPS}) runs Llama-family models only (model_type one of "
                f"{list(MODEL_TYPES)}), got {model_type!r} ({type(hf_model).__name__}); run this model with "
                "stream_generate, generate_hf or generate_no_cache, which call its own forward"
            )
        cfg = hf_model.config
        rope = getattr(cfg, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only default RoPE is written here, this model uses {rope.get('rope_type')!r}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"only the SwiGLU MLP (hidden_act='silu') is written here, got {cfg.hidden_act!r}")
        self.attention = attention
        self.hf_model = hf_model
        inner = hf_model.model
        self.embed_tokens = inner.embed_tokens
        self.final_norm = inner.norm.weight
        self.lm_head = hf_model.lm_head
        self.layers = list(inner.layers)
        self.shape = self._shape_from_modules(cfg)
        # each norm's own epsilon (pruning the hidden size rescales it), read once: not per token
        e = self.shape.eps
        self.norm_eps = [(_norm_eps(layer.input_layernorm, e), _norm_eps(layer.post_attention_layernorm, e))
                         for layer in self.layers]
        self.final_eps = _norm_eps(inner.norm, e)
        self.fuse = fuse
        self.qkv: list[FusedLinear | None] = [None] * len(self.layers)
        self.gate_up: list[FusedLinear | None] = [None] * len(self.layers)
        self.sync_fused()

    def sync_fused(self) -> None:
        """Build (or bring up to date) the fused q/k/v and gate/up projections of every layer that allows them."""
        if not self.fuse:
            return
        for i, layer in enumerate(self.layers):
            a, m = layer.self_attn, layer.mlp
            self.qkv[i] = _fused(self.qkv[i], (a.q_proj, a.k_proj, a.v_proj))
            self.gate_up[i] = _fused(self.gate_up[i], (m.gate_proj, m.up_proj))

    @property
    def fused_layers(self) -> tuple[int, int]:
        """(layers whose q/k/v run as one matmul, layers whose gate/up do)."""
        return sum(f is not None for f in self.qkv), sum(f is not None for f in self.gate_up)

    def _shape_from_modules(self, cfg) -> LlamaShape:
        """Head counts as the modules have them now (pruning removes heads), checked to agree in every layer."""
        from_cfg = LlamaShape.from_config(cfg)
        hd = from_cfg.head_dim
        counts = {(layer.self_attn.q_proj.out_features // hd, layer.self_attn.k_proj.out_features // hd)
                  for layer in self.layers}
        if len(counts) != 1:
            raise ValueError(f"every layer must have the same (query heads, KV heads); got {sorted(counts)}")
        n_heads, n_kv = counts.pop()
        return LlamaShape(self.final_norm.shape[0], len(self.layers), n_heads, n_kv, hd,
                          self.lm_head.out_features, from_cfg.eps, from_cfg.rope_theta)

    @property
    def device(self) -> torch.device:
        return self.final_norm.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the norms stay in the model's float dtype even when layers are quantized)."""
        return self.final_norm.dtype

    def new_cache(self, batch: int, max_len: int, kv_quant: KVQuantConfig | None = None) -> KVCache:
        """An empty cache sized for ``max_len`` tokens (prompt plus new tokens); ``kv_quant`` stores it in 8 or
        4 bits (:mod:`course_lib.kv_quant`)."""
        if kv_quant is None:
            cache = KVCache(self.shape, batch, max_len, self.dtype, self.device)
        else:
            cache = QuantizedKVCache(self.shape, batch, max_len, kv_quant, self.dtype, self.device)
        slots = torch.arange(max_len, device=self.device)[None]
        cache.rope = rope_tables(slots, self.shape.head_dim, self.shape.rope_theta, self.dtype)
        return cache

    def _block(self, i: int, x: torch.Tensor, cos, sin, cache: KVCache | None,
               mask: torch.Tensor | None, slot: torch.Tensor | None) -> torch.Tensor:
        """Decoder layer ``i``: x + attention(norm(x)), then + SwiGLU(norm(x))."""
        layer, s = self.layers[i], self.shape
        a, m = layer.self_attn, layer.mlp
        b, t, _ = x.shape
        h = rms_norm(x, layer.input_layernorm.weight, self.norm_eps[i][0])
        qkv = self.qkv[i]
        q, k, v = qkv(h) if qkv is not None else (a.q_proj(h), a.k_proj(h), a.v_proj(h))
        q = q.view(b, t, s.n_heads, s.head_dim).transpose(1, 2)
        k = k.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if slot is not None:  # static path: write in place at a tensor index, attend over all slots
            k, v = cache.write_slot(i, slot, k, v)
        elif cache is not None:  # keep this step's K/V, then attend over everything so far
            k, v = cache.write(i, k, v)
        if slot is not None and self._native_attention(q, cache):  # the filled slots only, no copy per query head
            out = native.decode_attention(q, k, v, slot, 1.0 / math.sqrt(s.head_dim))
        else:
            rep = s.n_heads // s.n_kv_heads
            k, v = repeat_kv(k, rep), repeat_kv(v, rep)
            attn = naive_attention if self.attention == "naive" else sdpa_attention
            out = attn(q, k, v, mask)
        x = x + a.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        h = rms_norm(x, layer.post_attention_layernorm.weight, self.norm_eps[i][1])
        gate_up = self.gate_up[i]
        gate, up = gate_up(h) if gate_up is not None else (m.gate_proj(h), m.up_proj(h))
        return x + m.down_proj(F.silu(gate) * up)  # SwiGLU

    def _native_attention(self, q: torch.Tensor, cache: KVCache) -> bool:
        """Can this static-cache step's attention run the native kernel (:func:`.quantization.native.decode_attention`)?
        The new tokens (one at a decode step, a few in :meth:`verify_static`) on the CPU, the plain float cache (a
        quantized cache dequantizes on read), no gradient, ``attention="sdpa"`` (``"naive"`` is the one written out
        to be read), the kernels built."""
        if (self.attention != "sdpa" or type(cache) is not KVCache or q.device.type != "cpu"
                or q.shape[-1] % 16 or (torch.is_grad_enabled() and q.requires_grad)
                or q.dtype not in (torch.float32, torch.bfloat16, torch.float16)):
            return False
        return native.ready()

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None,
             slot: torch.Tensor | None, last_only: bool,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The one layer loop both entry points share: embed, every block, final norm, head. ``rope``: cos and sin
        for ``positions`` already made (the static path reads them from its cache's tables)."""
        cos, sin = rope or rope_tables(positions, self.shape.head_dim, self.shape.rope_theta, self.dtype)
        x = self.embed_tokens(ids).to(self.dtype)
        for i in range(len(self.layers)):
            x = self._block(i, x, cos, sin, cache, mask, slot)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(rms_norm(x, self.final_norm, self.final_eps))

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for new tokens ``ids`` (B, T).

        ``cache``: where earlier tokens' K/V live (None = attend only within ``ids``).
        ``positions``: RoPE positions (B, T); default continues from the cache length.
        ``key_mask``: (B, slots) True for real tokens, False for padding.
        ``last_only``: compute logits for the last position only (what generation needs).
        """
        b, t = ids.shape
        past = cache.length if cache is not None else 0
        if past == 0:  # a new sequence: the fused weights must be the model's as they are now
            self.sync_fused()
        if positions is None:
            positions = torch.arange(past, past + t, device=ids.device).expand(b, t)
        out = self._run(ids, positions, cache, self._mask(b, t, past, key_mask, ids.device), None, last_only)
        if cache is not None:
            cache.length += t
        return out

    __call__ = forward

    def decode_static(self, tok: torch.Tensor, slot: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step whose tensor shapes never change: what ``torch.compile`` wants.

        ``tok`` is (B, 1); ``slot`` a 0-d long tensor, the cache slot (and RoPE
        position) of this token. Attention runs over all ``max_len`` slots with
        a mask hiding the empty ones, so step 5 and step 500 are the same graph;
        where the native kernels are built (:meth:`_native_attention`) it reads
        only the filled slots, their count taken from ``slot`` inside the kernel
        (still one graph). The caller advances ``slot``; ``cache.length`` is not
        touched.
        """
        positions = slot.view(1, 1).expand(tok.shape[0], 1)
        mask = (torch.arange(cache.max_len, device=tok.device) <= slot).view(1, 1, 1, -1)
        return self._run(tok, positions, cache, mask, slot, last_only=True, rope=self._rope_rows(cache, slot, 1))[:, -1]

    def verify_static(self, toks: torch.Tensor, slot: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, T, vocab) for T tokens at slots ``slot .. slot + T - 1`` in one pass: a speculative draft's
        verification on the static cache, shapes fixed for ``torch.compile`` like :meth:`decode_static`.

        Token t attends to slots ``0 .. slot + t``. Where the native kernels run (:meth:`_native_attention`, bf16
        projections up to :data:`.quantization.native.BF16_ROWS` rows), each token's logits are computed exactly
        as a one-token :meth:`decode_static` step computes them. Rejected tokens need no undo: their slots are
        overwritten by the next pass before any query reads them. ``cache.length`` is not touched.
        """
        b, t = toks.shape
        pos = slot + torch.arange(t, device=toks.device)
        mask = (torch.arange(cache.max_len, device=toks.device)[None, :] <= pos[:, None]).view(1, 1, t, -1)
        return self._run(toks, pos.view(1, t).expand(b, t), cache, mask, slot, last_only=False,
                         rope=self._rope_rows(cache, slot, t))

    @staticmethod
    def _rope_rows(cache: KVCache, slot: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin (1, t, head_dim) of slots ``slot .. slot + t - 1`` from the cache's tables (None: none made)."""
        if cache.rope is None:
            return None
        idx = slot.view(1) if t == 1 else slot + torch.arange(t, device=slot.device)
        return cache.rope[0][:, idx], cache.rope[1][:, idx]

    @staticmethod
    def _mask(b: int, t: int, past: int, key_mask: torch.Tensor | None, device) -> torch.Tensor | None:
        """(B, 1, T, past+T) boolean, True = may attend. None when nothing needs masking."""
        if key_mask is None and t == 1:
            return None  # one new token may look at every cached one
        total = past + t
        q_slot = torch.arange(past, total, device=device)[:, None]
        k_slot = torch.arange(total, device=device)[None, :]
        mask = (k_slot <= q_slot)[None, None].expand(b, 1, t, total)
        if key_mask is not None:
            # A padding query would see no key at all (softmax of all -inf = NaN, and NaN * 0 in
            # the next layer is still NaN), so every token may always see itself.
            mask = mask & (key_mask[:, None, None, :total] | (k_slot == q_slot))
        return mask

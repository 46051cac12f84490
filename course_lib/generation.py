"""Decode loops a learner can read: prompt in, tokens out, one step at a time.

``stream_generate`` runs the model's own KV cache (``past_key_values``): the
prompt is processed once (*prefill*), then each new token costs one forward
pass over a single position (*decode*). It yields every token as soon as it
exists, with a timestamp, so callers can time TTFT and time per output token.

The greedy loops below are the same job done four ways, from slowest to fastest:

* ``generate_no_cache`` - run the whole sequence through the model for every
  new token (what you would write first; O(n^2) work);
* ``generate_kv_cache`` - the from-scratch KV cache of :mod:`course_lib.kv_cache`;
* ``generate_hf`` - Hugging Face's ``generate``, the reference;
* ``generate_compiled`` - the static cache step compiled with ``torch.compile``.

``batched_generate`` serves several prompts at once with left padding.
All return the new token ids, so their outputs can be compared exactly.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from ._checks import check_flag, check_int, check_new_tokens, check_number, check_text
from ._hf import cache_kwarg, takes_logits_to_keep
from .device import compile_supported, device_of, own_code
from .kv_cache import KVCache
from .kv_quant import KVQuantConfig
from .models import check_prompt_ids
from .scratch_llama import ScratchLlama, naive_attention
from .timing import benchmark

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One generated token."""

    token_id: int
    text: str
    index: int  # 0 for the first new token
    prompt_tokens: int
    time_s: float = 0.0  # seconds from the call until this token existed (synchronized)


def encode_prompt(tokenizer, prompt: str | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Prompt text (or ids) -> a (1, T) tensor of ids on ``device``; empty prompts are refused.

    The ids are not checked against a model here: callers pass them through
    :func:`course_lib.models.check_prompt_ids`.
    """
    if isinstance(prompt, torch.Tensor):
        ids = prompt.reshape(1, -1) if prompt.dim() == 1 else prompt
    elif isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty; give at least one character (for example 'def ')")
        check_text("prompt", prompt)
        if tokenizer is None:  # else: "'NoneType' object is not callable"
            raise ValueError("a text prompt needs its tokenizer: pass the tokenizer (tokenizer=...; load_model "
                             "returns it), or pass the prompt as a tensor of token ids")
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    else:
        raise ValueError(f"prompt must be a str or a tensor of token ids, got {type(prompt).__name__}")
    if ids.numel() == 0:
        raise ValueError("prompt has no tokens; give at least one")
    return ids.to(device)


def hf_forward(model, ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
    """One cached forward pass of a Hugging Face model: (last-position logits (B, V), the cache).

    Only the last position's logits are computed where the model allows it: a prefill of B x T tokens would
    otherwise hold B x T x vocabulary floats (805 MB for 32 x 128 tokens of SmolLM2) to keep B x vocabulary.
    """
    kwargs = {cache_kwarg(type(model)): cache} if cache is not None else {}
    if takes_logits_to_keep(type(model)):
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=ids, use_cache=True, **kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits[:, -1], new_cache


def _check_sampling(temperature: float, top_k: int | None) -> None:
    # NaN passes "< 0" and turns every probability into NaN; True would sample at temperature 1
    check_number("temperature", temperature, ">= 0 and finite (0 = greedy, typical 0.7-1)",
                 lambda v: 0 <= v < math.inf)
    if top_k is not None:
        check_int("top_k", top_k, 1, " or None (None = the whole vocabulary)")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from (B, V) logits: greedy at temperature 0, else softmax sampling."""
    _check_sampling(temperature, top_k)
    if top_k is not None and top_k > logits.size(-1):
        raise ValueError(f"top_k ({top_k}) must be <= the vocabulary size ({logits.size(-1)}), or None")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream_generate(model, tokenizer, prompt: str | torch.Tensor, max_new_tokens: int = 32,
                    temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
                    stop_at_eos: bool = True, truncate: bool = False) -> Iterator[Step]:
    """Yield new tokens one at a time, using the model's KV cache (batch size 1).

    A prompt that leaves no room for ``max_new_tokens`` in the model's context is refused (ValueError);
    ``truncate=True`` keeps the prompt's last tokens instead, with a warning.
    """
    check_new_tokens(max_new_tokens)
    _check_sampling(temperature, top_k)
    check_flag("truncate", truncate)
    device = next(model.parameters()).device
    ids = check_prompt_ids(model, encode_prompt(tokenizer, prompt, device), max_new_tokens, truncate)
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    eos = getattr(tokenizer, "eos_token_id", None)
    t0 = time.perf_counter()
    logits, past = hf_forward(model, ids)  # prefill: the whole prompt at once
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, gen)
        tok = int(nxt.item())  # .item() waits for the device, so the timestamp is honest
        yield Step(tok, tokenizer.decode([tok]) if tokenizer is not None else "", i, ids.shape[1],
                   time.perf_counter() - t0)
        if stop_at_eos and tok == eos:
            return
        if i + 1 == max_new_tokens:
            return
        logits, past = hf_forward(model, nxt.view(1, 1), past)  # decode: one position


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, truncate: bool = False) -> str:
    """Prompt -> prompt plus its continuation, as text (``truncate``: as in :func:`stream_generate`)."""
    if not isinstance(prompt, str):
        raise ValueError(f"generate takes a text prompt (and returns text), got {type(prompt).__name__}; "
                         "for token ids use stream_generate or generate_kv_cache")
    new = [s.token_id for s in stream_generate(model, tokenizer, prompt, max_new_tokens,
                                               temperature, top_k, seed, truncate=truncate)]
    return prompt + tokenizer.decode(new)


# --- greedy loops, slowest to fastest --------------------------------------------

def _as_ids(model, prompt_ids: torch.Tensor, max_new_tokens: int, device: torch.device) -> torch.Tensor:
    """(T,) or (B, T) prompt ids -> (B, T) on ``device``, checked against the model's vocabulary and context."""
    if not isinstance(prompt_ids, torch.Tensor):
        raise ValueError(f"prompt_ids must be a tensor of token ids, got {type(prompt_ids).__name__}; encode text "
                         "with the model's tokenizer: tokenizer(text, return_tensors='pt')['input_ids']")
    ids = prompt_ids.reshape(1, -1) if prompt_ids.dim() <= 1 else prompt_ids
    if ids.numel() == 0 or ids.shape[-1] == 0:
        raise ValueError("prompt has no tokens; give at least one")
    return check_prompt_ids(model, ids, max_new_tokens).to(device)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits of a HF model or a ScratchLlama, without any cache."""
    if isinstance(model, ScratchLlama):
        return model(ids, last_only=True)[:, -1]
    return model(input_ids=ids, use_cache=False).logits[:, -1]


@torch.inference_mode()
def generate_no_cache(model, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding that re-reads the whole sequence every step: (B, T) -> (B, max_new_tokens)."""
    check_new_tokens(max_new_tokens)
    ids = _as_ids(model, prompt_ids, max_new_tokens, _device_of(model))
    new = []
    for _ in range(max_new_tokens):
        nxt = _logits(model, ids).argmax(-1, keepdim=True)  # the whole sequence, again
        new.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
    return torch.cat(new, dim=1)


@torch.inference_mode()
def generate_kv_cache(model, prompt_ids: torch.Tensor, max_new_tokens: int,
                      attention: str = "sdpa", kv_quant: KVQuantConfig | None = None) -> torch.Tensor:
    """Greedy decoding with the from-scratch KV cache: one prefill, then one token per step.

    ``kv_quant`` stores the cache in 8 or 4 bits (:mod:`course_lib.kv_quant`)."""
    check_new_tokens(max_new_tokens)
    scratch = model if isinstance(model, ScratchLlama) else ScratchLlama(model, attention)
    ids = _as_ids(scratch, prompt_ids, max_new_tokens, scratch.device)
    cache = scratch.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens, kv_quant=kv_quant)
    nxt = scratch(ids, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)  # prefill
    new = [nxt]
    for _ in range(max_new_tokens - 1):
        nxt = scratch(nxt, cache)[:, -1].argmax(-1, keepdim=True)  # decode: one position
        new.append(nxt)
    return torch.cat(new, dim=1)


@torch.inference_mode()
def generate_hf(model, prompt_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The reference: ``model.generate`` greedily, exactly ``max_new_tokens`` (EOS ignored)."""
    check_new_tokens(max_new_tokens)
    ids = _as_ids(model, prompt_ids, max_new_tokens, _device_of(model))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


def _keep_argument_guards(entries) -> list[bool]:
    """torch.compile's ``guard_filter_fn`` for a decoder's step: keep the guards on the step's arguments (the token,
    the slot, the cache) and on globals; drop those on ``self`` - the model's modules, their attributes and
    weights, about ten thousand checks on the real model, 0.8 ms of every token. :meth:`CompiledDecoder.__call__`
    checks the model once per call instead (:meth:`CompiledDecoder._model_key`) and compiles anew when it changed."""
    return [not (e.name == "self" or e.name.startswith(("self.", "self["))) for e in entries]


class CompiledDecoder:
    """A static-cache decode step compiled once with ``torch.compile``, reused across calls.

    Compilation costs tens of seconds to minutes (it generates and builds C++ or
    Triton kernels), so build one and call it many times; the first call to a
    new cache size recompiles.

    On CUDA the default ``mode`` is ``"reduce-overhead"``: the step is captured as a CUDA graph and replayed,
    so a token costs one launch instead of hundreds (a 135M model is launch-bound on any modern GPU without
    it). A CUDA graph replays fixed addresses, so the cache of each (batch, max_len) is allocated once, marked
    static and reused by every call. Pass ``mode="default"`` for the compiled step without CUDA graphs.
    ``backend="eager"`` traces the same graph without generating kernels (seconds, not minutes: for checks).
    """

    def __init__(self, model, mode: str | None = None, backend: str = "inductor"):
        dev = _device_of(model)
        ok, why = compile_supported(dev) if backend == "inductor" else (True, "")
        if not ok:
            raise RuntimeError(why)
        if mode is None and dev.type == "cuda" and backend == "inductor":
            mode = "reduce-overhead"
        self.mode = mode or "default"
        self.cuda_graphs = dev.type == "cuda" and backend == "inductor" and self.mode in ("reduce-overhead",
                                                                                              "max-autotune")
        self._own_scratch = not isinstance(model, ScratchLlama)
        self.scratch = ScratchLlama(model) if self._own_scratch else model
        self._backend = backend
        self._compile()

    def _compile(self) -> None:
        # each lazy: only the ones a caller uses are ever compiled. step -> logits; next_token -> the greedy token,
        # argmax and the slot's advance inside the graph (no ATen call of its own per token); verify -> a
        # speculative pass's logits; verify_tokens -> its greedy tokens, the argmax inside the graph
        # torch.compile takes a mode or options, not both: CUDA graphs' modes keep every guard (a replay costs one
        # launch; the guards are checked on the CPU meanwhile). A dict each: torch.compile pops the filter from it.
        def compiled(fn: Callable) -> Callable:
            if self.mode != "default":
                return torch.compile(own_code(fn), mode=self.mode, fullgraph=True, backend=self._backend)
            # emulate_precision_casts: round to bf16/fp16 where eager rounds, not only at a fused kernel's end, so
            # the one-token step and the verification pass (different graphs, fused differently) compute each
            # token's logits alike, and both match the eager forward
            return torch.compile(own_code(fn), fullgraph=True, backend=self._backend,
                                 options={"guard_filter_fn": _keep_argument_guards, "emulate_precision_casts": True})

        self.step: Callable = compiled(self.scratch.decode_static)
        self.next_token: Callable = compiled(self._next_token)
        self.verify: Callable = compiled(self.scratch.verify_static)  # a speculative pass: logits (B, T, vocab)
        self.verify_tokens: Callable = compiled(self._verify_tokens)  # prompt lookup's pass (speculative.py)
        self._caches: dict[tuple[int, int], KVCache] = {}
        self._key: tuple | None = None

    def _model_key(self) -> tuple:
        """What the step was traced against, in place of the guards dropped from it: every module of the model
        (and the fused projections) with its type and kernel, every tensor's identity, address, shape and dtype.
        A tensor written in place keeps its key (the graph reads it where it is); a module swapped (``quantize_``,
        ``prune_``), a tensor replaced or cast changes it."""
        s = self.scratch
        mods = [*s.hf_model.modules(), *(f for f in (*s.qkv, *s.gate_up) if f is not None)]
        key: list = []
        for m in mods:
            key.append((id(m), type(m), getattr(m, "kernel", None), m.training))
            key.extend((id(t), t.data_ptr(), t.shape, t.dtype, t.device)
                       for t in itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False)))
        return tuple(key)

    def _check_model(self) -> None:
        """Compile anew if the model changed since the step was traced (its guards on the model are dropped)."""
        self.scratch.sync_fused()  # the fused copies first: a prefill would refresh them anyway
        key = self._model_key()
        if self._key is not None and key != self._key:
            log.info("the model changed since its step was compiled: compiling again")
            if self._own_scratch:
                self.scratch = ScratchLlama(self.scratch.hf_model, self.scratch.attention, self.scratch.fuse)
            self._compile()
            self.scratch.sync_fused()
            key = self._model_key()
        self._key = key

    def _next_token(self, tok: torch.Tensor, slot: torch.Tensor, cache: KVCache) -> torch.Tensor:
        nxt = self.scratch.decode_static(tok, slot, cache).argmax(-1, keepdim=True)
        slot.add_(1)  # in place: the next call sees the same tensor, so the graph is reused
        return nxt

    def _verify_tokens(self, toks: torch.Tensor, slot: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # the greedy token after each of the T positions (B, T): the argmax in the graph, so the (T, vocab) logits
        # are never written out and read again
        return self.scratch.verify_static(toks, slot, cache).argmax(-1)

    def _cache(self, batch: int, max_len: int) -> KVCache:
        if not self.cuda_graphs:
            return self.scratch.new_cache(batch, max_len)
        cache = self._caches.get((batch, max_len))
        if cache is None:
            cache = self._caches[(batch, max_len)] = self.scratch.new_cache(batch, max_len)
            for t in [*cache.k, *cache.v, *(cache.rope or ())]:  # used in place by the graph: never moved
                torch._dynamo.mark_static_address(t)
        cache.length = 0  # stale slots are masked (decode_static attends to slots <= its own only)
        return cache

    def start(self, prompt_ids: torch.Tensor, max_new_tokens: int, max_len: int | None = None,
              room: int = 0) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """Check the model, prefill the prompt (eagerly) into a static cache: (first token (B, 1), its slot, cache).
        The cache holds ``max_len`` slots (default: prompt + ``max_new_tokens`` + ``room``)."""
        check_new_tokens(max_new_tokens)
        self._check_model()
        s = self.scratch
        ids = _as_ids(s, prompt_ids, max_new_tokens, s.device)
        cache = self._cache(ids.shape[0], max_len or ids.shape[1] + max_new_tokens + room)
        nxt = s(ids, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        return nxt, torch.tensor(ids.shape[1], device=s.device), cache

    @torch.inference_mode()
    def __call__(self, prompt_ids: torch.Tensor, max_new_tokens: int, max_len: int | None = None,
                 eos: int | None = None) -> torch.Tensor:
        """Greedy tokens (B, new) after ``prompt_ids``; with ``eos`` (batch 1), stop after that token as plain
        generation does (one look at each token: a sync per step, microseconds on a CPU)."""
        nxt, slot, cache = self.start(prompt_ids, max_new_tokens, max_len)
        if eos is not None and nxt.shape[0] != 1:
            raise ValueError(f"eos stops one sequence: give a batch of 1 (got {nxt.shape[0]}) or eos=None")
        new = [nxt]
        for _ in range(max_new_tokens - 1):
            if eos is not None and nxt.item() == eos:
                break
            if self.cuda_graphs:  # a graph replay must not mutate an input it does not own: advance outside
                torch.compiler.cudagraph_mark_step_begin()  # each step is a new replay; last step's output is read
                nxt = self.step(nxt, slot, cache).argmax(-1, keepdim=True)
                slot += 1
            else:
                nxt = self.next_token(nxt, slot, cache)
            new.append(nxt)
        return torch.cat(new, dim=1)


def generate_compiled(model, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """One-off compiled generation (compiles on the first call; keep a CompiledDecoder to reuse)."""
    return CompiledDecoder(model)(prompt_ids, max_new_tokens)


@torch.inference_mode()
def batched_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Several prompts in one batch, greedily, with the from-scratch cache. Returns the new text of each.

    Prompts differ in length, so the short ones are *left*-padded: every row's
    last real token sits in the same column, which is where the next token is
    predicted. Padding is masked out of attention, and RoPE positions count
    only real tokens, so each row gets exactly the tokens it would get alone.
    """
    check_new_tokens(max_new_tokens)
    if not prompts or any(not isinstance(p, str) or not p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    if tokenizer is None:
        raise ValueError("batched_generate needs the prompts' tokenizer (load_model returns it)")
    for i, p in enumerate(prompts):
        check_text(f"prompts[{i}]", p)
    scratch = model if isinstance(model, ScratchLlama) else ScratchLlama(model)
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = check_prompt_ids(scratch, torch.tensor([[pad] * (width - len(r)) + r for r in rows]), max_new_tokens,
                           what="longest prompt").to(scratch.device)
    real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=scratch.device)
    cache = scratch.new_cache(len(rows), width + max_new_tokens)
    key_mask = torch.cat([real, torch.ones(len(rows), max_new_tokens, dtype=torch.bool, device=real.device)], 1)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)  # padding gets position 0; it is masked anyway
    nxt = scratch(ids, cache, positions, key_mask, last_only=True)[:, -1].argmax(-1, keepdim=True)
    next_pos = positions[:, -1:] + 1
    new = [nxt]
    for _ in range(max_new_tokens - 1):
        nxt = scratch(nxt, cache, next_pos, key_mask)[:, -1].argmax(-1, keepdim=True)
        next_pos = next_pos + 1
        new.append(nxt)
    out = torch.cat(new, dim=1)
    return [tokenizer.decode(r.tolist()) for r in out]


def _device_of(model) -> torch.device:
    return model.device if isinstance(model, ScratchLlama) else device_of(model)


# --- naive attention vs SDPA -----------------------------------------------------

def attention_cost(seq_lens: list[int], heads: int = 8, head_dim: int = 64, batch: int = 1,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   repeat: int = 5) -> list[dict]:
    """Time and memory of causal prefill attention, naive vs ``scaled_dot_product_attention``.

    Memory is the bytes allocated during one call: measured by the CUDA
    allocator on a GPU, by the PyTorch profiler's CPU allocation records on CPU.
    The naive version materialises a (T x T) score matrix per head; a fused
    kernel works in tiles and never holds it whole.
    """
    dev = torch.device(device)
    rows = []
    for t in seq_lens:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(batch, heads, t, head_dim, generator=g).to(dev, dtype) for _ in range(3))
        mask = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        fns = {"naive": lambda q=q, k=k, v=v, m=mask: naive_attention(q, k, v, m),
               "sdpa": lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)}
        for name, fn in fns.items():
            res = benchmark(fn, warmup=1, repeat=repeat, device=dev)
            rows.append(dict(method=name, seq_len=t, ms=res.median * 1e3, alloc_mb=_allocated_mb(fn, dev),
                             scores_mb=batch * heads * t * t * 4 / 2**20))
    return rows


def _allocated_mb(fn: Callable, dev: torch.device) -> float:
    """Bytes allocated while ``fn`` runs (peak over the baseline on CUDA; sum of allocations on CPU)."""
    with torch.inference_mode():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            fn()
            torch.cuda.synchronize(dev)
            return (torch.cuda.max_memory_allocated(dev) - base) / 2**20

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
        return allocated / 2**20

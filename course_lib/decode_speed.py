"""Decode-speed experiments: how fast a model answers, measured with the harness of :mod:`course_lib.timing`.

:mod:`course_lib.timing` times any function and knows nothing about models; this module runs the decode loops of
:mod:`course_lib.generation` under it:

* ``time_generation`` - what a user of a chat model feels: time to first token (TTFT) and time per output token
  (TPOT), each token stamped as it is streamed;
* ``decode_speed`` - several models compared fairly: interleaved, round after round, eager or compiled;
* ``measure_decode_step`` - one cached decode step at a fixed context, and ``measure_step_overhead``: the same
  step on a model of the same depth but almost no width, whose time is the per-step overhead (Python, the
  framework, kernel launches) that the roofline model of :mod:`course_lib.roofline` does not contain;
* ``kv_cache_step_times`` - the same decode step at a long context with the KV cache stored in float, 8 or
  4 bits (:mod:`course_lib.kv_quant`), interleaved.

Every timing runs on the model's own device: the prompt is moved there and each measurement synchronizes it.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

from ._checks import check_int
from .device import device_of
from .generation import CompiledDecoder, hf_forward, stream_generate
from .kv_quant import KVQuantConfig
from .scratch_llama import ScratchLlama
from .timing import BenchResult, GenerationTiming, benchmark, compare, interleaved, synchronize, time_tokens


def time_generation(model, tokenizer, prompt: str | torch.Tensor, max_new_tokens: int = 32,
                    warmup: int = 1, repeat: int = 3, generate_fn=None) -> GenerationTiming:
    """Greedy-generate ``max_new_tokens`` and time each token as it is produced.

    ``generate_fn`` is a streaming generator like :func:`course_lib.generation.stream_generate`
    (the default); the median over ``repeat`` runs of TTFT and TPOT is reported.
    """
    check_int("max_new_tokens", max_new_tokens, 2, " to time the decode phase")
    check_int("warmup", warmup, 0)
    check_int("repeat", repeat, 1)
    gen = generate_fn or stream_generate
    device = device_of(model)
    runs = []
    for i in range(warmup + repeat):
        stamps: list[float] = []
        synchronize(device)
        t0 = time.perf_counter()
        n_prompt = 0
        for step in gen(model, tokenizer, prompt, max_new_tokens=max_new_tokens, stop_at_eos=False):
            synchronize(device)  # the token must exist before we stamp it
            stamps.append(time.perf_counter() - t0)
            n_prompt = step.prompt_tokens
        if i >= warmup:
            runs.append((stamps, n_prompt))
    ttfts = [s[0] for s, _ in runs]
    gaps = [b - a for s, _ in runs for a, b in zip(s, s[1:])]
    tpot = statistics.median(gaps)
    best = runs[len(runs) // 2][0]
    return GenerationTiming(
        ttft_s=statistics.median(ttfts), tpot_s=tpot, tokens_per_s=1.0 / tpot,
        new_tokens=len(best), total_s=statistics.median(s[-1] for s, _ in runs),
        prompt_tokens=runs[0][1], token_times=tuple(best),
    )


def decode_speed(models: dict, prompt: torch.Tensor, new_tokens: int = 16, rounds: int = 3,
                 errors: dict | None = None, compiled: bool = False,
                 make_decoder: Callable | None = None) -> dict[str, tuple[float, float]]:
    """Decode tokens/s and prefill ms of several models, timed **interleaved**; median over ``rounds``.

    Round after round, each model in turn: a change in the machine's state during the run (clock, a neighbour on
    the host) then lands on every model alike, so the ratios between them hold even when absolute numbers drift.
    Timing one model after another does not (docs/decode.md, "Why interleaved rounds", has a measured example).
    Each model gets one untimed warm-up first. The prompt is moved to each model's device, and
    every timing synchronizes that device (a GPU runs asynchronously).

    ``compiled=False`` times the course's streaming generator (Hugging Face forward, dynamic cache: what a
    notebook runs). ``compiled=True`` times ``make_decoder(model)`` instead, by default
    :class:`course_lib.generation.CompiledDecoder` (static cache, ``torch.compile``; the warm-up compiles, tens of
    seconds per model on a CPU): with the per-step Python overhead gone, speed follows the bytes each step reads.
    Pass e.g. ``make_decoder=lambda m: CompiledDecoder(m, backend="eager")`` for another compile setting.

    With ``errors`` (a dict), a model that raises is dropped from the remaining rounds and its message stored
    under its name, instead of ending the whole measurement (:func:`course_lib.timing.interleaved` runs the
    rounds).
    """
    check_int("new_tokens", new_tokens, 2, " to time the decode phase")
    check_int("rounds", rounds, 1)
    ids = prompt.view(1, -1)
    runs: dict[str, tuple] = {}  # name -> (device, the prompt there, the compiled decoder or None)

    def prepare(name: str) -> None:
        m = models[name]
        dev = device_of(m)
        ids_m = ids.to(dev)  # the prompt goes where the model is; each timing synchronizes that device
        if not compiled:
            runs[name] = (dev, ids_m, None)
            time_generation(m, None, ids_m, max_new_tokens=2, warmup=0, repeat=1)
            return
        dec = (make_decoder or CompiledDecoder)(m)  # one cache size for every call, so it compiles once
        runs[name] = (dev, ids_m, lambda p, n: dec(p, n, max_len=ids.shape[1] + new_tokens))
        runs[name][2](ids_m, 2)
        synchronize(dev)

    def sample(name: str) -> tuple[float, float]:
        """(decode tokens/s, prefill seconds) of one timed run."""
        m, (dev, ids_m, decoder) = models[name], runs[name]
        if decoder is not None:
            first, tok_s = time_tokens(decoder, ids_m, new_tokens, device=dev)
            return tok_s, first
        t = time_generation(m, None, ids_m, max_new_tokens=new_tokens, warmup=0, repeat=1)
        return t.tokens_per_s, benchmark(lambda: m(input_ids=ids_m), warmup=0, repeat=1, device=dev).median

    res = interleaved({k: functools.partial(sample, k) for k in models}, rounds, warmup=0, timed=False,
                      prepare={k: functools.partial(prepare, k) for k in models}, keep_errors=errors is not None)
    if errors is not None:
        errors.update(res.errors)
    return {k: (res.result(k, lambda s: s[0]).median, res.result(k, lambda s: s[1]).median * 1e3)
            for k in res.samples}


# --- one decode step, and the overhead in it --------------------------------------

def measure_decode_step(model, context: int = 128, batch: int = 1, warmup: int = 3, repeat: int = 10):
    """Median time of one Hugging Face decode step at ``context`` cached tokens (a BenchResult).

    The cache is cropped back after each timed call, so every sample sees the
    same context length.
    """
    check_int("context", context, 1, " (tokens in the cache before the timed step)")
    check_int("batch", batch, 1)
    dev = device_of(model)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, context), generator=g).to(dev)
    tok = torch.randint(0, vocab, (batch, 1), generator=g).to(dev)
    with torch.inference_mode():
        _, past = hf_forward(model, prompt)

    def step():
        hf_forward(model, tok, past)
        past.crop(-1)  # drop the token just added: every sample sees the same context

    return benchmark(step, warmup=warmup, repeat=repeat, device=dev)


def overhead_model(config, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A model with the same depth and heads as ``config`` but almost no width: its step time is overhead."""
    cfg = config.__class__.from_dict(config.to_dict())
    cfg.hidden_size = cfg.num_attention_heads * 8
    cfg.head_dim = 8
    cfg.intermediate_size = 16
    cfg.vocab_size = 256
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def measure_step_overhead(config, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                          context: int = 128, repeat: int = 10) -> float:
    """Seconds of a decode step that moves almost no bytes: Python and framework cost per step."""
    model = overhead_model(config, dtype, device)
    return measure_decode_step(model, context=context, repeat=repeat).median


def kv_cache_step_times(model, context: int, kv_quants: dict[str, KVQuantConfig | None], batch: int = 1,
                        rounds: int = 5, warmup: int = 1) -> dict[str, BenchResult]:
    """One decode step at ``context`` cached tokens, per KV-cache format, timed interleaved (a BenchResult each).

    ``kv_quants`` maps a name to a :class:`~course_lib.kv_quant.KVQuantConfig` (None: the float cache). The
    from-scratch static step (:meth:`~course_lib.scratch_llama.ScratchLlama.decode_static`) runs on a cache
    whose ``context`` slots hold random keys and values (a step's time does not depend on their values, and
    a prefill of thousands of tokens would cost more than the timing); every sample rewrites the same slot.
    """
    check_int("context", context, 1, " (tokens in the cache before the timed step)")
    check_int("batch", batch, 1)
    scratch = model if isinstance(model, ScratchLlama) else ScratchLlama(model)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, scratch.shape.vocab, (batch, 1), generator=g).to(scratch.device)
    slot = torch.tensor(context, device=scratch.device)
    steps = {}
    for name, cfg in kv_quants.items():
        cache = scratch.new_cache(batch, context + 1, kv_quant=cfg)
        for layer in range(scratch.shape.n_layers):
            for store in (cache.k[layer], cache.v[layer]):
                filled = torch.randn(*store.shape[:2], context, store.shape[-1], generator=g).to(scratch.dtype)
                store[:, :, :context] = filled.to(scratch.device)
        steps[name] = (lambda c: lambda: scratch.decode_static(tok, slot, c))(cache)
    return compare(steps, rounds=rounds, warmup=warmup, device=scratch.device)

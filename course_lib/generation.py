"""Decode loops a learner can read: prompt in, tokens out, one step at a time.

``stream_generate`` runs the model's own KV cache (``past_key_values``): the
prompt is processed once (*prefill*), then each new token costs one forward
pass over a single position (*decode*). It yields every token as soon as it
exists, so callers can time TTFT and time per output token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Step:
    """One generated token."""

    token_id: int
    text: str
    index: int  # 0 for the first new token
    prompt_tokens: int


def encode_prompt(tokenizer, prompt: str | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Prompt text (or ids) -> a (1, T) tensor of ids on ``device``; empty prompts are refused."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt.reshape(1, -1) if prompt.dim() == 1 else prompt
    elif isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty; give at least one character (for example 'def ')")
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    else:
        raise ValueError(f"prompt must be a str or a tensor of token ids, got {type(prompt).__name__}")
    if ids.numel() == 0:
        raise ValueError("prompt has no tokens; give at least one")
    return ids.to(device)


def _check_new_tokens(max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from (B, V) logits: greedy at temperature 0, else softmax sampling."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
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
                    stop_at_eos: bool = True) -> Iterator[Step]:
    """Yield new tokens one at a time, using the model's KV cache (batch size 1)."""
    _check_new_tokens(max_new_tokens)
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt, device)
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    eos = getattr(tokenizer, "eos_token_id", None)
    out = model(input_ids=ids, use_cache=True)  # prefill: the whole prompt at once
    past = out.past_key_values
    logits = out.logits[:, -1]
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, gen)
        tok = int(nxt.item())
        yield Step(tok, tokenizer.decode([tok]) if tokenizer is not None else "", i, ids.shape[1])
        if stop_at_eos and tok == eos:
            return
        if i + 1 == max_new_tokens:
            return
        out = model(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True)  # decode
        past = out.past_key_values
        logits = out.logits[:, -1]


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0) -> str:
    """Prompt -> prompt plus its continuation, as text."""
    new = [s.token_id for s in stream_generate(model, tokenizer, prompt, max_new_tokens,
                                               temperature, top_k, seed)]
    return prompt + tokenizer.decode(new)

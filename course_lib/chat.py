"""Chatting with an instruction-tuned model: messages in, a streamed answer out, TTFT and TPOT measured.

A chat model does not read raw text: its *chat template* wraps each message in
role markers (for SmolLM2, ``<|im_start|>user ... <|im_end|>``) and ends with
the header of the assistant's turn, so the model's next tokens are its answer.
The answer ends with the end-of-turn token (the tokenizer's EOS).

Decoding is :func:`course_lib.generation.stream_generate` (prefill once, then
one token per step with the model's KV cache), so a quantized or pruned model
chats through the same loop. Each token is timed as it appears
(:func:`course_lib.timing.stream_timing`): time to first token (TTFT, what a
user waits before anything happens) and time per output token (TPOT, the
reading speed of the answer).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from ._checks import check_text
from .generation import stream_generate
from .timing import GenerationTiming, stream_timing

Messages = str | list[dict]
ROLES = ("system", "user", "assistant")


def _as_messages(messages: Messages, system: str | None) -> list[dict]:
    if isinstance(messages, str):
        if not messages.strip():
            raise ValueError("the message is empty; ask something, e.g. 'What is the capital of France?'")
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a string or a non-empty list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs 'role' in {ROLES} and a string 'content', got {m!r}")
    for i, m in enumerate(messages):
        check_text(f"messages[{i}]['content']", m["content"])
    if system is not None:
        if not isinstance(system, str):
            raise ValueError(f"system must be a string or None, got {type(system).__name__}")
        check_text("system", system)
        messages = [{"role": "system", "content": system}, *[m for m in messages if m["role"] != "system"]]
    return messages


def chat_prompt(tokenizer, messages: Messages, system: str | None = None) -> str:
    """The text the model reads: ``messages`` through the tokenizer's chat template, ending at the answer's start."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template (not a chat model); use course_lib.generate for "
                         "plain text completion, or load 'smollm2-135m-instruct'")
    return tokenizer.apply_chat_template(_as_messages(messages, system), tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class ChatReply:
    """One answer, as the user saw it arrive."""

    text: str
    token_ids: tuple[int, ...]
    finished: bool  # True: the model ended its turn; False: cut at max_new_tokens
    timing: GenerationTiming

    def summary(self) -> str:
        t = self.timing
        end = "end of turn" if self.finished else "cut at max_new_tokens"
        return (f"{t.new_tokens} tokens ({end}), prompt {t.prompt_tokens} tokens: TTFT {t.ttft_s * 1e3:.0f} ms, "
                f"TPOT {t.tpot_s * 1e3:.1f} ms ({t.tokens_per_s:.1f} tokens/s)")


def _write_stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def chat(model, tokenizer, messages: Messages, max_new_tokens: int = 128,
         stream: Callable[[str], object] | bool | None = None, system: str | None = None,
         temperature: float = 0.0, top_k: int | None = None, seed: int = 0, truncate: bool = False) -> ChatReply:
    """Answer ``messages`` (a question string, or a list of role/content dicts); greedy unless ``temperature > 0``.

    ``stream``: a callable that receives each new piece of text as it is decoded
    (``stream=True`` writes the pieces to the notebook's output). A conversation longer than the model's
    context is refused; ``truncate=True`` keeps its last tokens instead (the start, system prompt included,
    is then lost), with a warning.
    """
    stream = _write_stdout if stream is True else (stream or None)
    if stream is not None and not callable(stream):
        raise ValueError(f"stream must be a callable taking a string, True (print), or None; got {stream!r}")
    device = next(model.parameters()).device
    prompt = chat_prompt(tokenizer, messages, system)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"][0].to(device)
    eos = tokenizer.eos_token_id
    new: list[int] = []
    times: list[float] = []
    shown, finished = "", False
    n_prompt = int(ids.numel())
    for step in stream_generate(model, tokenizer, ids, max_new_tokens, temperature, top_k, seed, truncate=truncate):
        times.append(step.time_s)
        n_prompt = step.prompt_tokens  # what the model read: fewer than the conversation's tokens if truncated
        if step.token_id == eos:
            finished = True
            break
        new.append(step.token_id)
        # Decode the whole answer so far, not the token alone: a byte-level BPE token can be half a
        # UTF-8 character, which only becomes text with its neighbour ("\ufffd" until then).
        text = tokenizer.decode(new, skip_special_tokens=True)
        if stream and not text.endswith("\ufffd") and len(text) > len(shown):
            stream(text[len(shown):])
            shown = text
    text = tokenizer.decode(new, skip_special_tokens=True)
    if stream and len(text) > len(shown):
        stream(text[len(shown):])
    return ChatReply(text, tuple(new), finished, stream_timing(times, n_prompt))

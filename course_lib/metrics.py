"""Quality metrics: perplexity, next-token accuracy, model size."""

from __future__ import annotations

import ast
import math
import textwrap
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ._checks import check_text
from .chat import chat_prompt
from .data import PROSE_EVAL_TOKENS, encode_prose, encode_split, load_documents
from .generation import generate
from .kv_quant import KVQuantConfig, cache_kwargs
from .models import check_token_ids, context_length
from .prompts import prompts as default_prompts


def _as_ids(model, tokenizer_or_ids, split: str, max_tokens: int | None, seq_len: int,
            batch_size: int) -> torch.Tensor:
    for name, v, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("max_tokens", max_tokens, 2)):
        if (v is not None or name != "max_tokens") and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ValueError(f"{name} must be an int >= {low}{' or None' if name == 'max_tokens' else ''}, "
                             f"got {v!r}")
    context = context_length(model)
    if context is not None and seq_len > context:
        # Positions past the context were never trained: course-tiny (512) scored 99.3 with windows of 2,048
        # and 335.7 with 8,191, against 54.7 with 256, and nothing said the numbers were meaningless.
        raise ValueError(f"seq_len ({seq_len}) is longer than the model's context of {context} tokens "
                         f"(config.max_position_embeddings): positions past it give a wrong, much higher "
                         f"perplexity; use seq_len <= {context}")
    if isinstance(tokenizer_or_ids, torch.Tensor):
        check_token_ids(model, tokenizer_or_ids, "token ids")
        ids = tokenizer_or_ids.flatten()
    else:
        # ~4 characters per token is plenty to fill max_tokens without encoding the whole split.
        max_chars = None if max_tokens is None else max_tokens * 8
        ids = encode_split(tokenizer_or_ids, split, max_chars=max_chars)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not isinstance(tokenizer_or_ids, torch.Tensor):
        check_token_ids(model, ids, "the tokenizer's ids")  # a tokenizer of another model
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    return ids


def _last_window(n_ids: int, seq_len: int) -> tuple[int, int] | None:
    """(start, targets it skips) of the window that scores what the full windows leave over, or None.

    Non-overlapping windows of ``seq_len`` targets leave the last ``(n_ids - 1) % seq_len`` targets unscored
    (8,192 ids in windows of 512 scored 7,680 of the 8,191 targets). One more window ends at the last id, so
    those targets are read with a full ``seq_len`` of context; its first targets were scored already and are
    skipped (the strided evaluation of Hugging Face's perplexity guide).
    """
    n_targets = n_ids - 1
    rest = n_targets % seq_len
    if n_targets <= seq_len or rest == 0:
        return None
    return n_targets - seq_len, seq_len - rest


@torch.inference_mode()
def _nll_and_correct(model, ids: torch.Tensor, seq_len: int, batch_size: int,
                     kv_quant: KVQuantConfig | None = None) -> tuple[float, int, int]:
    """Sum of next-token NLL, correct top-1 predictions and count, over every target of ``ids``.

    Non-overlapping windows of ``seq_len`` targets, then one window ending at the last id for the targets
    left over (:func:`_last_window`): the count is always ``ids.numel() - 1``. With ``kv_quant`` every window
    reads its keys and values through a fresh quantized cache (:mod:`course_lib.kv_quant`): each token attends
    to rounded K/V, its own included, as it would decoding token by token from that cache.
    """
    device = next(model.parameters()).device
    n_windows = max(1, (ids.numel() - 1) // seq_len)
    windows = [ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n_windows)]
    total_nll, correct, count = 0.0, 0, 0
    for b in range(0, len(windows), batch_size):
        chunk = windows[b : b + batch_size]
        length = min(len(w) for w in chunk)
        x = torch.stack([w[:length] for w in chunk]).to(device)
        logits = model(input_ids=x[:, :-1], **cache_kwargs(model, kv_quant)).logits.float()
        targets = x[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
    last = _last_window(ids.numel(), seq_len)
    if last is not None:  # run on its own: the full windows' batches (and numbers) stay as they were
        start, skip = last
        x = ids[start : start + seq_len + 1].to(device)
        logits = model(input_ids=x[None, :-1], **cache_kwargs(model, kv_quant)).logits[0, skip:].float()
        targets = x[1 + skip :]
        total_nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
    return total_nll, correct, count


def perplexity(model, tokenizer_or_ids, split: str = "heldout", max_tokens: int | None = 32768,
               seq_len: int = 256, batch_size: int = 8, kv_quant: KVQuantConfig | None = None) -> float:
    """exp(mean next-token NLL) over every next-token target of the ids, in windows of ``seq_len``.

    ``tokenizer_or_ids`` is either a tokenizer (the held-out split is encoded
    with it) or a 1-D tensor of token ids. N ids give N - 1 targets, all scored: non-overlapping windows of
    ``seq_len`` targets, and for the targets left over a last window that ends at the last id (its earlier
    targets, scored already, are skipped). ``seq_len`` longer than the model's context is refused.
    ``kv_quant``: read keys and values through a quantized KV cache (a Hugging Face model only).
    """
    ids = _as_ids(model, tokenizer_or_ids, split, max_tokens, seq_len, batch_size)
    nll, _, count = _nll_and_correct(model, ids, seq_len, batch_size, kv_quant)
    return math.exp(nll / count)


def next_token_accuracy(model, tokenizer_or_ids, split: str = "heldout", max_tokens: int | None = 32768,
                        seq_len: int = 256, batch_size: int = 8) -> float:
    """Fraction of positions where the top-1 prediction is the actual next token."""
    ids = _as_ids(model, tokenizer_or_ids, split, max_tokens, seq_len, batch_size)
    _, correct, count = _nll_and_correct(model, ids, seq_len, batch_size)
    return correct / count


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of real storage: every distinct parameter and buffer (tied weights once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr() if t.device.type != "meta" else id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def stored_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights take as stored, including torch's packed dynamic-quantized Linear and torchao
    tensor subclasses: what a model holds, unlike :func:`course_lib.anatomy.estimated_weight_bytes` (a parameter
    count times a format's bytes per weight)."""
    total = 0
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, b = packed._weight_bias()
            total += w.numel() * 1 + (0 if b is None else b.numel() * b.element_size())
            total += w.q_per_channel_scales().numel() * 8 if w.qscheme() != torch.per_tensor_affine else 8
    try:
        from torchao.utils import get_model_size_in_bytes

        if any(type(p).__module__.startswith("torchao") for p in model.parameters()):
            return total + get_model_size_in_bytes(model)
    except ImportError:
        pass
    return total + model_size_bytes(model)


# --- a task metric: does the model's completion of a held-out function still compile? -----------


def function_prompts(n: int = 32, split: str = "heldout", min_lines: int = 4,
                     max_lines: int = 30) -> list[str]:
    """``n`` prompts, each a held-out function cut after the first line of its body.

    Functions are picked deterministically (every k-th of those with
    ``min_lines``..``max_lines`` lines, in file order) and dedented to column 0.
    The prompt has no trailing newline: the byte-level BPE merges a newline with
    the next line's indentation into one token, so a prompt ending in a bare
    newline would force a token boundary the model rarely saw in training.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    candidates: list[str] = []
    for doc in load_documents(split):
        try:
            tree = ast.parse(doc.text)
        except SyntaxError:
            continue
        lines = doc.text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.decorator_list:
                length = node.end_lineno - node.lineno + 1
                if min_lines <= length <= max_lines:
                    head = lines[node.lineno - 1 : node.body[0].lineno]
                    candidates.append(textwrap.dedent("\n".join(head)))
    step = max(1, len(candidates) // n)
    return candidates[::step][:n]


def _cut_function(prompt: str, completion: str) -> str:
    """Prompt + completion up to the end of the function: the first non-blank line back at column 0."""
    lines = (prompt + completion).split("\n")
    n_prompt = prompt.count("\n") + 1  # the prompt's last line is completed by the model
    kept = lines[:n_prompt]
    for line in lines[n_prompt:-1]:  # the last piece has no newline yet: an unfinished line
        if line.strip() and not line.startswith((" ", "\t")):
            break
        kept.append(line)
    return "\n".join(kept) + "\n"


def compile_rate(model, tokenizer, n: int = 32, max_new_tokens: int = 96, prompts: list[str] | None = None,
                 progress: bool = False) -> float:
    """Fraction of held-out functions whose greedy completion gives code that compiles.

    A task metric beyond perplexity: a compressed model can keep its perplexity
    close and still break syntax (unclosed brackets, wrong indentation).
    """
    prompts = prompts if prompts is not None else function_prompts(n)
    ok = 0
    for p in tqdm(prompts, desc="compile rate", disable=not progress):
        text = generate(model, tokenizer, p, max_new_tokens=max_new_tokens)
        try:
            compile(_cut_function(p, text[len(p):]), "<generated>", "exec")
            ok += 1
        except (SyntaxError, ValueError):
            pass
    return ok / len(prompts)


# --- the real model's quality: prose and code perplexity, answer agreement ------------------------


def prose_perplexity(model, tokenizer, split: str = "heldout", max_tokens: int | None = None,
                     seq_len: int = 512, batch_size: int = 4, kv_quant: KVQuantConfig | None = None) -> float:
    """Perplexity on English prose: the fixed slice of CPython's ``pydoc_data.topics`` (first 8,192 tokens).

    ``max_tokens`` below 8,192 measures a shorter prefix of the same slice (quick mode); ``kv_quant`` reads
    keys and values through a quantized KV cache.
    """
    ids = encode_prose(tokenizer, split, max_tokens=max_tokens or PROSE_EVAL_TOKENS)
    return perplexity(model, ids, max_tokens=None, seq_len=seq_len, batch_size=batch_size, kv_quant=kv_quant)


def code_perplexity(model, tokenizer, max_tokens: int = 8192, seq_len: int = 512, batch_size: int = 4) -> float:
    """Perplexity on held-out Python code: the first ``max_tokens`` of the stdlib held-out modules."""
    return perplexity(model, tokenizer, "heldout", max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size)


def _chat_rows(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt as the model reads it: through the chat template when it has one, else as plain text."""
    if getattr(tokenizer, "chat_template", None):
        prompts = [chat_prompt(tokenizer, p) for p in prompts]
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


@torch.inference_mode()
def greedy_answers(model, tokenizer, prompts: list[tuple[str, str]] | list[str] | None = None,
                   n_tokens: int = 16, batch_size: int = 16, kv_quant: KVQuantConfig | None = None) -> torch.Tensor:
    """The first ``n_tokens`` greedy answer tokens to each prompt, (P, n_tokens); after EOS, EOS repeats.

    Prompts are left-padded into batches and run through the model's own ``generate``, so a quantized or
    pruned model (whose layers were swapped) answers through the same code. Default prompts:
    :func:`course_lib.prompts.prompts` (50, fixed). ``kv_quant``: decode from a quantized KV cache.
    """
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    texts = [p if isinstance(p, str) else p[1] for p in (prompts if prompts is not None else default_prompts())]
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise ValueError("prompts must be a non-empty list of non-empty strings (or (kind, prompt) pairs)")
    for i, t in enumerate(texts):
        check_text(f"prompts[{i}]", t)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    rows = _chat_rows(tokenizer, texts)
    out = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos, **cache_kwargs(model, kv_quant))[:, width:].cpu()
        # Rows that ended early are padded (and all rows stop when every one has): make the tail EOS.
        gen = torch.cat([gen, torch.full((gen.shape[0], n_tokens - gen.shape[1]), eos)], 1)
        ended = (gen == eos).long().cumsum(1) > 0
        out.append(gen.masked_fill(ended, eos))
    return torch.cat(out)


@dataclass(frozen=True)
class Agreement:
    """How often a model's greedy answers start like a reference model's."""

    first_token: float  # fraction of prompts whose first answer token matches
    exact: float  # fraction of prompts whose first n_tokens all match
    prefix: float  # mean fraction of the n_tokens matched before the first difference
    n_tokens: int
    rows: tuple[dict, ...]  # per prompt: kind, prompt, both answers, matched prefix

    def summary(self) -> str:
        return (f"{len(self.rows)} prompts: first token agrees {self.first_token:.0%}, first {self.n_tokens} "
                f"tokens identical {self.exact:.0%}, mean matched prefix {self.prefix:.0%}")


def matched_prefix(reference: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading tokens of ``answers`` equal ``reference`` (both (P, N)): stops at the first difference.

    After one different token the rest of a greedy answer follows from a different context, so matches after it
    are luck, not agreement.
    """
    if reference.shape != answers.shape or reference.dim() != 2:
        raise ValueError(f"reference and answers must be (prompts, tokens) tensors of one shape, got "
                         f"{tuple(reference.shape)} and {tuple(answers.shape)}")
    return (reference == answers).long().cumprod(1).sum(1)


def answer_agreement(model, tokenizer, reference, prompts: list[tuple[str, str]] | list[str] | None = None,
                     n_tokens: int = 16, batch_size: int = 16, kv_quant: KVQuantConfig | None = None) -> Agreement:
    """Compare ``model``'s greedy answers with ``reference``'s (a model, or its :func:`greedy_answers`).

    Pass the reference's answers once and compare many compressed copies against them; perplexity can
    barely move while answers already change, which is what a user notices. ``kv_quant``: ``model`` decodes
    from a quantized KV cache (pass the same model as the float reference to judge the cache alone).
    """
    pairs = prompts if prompts is not None else default_prompts()
    pairs = [("", p) if isinstance(p, str) else tuple(p) for p in pairs]
    ref = reference if isinstance(reference, torch.Tensor) else greedy_answers(
        reference, tokenizer, pairs, n_tokens, batch_size)
    if ref.dim() != 2 or ref.shape[0] != len(pairs) or ref.shape[1] < n_tokens:
        raise ValueError(f"reference answers have shape {tuple(ref.shape)}; expected ({len(pairs)}, >= {n_tokens}): "
                         "compute them with greedy_answers(reference_model, tokenizer, same prompts, n_tokens)")
    ref = ref[:, :n_tokens]
    got = greedy_answers(model, tokenizer, pairs, n_tokens, batch_size, kv_quant)
    same = got == ref
    matched = matched_prefix(ref, got)
    rows = tuple(dict(kind=k, prompt=p, matched_tokens=int(m), first_token=bool(s[0]), exact=bool(s.all()),
                      reference=tokenizer.decode(r, skip_special_tokens=True),
                      answer=tokenizer.decode(g, skip_special_tokens=True))
                 for (k, p), m, s, r, g in zip(pairs, matched.tolist(), same, ref.tolist(), got.tolist()))
    return Agreement(first_token=same[:, 0].float().mean().item(), exact=same.all(1).float().mean().item(),
                     prefix=(matched.float() / n_tokens).mean().item(), n_tokens=n_tokens, rows=rows)

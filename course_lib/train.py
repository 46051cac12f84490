"""Train the embedded model ``course-tiny`` from scratch, offline, reproducibly.

Two steps, both run by ``python -m course_lib train``:

1. a byte-level BPE tokenizer trained on the train split (the ``tokenizers`` package);
2. a small Llama (RMSNorm, RoPE, SwiGLU, grouped-query attention) trained with
   AdamW and a cosine schedule on random windows of the train split.

Seed, corpus hash, hyperparameters, timings and held-out figures are written
to ``training.json`` next to the weights so anyone can check or repeat the run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from . import data
from ._checks import check_int, check_number, check_output_path
from .fit import decay_groups, fit
from .metrics import perplexity
from .models import count_parameters

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained model. Validated on creation."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2  # grouped-query attention: 4 query heads share each KV head
    max_position_embeddings: int = 512
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 700
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 1234
    eval_every: int = 100
    eval_tokens: int = 32768
    corpus_chars: int | None = None  # cap on characters per split (None = all); for quick tests

    def __post_init__(self) -> None:
        # Every numeric field is checked: steps=True would train one step, warmup_steps=1.5 bends the schedule,
        # a negative weight_decay pushes weights away from zero, and a NaN min_lr_frac makes every lr NaN.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position_embeddings", "seq_len", "batch_size", "steps",
                     "eval_every", "eval_tokens"):
            check_int(name, getattr(self, name), 1)
        check_int("warmup_steps", self.warmup_steps, 0, " (0 = no warm-up)")
        check_int("seed", self.seed, 0)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len ({self.seq_len}) must be <= max_position_embeddings "
                             f"({self.max_position_embeddings})")
        if self.corpus_chars is not None:
            check_int("corpus_chars", self.corpus_chars, 20_000, " or None (None = the whole corpus)")
        check_number("lr", self.lr, "in (0, 1) (typical 1e-4 to 5e-3)", lambda v: 0 < v < 1)
        check_number("min_lr_frac", self.min_lr_frac, "in [0, 1] (the final lr as a fraction of lr)",
                     lambda v: 0 <= v <= 1)
        check_number("weight_decay", self.weight_decay, "in [0, 1] (0 = off, typical 0.01-0.1)",
                     lambda v: 0 <= v <= 1)


def train_tokenizer(vocab_size: int, max_chars: int | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the train split: every byte is representable, no unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts, used = [], 0
    for d in data.load_documents("train"):
        if max_chars is not None and used >= max_chars:
            break
        texts.append(d.text if max_chars is None else d.text[: max_chars - used])
        used += len(texts[-1])
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None,
        model_max_length=512,
    )


def build_model(cfg: TrainConfig, tokenizer) -> LlamaForCausalLM:
    """A fresh Llama of the configured shape (random init, seeded)."""
    torch.manual_seed(cfg.seed)
    mcfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(mcfg)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _eval_loss(model, ids: torch.Tensor, seq_len: int) -> float:
    model.eval()
    return math.log(perplexity(model, ids, seq_len=seq_len))


# --- output folders: a learner's files are never lost ----------------------------

CHECKPOINT_MARKER = ".course_lib_checkpoint"  # in every checkpoint folder the library makes, and only there


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse (before any work) an ``out`` that is a file, or a non-empty folder unless ``overwrite``.

    With ``overwrite`` the trainers write their files (weights, config, tokenizer, ``training.json``) into
    the folder, replacing files of the same names; nothing else in it is deleted.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give the path of a new or empty folder")
    check_output_path(out, "--out")  # a folder above it that is a file would fail only after the training
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose another folder, or pass --overwrite "
                         "(overwrite=True) to write the model into it (files of the same names are replaced, "
                         "other files are left alone)")


def remove_own_files(folder: Path, files: list[str]) -> None:
    """Delete ``files`` (paths relative to ``folder``, the ones a run wrote) where they exist; nothing else.

    The one way the library clears its own output: an overwrite or a clean-up never removes a folder
    wholesale, so a learner's file beside the library's survives.
    """
    for f in files:
        (Path(folder) / f).unlink(missing_ok=True)


def check_checkpoint_dir(ckpt: Path) -> None:
    """Refuse (before any work) a ``ckpt`` the library did not make: it must be absent or carry the marker."""
    ckpt = Path(ckpt)
    if ckpt.exists() and not (ckpt.is_dir() and (ckpt / CHECKPOINT_MARKER).is_file()):
        what = "a file" if not ckpt.is_dir() else f"a folder course_lib did not make (no {CHECKPOINT_MARKER} in it)"
        raise ValueError(f"{ckpt} is {what}, but this run keeps its resumable checkpoints there; move or rename "
                         "it, or choose another --out. --overwrite does not help: course_lib never deletes or "
                         "writes into a folder it did not make")


def claim_checkpoint_dir(ckpt: Path, files: list[str], overwrite: bool) -> None:
    """Make ``ckpt`` this run's checkpoint folder: create and mark it, or reuse the library's own.

    A marked folder is resumed from; with ``overwrite`` its checkpoint ``files`` (paths relative to
    ``ckpt``) are removed first so the run starts afresh. An unmarked folder is refused.
    """
    ckpt = Path(ckpt)
    check_checkpoint_dir(ckpt)
    if ckpt.is_dir():
        if overwrite:
            remove_own_files(ckpt, files)
            log.info("--overwrite: starting afresh in %s", ckpt)
        else:
            log.info("resuming from the checkpoints in %s", ckpt)
        return
    ckpt.mkdir(parents=True)
    (ckpt / CHECKPOINT_MARKER).write_text("checkpoints of a course_lib training run; removed when it finishes\n")


def release_checkpoint_dir(ckpt: Path, files: list[str]) -> None:
    """Remove the checkpoint ``files`` and the marker, then the folders they leave empty (never anything else)."""
    ckpt = Path(ckpt)
    if not (ckpt / CHECKPOINT_MARKER).is_file():
        return
    remove_own_files(ckpt, [*files, CHECKPOINT_MARKER])
    subdirs = sorted({(ckpt / f).parent for f in files} - {ckpt}, key=lambda d: -len(d.parts))
    for d in [*subdirs, ckpt]:
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # not empty: someone put a file there, and it stays
            log.warning("left %s in place: it holds files this run did not write", d)


def train(cfg: TrainConfig, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Train tokenizer and model, save both to ``out_dir``; return the training record.

    A non-empty ``out_dir`` is refused unless ``overwrite``; even then only the files the run writes are
    replaced (see :func:`check_out_dir`).
    """
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(cfg.vocab_size, cfg.corpus_chars)
    tok_time = time.perf_counter() - t0
    train_ids = data.encode_split(tokenizer, "train", max_chars=cfg.corpus_chars)
    held_ids = data.encode_split(tokenizer, "heldout", max_chars=cfg.corpus_chars)
    log.info("train tokens %d, held-out tokens %d", train_ids.numel(), held_ids.numel())

    model = build_model(cfg, tokenizer)
    opt = torch.optim.AdamW(decay_groups(model.parameters(), cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    t1 = time.perf_counter()

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def on_step(done: int, loss: float) -> None:
        if done % cfg.eval_every == 0 or done == cfg.steps:
            held = _eval_loss(model, held_ids[: cfg.eval_tokens], cfg.seq_len)
            history.append({"step": done, "train_loss": loss, "heldout_loss": held,
                            "seconds": time.perf_counter() - t1})
            log.info("step %d train %.3f held-out %.3f", done, loss, held)

    fit(model, data.batches(train_ids, cfg.seq_len, cfg.batch_size, gen), loss_fn, opt, cfg.steps,
        lambda step: lr_at(step, cfg), on_step=on_step, desc="training course-tiny")
    train_time = time.perf_counter() - t1

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "config": asdict(cfg),
        "parameters": count_parameters(model),
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "tokenizer_seconds": round(tok_time, 1),
        "train_seconds": round(train_time, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "corpus": {"train": data.corpus_spec("train"), "heldout": data.corpus_spec("heldout"),
                   "train_tokens": int(train_ids.numel()), "heldout_tokens": int(held_ids.numel()),
                   "train_modules": list(data.TRAIN_MODULES), "heldout_modules": list(data.HELDOUT_MODULES)},
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return record

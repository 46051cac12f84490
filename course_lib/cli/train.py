"""``python -m course_lib train``: the recipes of the two embedded models, offline and reproducible.

``course-tiny`` is trained from scratch in two steps:

1. a byte-level BPE tokenizer trained on the train split (the ``tokenizers`` package);
2. a small Llama (RMSNorm, RoPE, SwiGLU, grouped-query attention) trained with
   AdamW and a cosine schedule on random windows of the train split.

``course-tiny-student`` (``--model course-tiny-student``) is distilled from it (:class:`StudentRecipe`), with a
student of the same shape trained from scratch beside it for comparison.

Seed, corpus hash, hyperparameters, timings and held-out figures are written
to ``training.json`` next to the weights so anyone can check or repeat the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .. import data
from .._checks import check_int, check_number, int_at_least
from .._files import apply_umask
from ..distillation import CHECKPOINT_FILES, INITS, DistillConfig, distill, make_student
from ..metrics import perplexity
from ..models import EMBEDDED, count_parameters, load_model, resolve_model_path
from ..training import (
    check_checkpoint_dir,
    check_out_dir,
    claim_checkpoint_dir,
    decay_groups,
    fit,
    lr_schedule,
    release_checkpoint_dir,
)

HELP = "train an embedded model: course-tiny from scratch, or course-tiny-student distilled from it, offline"

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

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_frac * lr`` (:func:`course_lib.training.lr_schedule`)."""
        return lr_schedule(step, self.lr, self.steps, self.warmup_steps, self.min_lr_frac, "cosine")


def train_tokenizer(vocab_size: int, max_chars: int | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the train split: every byte is representable, no unknown tokens."""
    tok = Tokenizer(BPE())
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


@torch.no_grad()
def _eval_loss(model, ids: torch.Tensor, seq_len: int) -> float:
    model.eval()
    return math.log(perplexity(model, ids, seq_len=seq_len))


def _save_model(model, tokenizer, out: Path) -> None:
    """Save a trained model and its tokenizer into ``out``, every file they write with the mode the umask gives
    (safetensors writes 0600 whatever the umask: a class's shared model would be its owner's only). A
    learner's other files in ``out`` keep their modes."""
    def files() -> dict[Path, tuple[int, int, int]]:
        return {p: (s.st_ino, s.st_mtime_ns, s.st_size) for p in out.iterdir() for s in [p.lstat()]}

    out.mkdir(parents=True, exist_ok=True)
    before = files()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path, key in files().items():
        if before.get(path) != key:  # new, or rewritten by this save
            apply_umask(path)


def train(cfg: TrainConfig, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Train tokenizer and model, save both to ``out_dir``; return the training record.

    A non-empty ``out_dir`` is refused unless ``overwrite``; even then only the files the run writes are
    replaced (see :func:`course_lib.training.check_out_dir`).
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
        cfg.lr_at, on_step=on_step, desc="training course-tiny")
    train_time = time.perf_counter() - t1

    _save_model(model, tokenizer, out)
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


# --- course-tiny-student: distilled from course-tiny ----------------------------------

@dataclass(frozen=True)
class StudentRecipe:
    """The shape and training of ``course-tiny-student`` (what ``train --model course-tiny-student`` runs)."""

    num_layers: int = 2
    intermediate_size: int = 384
    init: str = "teacher"
    # Sized for a shared 2-core CPU (about 10 minutes for both students); more steps give a better student.
    distill: DistillConfig = DistillConfig(temperature=2.0, alpha=0.5, steps=120, batch_size=8, seq_len=128,
                                           lr=3e-3, warmup_steps=10, seed=1234, eval_every=40,
                                           eval_tokens=8192, checkpoint_every=40)
    scratch_baseline: bool = True  # also train the same shape from random init, same tokens, for comparison
    final_eval_tokens: int = 32768

    def __post_init__(self) -> None:
        check_int("num_layers", self.num_layers, 1)
        check_int("intermediate_size", self.intermediate_size, 1)
        check_int("final_eval_tokens", self.final_eval_tokens, 2)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.distill, DistillConfig):
            raise ValueError(f"distill must be a DistillConfig, got {type(self.distill).__name__}")


def train_student(args: argparse.Namespace) -> int:
    """``python -m course_lib train --model course-tiny-student [--out DIR] [--steps N] [--seed S] [--overwrite]``."""
    recipe = StudentRecipe()
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    cfg = replace(recipe.distill, **overrides)
    out = Path(args.out) if args.out else EMBEDDED["course-tiny-student"]
    check_out_dir(out, args.overwrite)  # the same rules as course-tiny's trainer, before any work
    # Resumable checkpoints beside the output, in a folder the library marks as its own: a run resumes
    # from it, and only its checkpoint files (and the folders they leave empty) are removed at the end.
    ckpt = out.parent / (out.name + ".ckpt")
    ckpt_files = [f"{sub}/{name}" for sub in ("kd", "scratch") for name in CHECKPOINT_FILES]
    check_checkpoint_dir(ckpt)
    teacher_name = getattr(args, "teacher", None) or "course-tiny"  # a learner may distil their own teacher
    try:
        resolve_model_path(teacher_name)  # a mistyped teacher is named as the flag, before loading anything
    except ValueError as e:
        raise ValueError(f"--teacher: {e}") from e
    teacher, tok = load_model(teacher_name)
    t0 = time.perf_counter()
    train_ids = data.encode_split(tok, "train")
    held_ids = data.encode_split(tok, "heldout")
    student = make_student(teacher, recipe.num_layers, recipe.intermediate_size, init=recipe.init, seed=cfg.seed)
    claim_checkpoint_dir(ckpt, ckpt_files, args.overwrite)
    kd = distill(student, teacher, train_ids, cfg, held_ids, checkpoint_dir=ckpt / "kd",
                 overwrite=args.overwrite)

    def ppl(m) -> float:
        return perplexity(m, held_ids, max_tokens=recipe.final_eval_tokens, seq_len=256)

    record = {
        "recipe": {"num_layers": recipe.num_layers, "intermediate_size": recipe.intermediate_size,
                   "init": recipe.init, "teacher": teacher_name},
        "config": asdict(cfg),
        "seed": cfg.seed,
        "parameters": count_parameters(student),
        "teacher_parameters": count_parameters(teacher),
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "heldout_ppl": {"teacher": ppl(teacher), "student_kd": ppl(kd.student)},
        "heldout_eval_tokens": recipe.final_eval_tokens,
        "history": {"student_kd": kd.history},
        "seconds": {"student_kd": round(kd.seconds, 1)},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "corpus": {"train": data.corpus_spec("train")["sha256"], "heldout": data.corpus_spec("heldout")["sha256"]},
    }
    if recipe.scratch_baseline:
        scratch = make_student(teacher, recipe.num_layers, recipe.intermediate_size, init="random", seed=cfg.seed)
        sc = distill(scratch, None, train_ids, replace(cfg, alpha=0.0), held_ids,
                     checkpoint_dir=ckpt / "scratch", overwrite=args.overwrite)
        record["heldout_ppl"]["student_scratch"] = ppl(sc.student)
        record["history"]["student_scratch"] = sc.history
        record["seconds"]["student_scratch"] = round(sc.seconds, 1)
    record["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    _save_model(kd.student, tok, out)
    (out / "training.json").write_text(json.dumps(record, indent=2))
    release_checkpoint_dir(ckpt, ckpt_files)
    print(json.dumps({k: record[k] for k in ("parameters", "teacher_parameters", "heldout_ppl", "seconds")},
                     indent=2))
    return 0


# --- the command line -------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="course-tiny", choices=["course-tiny", "course-tiny-student"])
    p.add_argument("--out", help="output folder (default: the package's embedded folder)")
    p.add_argument("--steps", type=int_at_least(1), help="training steps (default: the recipe's)")
    p.add_argument("--seed", type=int_at_least(0), help="random seed (default: the recipe's)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder (the model's "
                   "files are replaced, other files are left alone)")
    p.add_argument("--teacher", help="course-tiny-student only: the teacher to distil (preset or folder; "
                   "default course-tiny)")


def run(args: argparse.Namespace) -> int:
    if args.model != "course-tiny":
        return train_student(args)
    if args.teacher:
        raise ValueError("--teacher only applies to --model course-tiny-student (course-tiny trains from scratch)")
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    cfg = TrainConfig(**overrides)
    out = Path(args.out) if args.out else EMBEDDED["course-tiny"]
    record = train(cfg, out, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in record.items() if k != "corpus"}, indent=2))
    return 0

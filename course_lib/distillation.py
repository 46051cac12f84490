"""Knowledge distillation: train a small *student* to imitate a big *teacher*.

A language model trained on text sees one "right" next token per position
(cross-entropy against a one-hot target). A trained teacher knows more: after
``for i in`` it spreads probability over ``range``, ``enumerate``, ``self``...
Distillation (Hinton et al., 2015) trains the student on those soft targets:

    loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, targets)

where ``p^T = softmax(logits / T)``. A temperature T > 1 flattens both
distributions so the small probabilities (the "dark knowledge") carry
gradient; the T^2 factor keeps the gradient scale independent of T (the
gradient of the softened KL shrinks like 1/T^2). ``alpha`` mixes soft and hard
targets: alpha = 0 is ordinary training from scratch, alpha = 1 pure imitation.

Two variants are offered: *reverse* KL(p_student || p_teacher), which is
mode-seeking (the student commits to the teacher's main mode rather than
covering every option), and *hidden-state matching*, which also pulls the
student's intermediate layers towards chosen teacher layers.

The student is built from the teacher by :func:`make_student`: fewer layers
(layer dropping, as in DistilBERT) and/or a narrower MLP, initialised from the
teacher's own weights or at random. :func:`distill` trains it: the loss above
(:func:`kd_loss`, kept in :mod:`course_lib.training` beside the one training loop, because recovery after
pruning trains with it too) inside that loop. ``python -m course_lib train --model course-tiny-student``
runs the recipe that produced the shipped student (:mod:`course_lib.cli.train`).
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from . import data
from ._checks import check_int as _check_int
from ._checks import check_number as _check_number
from ._checks import check_output_path
from .metrics import perplexity
from .models import check_token_ids, context_length
from .training import (
    KL_KINDS,
    check_temperature_alpha,
    decay_groups,
    fit,
    kd_loss,
    lr_schedule,
    remove_own_files,
    save_checkpoint,
)
from .training import (
    load_checkpoint as _load_checkpoint,
)

log = logging.getLogger(__name__)

INITS = ("teacher", "random")


# --- the loss (kd_loss itself lives in training.py) -----------------------------

def hidden_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                projections: torch.nn.ModuleList | None = None) -> torch.Tensor:
    """Mean relative MSE between paired hidden states (student states projected when widths differ).

    Dividing by the teacher state's mean square makes the term scale-free, so
    one weight means the same at every layer.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student states but {len(teacher_hidden)} teacher states")
    total = student_hidden[0].new_zeros(())
    for i, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden)):
        if projections is not None:
            hs = projections[i](hs)
        if hs.shape != ht.shape:
            raise ValueError(f"hidden states {tuple(hs.shape)} vs {tuple(ht.shape)}: pass projections for a "
                             "narrower student (distill() creates them for you)")
        ht = ht.detach().float()
        total = total + F.mse_loss(hs.float(), ht) / ht.pow(2).mean().clamp_min(1e-8)
    return total / len(student_hidden)


# --- compatibility -------------------------------------------------------------

def check_compatible(student, teacher, student_tokenizer=None, teacher_tokenizer=None) -> None:
    """Raise ValueError unless student and teacher share a vocabulary (and tokenizer, when given)."""
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs != vt:
        raise ValueError(f"student vocabulary ({vs}) differs from the teacher's ({vt}): logit distillation "
                         "compares token by token, so build the student with the teacher's tokenizer "
                         "(make_student does)")
    if (student_tokenizer is None) != (teacher_tokenizer is None):
        raise ValueError("pass both tokenizers or neither")
    if student_tokenizer is not None and student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError("student and teacher tokenizers map text to different ids; use the teacher's tokenizer "
                         "for the student")


# --- building a student --------------------------------------------------------

def spread_layers(n_teacher: int, n_student: int) -> list[int]:
    """Which teacher layers a shallower student keeps: evenly spaced, always the first and last."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"student layers must be in [1, {n_teacher}], got {n_student}")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def student_config(teacher_config, num_layers: int | None = None, intermediate_size: int | None = None,
                   hidden_size: int | None = None, num_heads: int | None = None, num_kv_heads: int | None = None):
    """The teacher's config with fewer layers and/or narrower dimensions (same vocabulary)."""
    d = teacher_config.to_dict()
    d.pop("layer_types", None)  # per-layer lists (Qwen2) are rebuilt for the new depth
    for key, val in (("num_hidden_layers", num_layers), ("intermediate_size", intermediate_size),
                     ("hidden_size", hidden_size), ("num_attention_heads", num_heads),
                     ("num_key_value_heads", num_kv_heads)):
        if val is not None:
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{key} must be a positive int, got {val!r}")
            d[key] = val
    if d["hidden_size"] % d["num_attention_heads"]:
        raise ValueError(f"hidden_size {d['hidden_size']} must be divisible by num_heads {d['num_attention_heads']}")
    if d["num_attention_heads"] % d["num_key_value_heads"]:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if hidden_size is not None and "head_dim" in d:
        d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    return type(teacher_config)(**d)


def mlp_channel_importance(layer) -> torch.Tensor:
    """Per-channel importance of a SwiGLU MLP: product of the channel's gate, up and down weight norms."""
    mlp = layer.mlp
    return (mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1)
            * mlp.down_proj.weight.norm(dim=0))


def make_student(teacher: PreTrainedModel, num_layers: int, intermediate_size: int | None = None,
                 hidden_size: int | None = None, init: str = "teacher", layers: list[int] | None = None,
                 seed: int = 0) -> PreTrainedModel:
    """A smaller model of the teacher's family and vocabulary.

    ``init="teacher"`` copies the embeddings, final norm, head and the teacher
    layers ``layers`` (default :func:`spread_layers`); a narrower MLP keeps the
    teacher's most important channels (:func:`mlp_channel_importance`).
    ``init="random"`` is a fresh model of the same shape (the from-scratch
    baseline). Changing ``hidden_size`` is only possible with random init.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    _check_llama_family(teacher, init)
    n_t = teacher.config.num_hidden_layers
    if layers is not None:
        if len(layers) != num_layers or any(not 0 <= i < n_t for i in layers):
            raise ValueError(f"layers must list {num_layers} teacher layer indices in [0, {n_t - 1}], got {layers}")
    src = list(layers) if layers is not None else spread_layers(n_t, num_layers)
    if init == "teacher" and hidden_size not in (None, teacher.config.hidden_size):
        raise ValueError("a different hidden_size cannot copy the teacher's weights; use init='random', "
                         "or keep hidden_size and narrow intermediate_size instead")
    if intermediate_size is not None and init == "teacher" and intermediate_size > teacher.config.intermediate_size:
        raise ValueError(f"intermediate_size {intermediate_size} is wider than the teacher's "
                         f"{teacher.config.intermediate_size}; a teacher-initialised student can only be narrower")
    cfg = student_config(teacher.config, num_layers, intermediate_size, hidden_size)
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(cfg, dtype=next(teacher.parameters()).dtype)
    if init == "teacher":
        _copy_from_teacher(student, teacher, src)
    return student.to(next(teacher.parameters()).device).eval()


STUDENT_CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                       "num_key_value_heads")


def _check_llama_family(teacher, init: str) -> None:
    """make_student edits a Llama-style config and copies Llama-style layers; say so instead of a KeyError."""
    cfg = teacher.config.to_dict()
    missing = [k for k in STUDENT_CONFIG_KEYS if k not in cfg]
    layers = getattr(getattr(teacher, "model", None), "layers", None)
    swiglu = layers is not None and len(layers) > 0 and all(
        hasattr(getattr(layers[0], "mlp", None), p) for p in ("gate_proj", "up_proj", "down_proj"))
    if missing or (init == "teacher" and not swiglu):
        kind = getattr(teacher.config, "model_type", type(teacher).__name__)
        raise ValueError(
            "make_student builds students of Llama-family models (Llama, Qwen2, Mistral, SmolLM2: config "
            f"fields {', '.join(STUDENT_CONFIG_KEYS)} and gate/up/down MLPs under model.layers); "
            f"this teacher is {kind!r} ({type(teacher).__name__}"
            + (f", its config has no {missing}" if missing else "") + "). For it, make a smaller copy of "
            "teacher.config yourself (for GPT-2: fewer n_layer), build it with "
            "AutoModelForCausalLM.from_config(cfg) and train it with distill()"
        )


@torch.no_grad()
def _copy_from_teacher(student, teacher, src: list[int]) -> None:
    t_sd = teacher.state_dict()
    keep = {}  # per student layer: indices of the MLP channels it keeps
    width = student.config.intermediate_size
    for i, j in enumerate(src):
        imp = mlp_channel_importance(teacher.model.layers[j])
        keep[i] = imp.topk(width).indices.sort().values
    new_sd = {}
    for key, val in student.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        w = t_sd[key if m is None else f"model.layers.{src[int(m[1])]}.{m[2]}"]
        if w.shape != val.shape:
            idx = keep[int(m[1])]
            if m[2] in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                w = w[idx]
            elif m[2] == "mlp.down_proj.weight":
                w = w[:, idx]
            else:
                raise ValueError(f"cannot copy {key}: teacher {tuple(w.shape)} vs student {tuple(val.shape)}")
        new_sd[key] = w.clone()
    student.load_state_dict(new_sd)


# --- the training loop ---------------------------------------------------------

@dataclass(frozen=True)
class DistillConfig:
    """How to train a student. Validated on creation; ``alpha=0`` trains from scratch (no teacher needed)."""

    temperature: float = 2.0
    alpha: float = 0.5
    kind: str = "forward"  # "forward" KL(teacher||student) or "reverse" KL(student||teacher)
    hidden_weight: float = 0.0  # > 0 adds hidden-state matching on spread teacher layers
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 50
    eval_tokens: int = 16384
    checkpoint_every: int = 100  # with a checkpoint folder: save every this many steps (and at the end)

    def __post_init__(self) -> None:
        # Every numeric field is checked: a wrong sign does not crash, it trains backwards (docs/distillation.md),
        # and a NaN weight silently poisons every step.
        check_temperature_alpha(self.temperature, self.alpha)
        if self.kind not in KL_KINDS:
            raise ValueError(f"kind must be one of {KL_KINDS}, got {self.kind!r}")
        _check_number("hidden_weight", self.hidden_weight, ">= 0 (0 = off, typical 0.1-1)",
                      lambda v: 0 <= v < math.inf)
        for name in ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every"):
            _check_int(name, getattr(self, name), 1)
        # perplexity needs 2 tokens (one target): eval_tokens=1 was accepted here and failed at the first eval
        _check_int("eval_tokens", self.eval_tokens, 2, " (the held-out tokens each evaluation scores)")
        _check_int("warmup_steps", self.warmup_steps, 0, " (0 = no warm-up)")
        _check_int("seed", self.seed, 0)
        _check_number("lr", self.lr, "in (0, 1) (typical 1e-4 to 5e-3)", lambda v: 0 < v < 1)
        _check_number("min_lr_frac", self.min_lr_frac, "in [0, 1] (the final lr as a fraction of lr)",
                      lambda v: 0 <= v <= 1)
        _check_number("weight_decay", self.weight_decay, "in [0, 1] (0 = off, typical 0.01-0.1)",
                      lambda v: 0 <= v <= 1)
        _check_number("grad_clip", self.grad_clip, "> 0 (the largest gradient norm kept; inf = no clipping)",
                      lambda v: v > 0)

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.hidden_weight > 0

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_frac * lr`` (:func:`course_lib.training.lr_schedule`)."""
        return lr_schedule(step, self.lr, self.steps, self.warmup_steps, self.min_lr_frac, "cosine")


@dataclass
class DistillResult:
    """What a run produced: the trained student and its curve."""

    student: PreTrainedModel
    history: list[dict] = field(default_factory=list)  # one row per evaluation
    seconds: float = 0.0
    resumed_from: int = 0  # the step a resumed run started at


CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FILES = (CHECKPOINT, CHECKPOINT + ".tmp")  # everything distill writes into its checkpoint folder
CHECKPOINT_KEYS = ("config", "step", "student", "projections", "optimizer", "generator", "torch_rng", "history")


def distill(student: PreTrainedModel, teacher: PreTrainedModel | None, data_ids: torch.Tensor,
            cfg: DistillConfig, heldout_ids: torch.Tensor | None = None,
            checkpoint_dir: str | Path | None = None, overwrite: bool = False,
            progress: bool = True) -> DistillResult:
    """Train ``student`` (in place) on random windows of ``data_ids`` with the distillation loss.

    Every ``cfg.eval_every`` steps the held-out loss (of ``heldout_ids``) is
    recorded. With ``checkpoint_dir`` the run saves there every
    ``cfg.checkpoint_every`` steps and *resumes* from a checkpoint it finds
    (same config required); ``overwrite=True`` starts afresh instead, removing
    only the checkpoint files (the folder's other files stay). A resumed
    run gives exactly the same student as an uninterrupted one. A checkpoint is
    read as tensors and plain values only (``weights_only=True``): a file that
    holds anything else is refused unread, since unpickling it could run code.
    """
    if cfg.needs_teacher:
        if teacher is None:
            raise ValueError("this config distils (alpha > 0 or hidden_weight > 0) and needs a teacher; "
                             "pass one, or use alpha=0 to train from scratch")
        check_compatible(student, teacher)
        teacher.eval()
    check_token_ids(student, data_ids, "data_ids")  # ids of another tokenizer: a clear error, not an IndexError
    context = context_length(student)
    if context is not None and cfg.seq_len > context:  # else the first held-out evaluation refuses it, mid-run
        raise ValueError(f"cfg.seq_len ({cfg.seq_len}) exceeds the student's context of {context} tokens "
                         f"(config.max_position_embeddings): use DistillConfig(seq_len=...) <= {context}")
    data_ids = data_ids.flatten()
    if heldout_ids is not None:
        check_token_ids(student, heldout_ids, "heldout_ids")
    torch.manual_seed(cfg.seed)
    projections = _make_projections(student, teacher, cfg)
    params = list(student.parameters()) + (list(projections.parameters()) if projections is not None else [])
    opt = torch.optim.AdamW(decay_groups(params, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    start = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        start, history = _prepare_checkpoint(ckpt, cfg, student, projections, opt, gen, overwrite)
    stream = data.batches(data_ids, cfg.seq_len, cfg.batch_size, gen)
    layer_pairs = _layer_pairs(student, teacher) if cfg.hidden_weight > 0 else []
    want_hidden = cfg.hidden_weight > 0

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out_s = student(input_ids=x, output_hidden_states=want_hidden)
        if not cfg.needs_teacher:
            return F.cross_entropy(out_s.logits.float().reshape(-1, out_s.logits.size(-1)), y.reshape(-1))
        with torch.no_grad():
            out_t = teacher(input_ids=x, output_hidden_states=want_hidden)
        loss = kd_loss(out_s.logits, out_t.logits, y, cfg.temperature, cfg.alpha, cfg.kind)
        if want_hidden:
            hs = [out_s.hidden_states[i] for i, _ in layer_pairs]
            ht = [out_t.hidden_states[j] for _, j in layer_pairs]
            loss = loss + cfg.hidden_weight * hidden_loss(hs, ht, projections)
        return loss

    def on_step(done: int, loss: float) -> None:
        if done % cfg.eval_every == 0 or done == cfg.steps:
            row = {"step": done, "train_loss": loss, "tokens": done * cfg.batch_size * cfg.seq_len,
                   "seconds": time.perf_counter() - t0}
            if heldout_ids is not None:
                row["heldout_loss"] = evaluate_loss(student, heldout_ids, cfg)
            history.append(row)
            log.info("step %d %s", done, {k: round(v, 3) for k, v in row.items() if k != "step"})
        if ckpt is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _save_checkpoint(ckpt, cfg, done, student, projections, opt, gen, history)

    t0 = time.perf_counter()
    fit(student, stream, loss_fn, opt, cfg.steps, cfg.lr_at, start=start, clip_params=params,
        grad_clip=cfg.grad_clip, on_step=on_step, desc="distilling" if cfg.needs_teacher else "training",
        progress=progress)
    student.eval()
    return DistillResult(student, history, time.perf_counter() - t0, start)


@torch.no_grad()
def evaluate_loss(model, heldout_ids: torch.Tensor, cfg: DistillConfig) -> float:
    """Mean held-out next-token NLL (log of the perplexity) over ``cfg.eval_tokens`` tokens."""
    model.eval()
    return math.log(perplexity(model, heldout_ids, max_tokens=cfg.eval_tokens, seq_len=cfg.seq_len))


def _layer_pairs(student, teacher) -> list[tuple[int, int]]:
    """(student hidden-state index, teacher index): each student layer's output to its spread teacher layer."""
    n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i.
    return [(i + 1, j + 1) for i, j in enumerate(spread_layers(n_t, n_s))]


def _make_projections(student, teacher, cfg: DistillConfig) -> torch.nn.ModuleList | None:
    """Linear maps student width -> teacher width, trained alongside (only when widths differ)."""
    if cfg.hidden_weight == 0 or student.config.hidden_size == teacher.config.hidden_size:
        return None
    n = student.config.num_hidden_layers
    dev = next(student.parameters()).device
    return torch.nn.ModuleList(
        torch.nn.Linear(student.config.hidden_size, teacher.config.hidden_size, bias=False) for _ in range(n)
    ).to(dev)


def _config_fingerprint(cfg: DistillConfig) -> dict:
    d = asdict(cfg)
    d.pop("eval_every")  # changing how often to evaluate or save does not change the student
    d.pop("checkpoint_every")
    return d


def _prepare_checkpoint(ckpt: Path, cfg, student, projections, opt, gen, overwrite: bool):
    """Resume from ``ckpt/checkpoint.pt`` if present; refuse a foreign non-empty folder unless overwrite.

    ``overwrite`` removes only :data:`CHECKPOINT_FILES` (never the folder: the learner's files in it stay).
    """
    if ckpt.exists() and not ckpt.is_dir():
        raise ValueError(f"checkpoint_dir {ckpt} is a file, not a folder; give the path of a new folder, or of "
                         "the folder of an earlier run to resume it")
    check_output_path(ckpt, "checkpoint_dir")  # before the training, not at its first save
    if ckpt.exists() and any(ckpt.iterdir()):
        if overwrite:
            remove_own_files(ckpt, list(CHECKPOINT_FILES))
            log.info("overwrite=True: starting afresh in %s (only its %s is replaced)", ckpt, CHECKPOINT)
        elif not (ckpt / CHECKPOINT).is_file():
            raise ValueError(f"checkpoint_dir {ckpt} is not empty and holds no {CHECKPOINT}, so it is not the "
                             "folder of an earlier run; choose another (new) folder, or pass overwrite=True "
                             f"to keep the checkpoint there anyway ({CHECKPOINT} is written, the folder's other "
                             "files are left alone)")
        else:
            state = load_checkpoint(ckpt / CHECKPOINT)
            if state["config"] != _config_fingerprint(cfg):
                raise ValueError(f"the checkpoint in {ckpt} was made with a different config "
                                 f"({state['config']}); use the same config to resume, or overwrite=True "
                                 f"to start afresh (only its {CHECKPOINT} is replaced)")
            student.load_state_dict(state["student"])
            if projections is not None:
                projections.load_state_dict(state["projections"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            log.info("resuming from step %d (%s)", state["step"], ckpt)
            return state["step"], state["history"]
    return 0, []


def load_checkpoint(path: str | Path) -> dict:
    """The state a distillation checkpoint holds, read as tensors and plain Python values only
    (``weights_only=True``: a planted pickle is refused unread; see :func:`course_lib.training.load_checkpoint`)."""
    return _load_checkpoint(path, CHECKPOINT_KEYS, "a distillation checkpoint")


def _save_checkpoint(ckpt: Path, cfg, step, student, projections, opt, gen, history) -> None:
    state = {"config": _config_fingerprint(cfg), "step": step, "student": student.state_dict(),
             "projections": projections.state_dict() if projections is not None else None,
             "optimizer": opt.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
             "history": history}
    save_checkpoint(state, ckpt / CHECKPOINT)  # through CHECKPOINT + ".tmp": listed in CHECKPOINT_FILES

"""The one training loop under train, distill and recover_: fit, its schedule, the distillation loss, checkpoints.

Training course-tiny, distillation and recovery after pruning are the same loop - set this step's learning
rate, draw a batch, compute a loss, step the optimizer with the gradient norm clipped - and differ only in the
loss (cross-entropy, the distillation loss), the schedule and what happens between steps (evaluate, save a
checkpoint, stop when a time budget is spent). So the loop is written once, here, and each trainer passes those
three things in:

* ``loss_fn(x, y)`` - the loss of one batch (inputs, next-token targets), a 0-d tensor with a gradient;
* ``lr_at(step)`` - the learning rate of step ``step`` (0-based), set on every parameter group before it
  (every trainer's comes from :func:`lr_schedule`);
* ``on_step(done, loss)`` - called after each optimizer step with the number of steps done and the loss.

The model is put back in training mode before every step (an evaluation in ``on_step`` may switch it to eval
mode) and left in eval mode at the end. Beside the loop live what the trainers share around it: the
distillation loss (:func:`kd_loss`, which recovery after pruning trains with too) and the rules of the folders
they write into - a learner's files are never lost, and a checkpoint is read as tensors only.
This module imports torch, tqdm and the leaves ``_checks`` / ``device`` only: the trainers above it import it,
never the other way.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._checks import check_int, check_number, check_output_path
from .device import device_of

log = logging.getLogger(__name__)

DECAYS = ("cosine", "linear")
KL_KINDS = ("forward", "reverse")


# --- the schedule ----------------------------------------------------------------------------------------------

def lr_schedule(step: int, lr: float, steps: int, warmup_steps: int = 0, min_lr_frac: float = 0.0,
                decay: str = "cosine") -> float:
    """The learning rate of step ``step`` (0-based) of a ``steps``-step run: a linear warm-up, then a decay.

    ``decay="cosine"`` (training, distillation) waits until the warm-up is over, then follows half a cosine
    down to ``min_lr_frac * lr`` at the last step. ``decay="linear"`` (the short recovery fine-tune after
    pruning) falls in a straight line from the first step to ``min_lr_frac * lr`` at step ``steps``, with the
    warm-up ramp on top: a run of a few dozen steps cannot afford a plateau at the full rate.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if decay == "cosine":
        if step < warmup_steps:
            return lr * warm
        shape = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))
    else:
        shape = 1 - step / steps
    return lr * (warm * (min_lr_frac + (1 - min_lr_frac) * shape))


# --- the distillation loss -------------------------------------------------------------------------------------

def check_temperature_alpha(temperature: float, alpha: float) -> None:
    """ValueError unless ``temperature`` > 0 (finite) and ``alpha`` in [0, 1]."""
    check_number("temperature", temperature, "> 0 (typical: 1-4)", lambda v: 0 < v < math.inf)
    check_number("alpha", alpha, "in [0, 1] (0 = train from scratch, 1 = pure distillation)", lambda v: 0 <= v <= 1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None = None,
            temperature: float = 2.0, alpha: float = 0.5, kind: str = "forward") -> torch.Tensor:
    """Distillation loss on (..., V) logits: ``alpha * T^2 * KL + (1 - alpha) * CE``, mean over positions.

    ``kind="forward"`` is KL(teacher || student) (Hinton's loss), ``"reverse"``
    is KL(student || teacher). ``targets`` (token ids, shape ``logits.shape[:-1]``)
    are needed unless ``alpha == 1``. :mod:`course_lib.distillation` explains the loss.
    """
    check_temperature_alpha(temperature, alpha)
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ: teacher and student must share the vocabulary (same tokenizer) and see the same batch"
        )
    vocab = student_logits.size(-1)
    s = student_logits.float().reshape(-1, vocab)
    t = teacher_logits.float().reshape(-1, vocab).detach()  # the teacher is a fixed target
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    if kind == "forward":  # sum_v p_t (log p_t - log p_s)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    else:  # sum_v p_s (log p_s - log p_t)
        kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()
    loss = alpha * temperature**2 * kl
    if alpha < 1:
        if targets is None:
            raise ValueError("targets are needed when alpha < 1 (the cross-entropy part); pass the next-token ids")
        loss = loss + (1 - alpha) * F.cross_entropy(s, targets.reshape(-1))
    return loss


# --- the loop --------------------------------------------------------------------------------------------------



@dataclass(frozen=True)
class FitResult:
    """What one run of :func:`fit` did: the loss of every step it took, in order."""

    losses: tuple[float, ...]
    steps_done: int  # steps taken in this call (fewer than asked when the time budget ran out)
    seconds: float
    stopped_early: bool  # True when ``max_seconds`` ended the run


def decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only, none on norms and biases (1-D)."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def fit(model: torch.nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
        steps: int, lr_at: Callable[[int], float], *, start: int = 0,
        clip_params: Iterable[torch.nn.Parameter] | None = None, grad_clip: float = 1.0,
        on_step: Callable[[int, float], None] | None = None, max_seconds: float | None = None,
        desc: str = "training", progress: bool = True, leave: bool = True, postfix_every: int = 10) -> FitResult:
    """Train ``model`` in place for steps ``start .. steps - 1``; return the loss of each.

    ``batches`` yields (inputs, targets) pairs; they are moved to the model's device. ``clip_params`` are the
    parameters whose gradient norm is clipped to ``grad_clip`` (default: the model's; a trainer with extra
    trained modules, such as distillation's projections, passes them all). A resumed run passes the step it
    resumes at as ``start``. ``max_seconds`` stops after the step that spends the budget. The progress bar
    (``tqdm.auto``: a widget in a notebook) shows the loss every ``postfix_every`` steps.
    """
    check_int("steps", steps, 1)
    check_int("start", start, 0, " (the step a resumed run starts at)")
    check_int("postfix_every", postfix_every, 1)
    check_number("grad_clip", grad_clip, "> 0 (the largest gradient norm kept; inf = no clipping)", lambda v: v > 0)
    if max_seconds is not None:
        check_number("max_seconds", max_seconds, "> 0 or None (None = no time limit)", lambda v: v > 0)
    if start > steps:
        raise ValueError(f"start ({start}) is past the last step ({steps}); nothing would be trained")
    device = device_of(model)
    clip = list(clip_params) if clip_params is not None else list(model.parameters())
    losses: list[float] = []
    stopped = False
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), desc=desc, disable=not progress, initial=start, total=steps, leave=leave)
    for step in bar:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        x, y = (t.to(device) for t in next(batches))
        loss = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip, grad_clip)
        optimizer.step()
        value = loss.item()
        losses.append(value)
        if (step - start) % postfix_every == 0:
            bar.set_postfix(loss=f"{value:.3f}")
        if on_step is not None:
            on_step(step + 1, value)
        if max_seconds is not None and max_seconds < math.inf and time.perf_counter() - t0 > max_seconds:
            log.info("%s stopped at step %d: time budget %.0f s spent", desc, step + 1, max_seconds)
            stopped = True
            break
    bar.close()
    model.eval()
    return FitResult(tuple(losses), len(losses), time.perf_counter() - t0, stopped)


# --- the folders a trainer writes into: a learner's files are never lost ---------------------------------------

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


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` through ``path.tmp`` and a rename: an interrupted save never corrupts the last
    good checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, keys: Iterable[str], what: str = "a training checkpoint") -> dict:
    """The state a checkpoint holds, read as tensors and plain Python values only; it must hold ``keys``.

    ``weights_only=True`` refuses any other object *before* building it: a pickle can name any function to
    call while it is read, so a planted checkpoint would otherwise run its payload on resume.
    """
    path, keys = Path(path), list(keys)
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        why = re.search(r"WeightsUnpickler error: (.*?)(?: Please|\n|$)", str(e))
        raise ValueError(
            f"{path} holds objects other than tensors and plain values ({why[1] if why else 'not a torch file'}), "
            "so course_lib did not write it; it was refused unread, because loading such a file can run code. "
            "Delete it, or pass overwrite=True (--overwrite) to start afresh"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:  # truncated or not a torch file at all
        raise ValueError(f"{path} is damaged or not a checkpoint ({e}); delete it, or pass overwrite=True "
                         "(--overwrite) to start afresh") from e
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else keys
    if missing:
        raise ValueError(f"{path} is not {what} (no {missing}); delete it, or pass overwrite=True (--overwrite) "
                         "to start afresh")
    return state

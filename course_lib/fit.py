"""The one training loop: what training course-tiny, distillation and recovery after pruning share.

Each of them is the same loop - set this step's learning rate, draw a batch, compute a loss, step the optimizer
with the gradient norm clipped - and differs only in the loss (cross-entropy, the distillation loss), the
schedule and what happens between steps (evaluate, save a checkpoint, stop when a time budget is spent). So the
loop is written once, here, and each trainer passes those three things in:

* ``loss_fn(x, y)`` - the loss of one batch (inputs, next-token targets), a 0-d tensor with a gradient;
* ``lr_at(step)`` - the learning rate of step ``step`` (0-based), set on every parameter group before it;
* ``on_step(done, loss)`` - called after each optimizer step with the number of steps done and the loss.

The model is put back in training mode before every step (an evaluation in ``on_step`` may switch it to eval
mode) and left in eval mode at the end. This module imports torch, tqdm and the leaves ``_checks`` / ``device``
only: the trainers above it import it, never the other way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ._checks import check_int, check_number
from .device import device_of

log = logging.getLogger(__name__)


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

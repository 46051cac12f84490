"""The one calibration walk that GPTQ, AWQ and SmoothQuant share: block by block, on cached block inputs.

A calibrated method needs, for each Linear layer, statistics of the inputs it really sees (GPTQ: the Hessian
``X^T X``; AWQ / SmoothQuant: the activations themselves), *after* the layers before it have been quantized, so
that each layer is calibrated on the rounding error it will really receive. :func:`walk` gives it that:

* the model runs once up to the first decoder block, and each block's inputs are cached and passed on (block ->
  one group's statistics -> quantize that group -> the next group of the block ... -> the quantized block's
  outputs are the next block's inputs), so the cost is O(layers), not O(layers^2);
* layers that read the same input (q/k/v; gate/up: :data:`SHARED_INPUTS`) form one group: one run of the block
  gives their statistics, and the run stops as soon as the group has seen its input;
* Linear layers outside the decoder stack get their statistics from whole forward passes.

A method supplies a *collector* (a forward hook that gathers statistics) and a function that quantizes one
:class:`Group` from them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

# Layers of a Llama / Qwen2 / Mistral block that read one input, and the norm that produces it.
SHARED_INPUTS = {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "input_layernorm",
                 ("mlp.gate_proj", "mlp.up_proj"): "post_attention_layernorm"}


@dataclass
class Group:
    """Layers that read one input (forward order), where they sit, and what the collector gathered from it."""

    block: nn.Module | None  # the decoder block holding them; None outside the decoder stack
    prefix: str  # the block's name with a trailing dot ("model.layers.3."); "" outside the stack
    names: list[str]
    stats: Any


class StopForward(Exception):
    """Raised by a hook to end a calibration run once it has what it needs."""


def check_calibration(calibration: torch.Tensor) -> None:
    if calibration.dim() != 2 or calibration.dtype != torch.long:
        raise ValueError(f"calibration must be (batch, seq) token ids (torch.long), got {tuple(calibration.shape)} "
                         f"{calibration.dtype}")


@torch.no_grad()
def walk(model: nn.Module, todo: dict[str, nn.Linear], calibration: torch.Tensor,
         collector: Callable[[nn.Linear], Callable], quantize_group: Callable[[Group], None], desc: str) -> None:
    """Calibrate and quantize every layer of ``todo`` (name -> float Linear) in forward order.

    ``collector(layer)`` returns a forward hook that gathers the statistics of one input; ``quantize_group(group)``
    replaces the group's layers (the next groups then run on them).
    """
    check_calibration(calibration)
    device = next(model.parameters()).device
    groups = blocks(model, list(todo))
    outside = [g for g in groups if not re.search(r"layers\.\d+\.", g[0])]
    for names in outside:  # layers outside the decoder stack: inputs from whole forward passes
        stats = {n: collector(todo[n]) for n in names}
        handles = [todo[n].register_forward_hook(stats[n]) for n in names]
        try:
            for row in calibration:
                model(input_ids=row[None].to(device))
        finally:
            for h in handles:
                h.remove()
        for n in names:
            quantize_group(Group(None, "", [n], stats[n]))
    per_block = {int(re.search(r"layers\.(\d+)\.", g[0]).group(1)): g for g in groups if g not in outside}
    if not per_block:
        return
    stack_name, stack = decoder_stack(model, list(per_block.values()))
    inputs = block_inputs(model, stack[0], calibration, device)
    last = max(per_block)
    for i in tqdm(range(last + 1), desc=desc, leave=False):
        prefix = f"{stack_name}.{i}."
        # Each group's statistics come from a run of the block in which the groups before it are already
        # quantized (true-sequential): o_proj sees the error of the rounded q/k/v, down_proj that of gate/up.
        for names in input_groups(per_block.get(i, []), prefix):
            stats = collector(todo[names[0]])  # the group's layers read one input: one of them sees it all
            handle = todo[names[0]].register_forward_hook(_then_stop(stats))
            try:
                run_block(stack[i], inputs, stop_early=True)
            finally:
                handle.remove()
            quantize_group(Group(stack[i], prefix, names, stats))
        if i < last:  # the quantized block's outputs are the next block's inputs
            inputs = [(y, args, kwargs) for y, (_, args, kwargs) in zip(run_block(stack[i], inputs), inputs)]


def _then_stop(hook: Callable) -> Callable:
    """A forward hook that runs ``hook`` and then ends the run: the rest of the block is not needed."""
    def stop(module, inputs, output) -> None:
        hook(module, inputs, output)
        raise StopForward

    return stop


def input_groups(names: list[str], block_prefix: str) -> list[list[str]]:
    """``names`` (one block's layers, in order) grouped by the input they share (q/k/v; gate/up); others alone."""
    groups, seen = [], set()
    for n in names:
        if n in seen:
            continue
        rel = n[len(block_prefix):]
        group = next((g for g in SHARED_INPUTS if rel in g), None)
        members = [m for m in names if group and m[len(block_prefix):] in group] or [n]
        seen.update(members)
        groups.append(members)
    return groups


def blocks(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Group layer names by transformer block (``...layers.<i>.``) in order: the walk goes block by block."""
    groups: dict[int, list[str]] = {}
    for n in names:
        m = re.search(r"layers\.(\d+)\.", n)
        groups.setdefault(int(m.group(1)) if m else -1, []).append(n)
    return [groups[k] for k in sorted(groups)]


def decoder_stack(model: nn.Module, blocks: list[list[str]]) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks that ``blocks`` name (``model.layers`` in a Llama)."""
    parents = {re.search(r"(.*?layers)\.\d+\.", b[0]).group(1) for b in blocks}
    if len(parents) != 1:
        raise ValueError(f"GPTQ expects one stack of decoder blocks (...layers.<i>), found {sorted(parents)}")
    name = parents.pop()
    stack = model.get_submodule(name)
    if not isinstance(stack, nn.ModuleList):
        raise ValueError(f"GPTQ expects {name!r} to be an nn.ModuleList of decoder blocks, got {type(stack).__name__}")
    return name, stack


def block_inputs(model: nn.Module, first: nn.Module, calibration: torch.Tensor, device) -> list[tuple]:
    """What the first decoder block receives for each calibration row: (hidden, other args, kwargs).

    A forward pre-hook with kwargs sees everything the model hands a block - the
    hidden states and, in transformers, the RoPE tables, the attention mask and the
    position ids - then stops the pass: the blocks after it run on these, one by one.
    """
    seen: list[tuple] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        for key in ("cache", "past_key_values", "past_key_value"):
            if kwargs.get(key) is not None:
                kwargs[key] = None  # a KV cache would grow each time a block is re-run on the same row
        seen.append((x, tuple(args[1:]), kwargs))
        raise StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in calibration:  # one sequence at a time keeps memory flat
            try:
                model(input_ids=row[None].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return seen


def run_block(block: nn.Module, inputs: list[tuple], stop_early: bool = False) -> list[torch.Tensor]:
    """The block on each cached input; with ``stop_early`` a hook may end a run (:class:`StopForward`)."""
    outs = []
    for x, args, kwargs in inputs:
        try:
            y = block(x, *args, **kwargs)
        except StopForward:
            if not stop_early:
                raise
            continue
        outs.append(y[0] if isinstance(y, tuple) else y)  # transformers 4.x returns a tuple, 5.x the tensor
    return outs

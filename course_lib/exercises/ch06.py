"""Exercises for notebook 06 (pruning): checks with specific feedback.

1. ``check_magnitude_mask(fn)`` - ``fn(w, sparsity)`` returns a boolean mask of the
   weights to *keep*: the largest ``1 - sparsity`` fraction by magnitude.
2. ``check_mlp_channel_scores(fn)`` - ``fn(layer)`` returns one score per MLP channel:
   the squared L2 norm of everything that channel owns (gate row, up row, down column).
3. ``check_prune_mlp(fn)`` - ``fn(mlp, remove)`` deletes MLP channels ``remove`` from a
   SwiGLU MLP: the same rows of ``gate_proj`` and ``up_proj`` and columns of ``down_proj``,
   so the shapes stay consistent; checked against the library's dependency-group prune.
4. ``check_group_rows(fn)`` - ``fn(group, queries_per_kv, head_dim)`` returns the
   ``q_proj`` rows that belong to KV group ``group`` under grouped-query attention.

Each check calls the learner's code through :func:`attempt` on several random cases (fixed
seed): an unfinished stub gives "not done yet", a crash or a wrong answer says what is wrong.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..pruning import magnitude_importance, prune_mlp_channels_
from . import Feedback, attempt, checked, fail, first_failure, ok


def _tiny_llama(seed: int, hidden: int = 32, inter: int = 48):
    cfg = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _diagnose_mask(w: torch.Tensor, mask: torch.Tensor) -> Feedback:
    """Why a mask with the right number of zeros drops a weight larger in |w| than one it keeps."""
    a = w.abs()
    if bool(a[mask].max() <= a[~mask].min()):
        return fail("your mask keeps the smallest weights and drops the largest: True means *keep*, so the "
                    "mask is True where |w| is above the threshold")
    signed = w[~mask].max() <= w[mask].min()
    if signed:
        return fail("your mask drops the most negative weights, not the smallest in magnitude: compare |w|, "
                    "not w (a large negative weight matters too)")
    per_row = all(bool(r[~m].max() <= r[m].min()) for r, m in zip(a, mask) if m.any() and (~m).any())
    if per_row:
        return fail("each row drops its own smallest weights: use one threshold for the whole matrix "
                    "(kthvalue over w.abs().flatten()), so a row of large weights may lose none")
    return fail("your mask drops a weight that is larger in magnitude than one it keeps: drop the "
                "int(sparsity * w.numel()) smallest |w| of the whole matrix")


@checked
def check_magnitude_mask(fn) -> Feedback:
    """Check ``fn(w, sparsity) -> bool mask`` (True = keep) on a few random matrices."""
    g = torch.Generator().manual_seed(6)
    checks = []
    for shape, s in (((8, 16), 0.5), ((32, 4), 0.25), ((5, 7), 0.8)):
        w = torch.randn(shape, generator=g)
        mask = attempt(fn, w.clone(), s)
        if not isinstance(mask, torch.Tensor) or mask.shape != w.shape:
            return fail(f"return a tensor of the weight's shape {tuple(w.shape)}, "
                        f"got {type(mask).__name__} {getattr(mask, 'shape', '')}")
        if mask.dtype != torch.bool:
            return fail(f"return a boolean mask (True = keep), got dtype {mask.dtype}; try `w.abs() > threshold`")
        want_zero = int(s * w.numel())
        got_zero = int((~mask).sum())
        if got_zero != want_zero:
            checks.append(fail(f"for sparsity {s} on {w.numel()} weights, {want_zero} should be dropped; "
                               f"your mask drops {got_zero}"))
            continue
        if (~mask).any() and mask.any() and w.abs()[~mask].max() > w.abs()[mask].min():
            checks.append(_diagnose_mask(w, mask))
    return first_failure(*checks, success="Correct: the smallest |w| go, the exact fraction is dropped.")


@checked
def check_mlp_channel_scores(fn) -> Feedback:
    """Check ``fn(layer) -> (intermediate,)`` scores against the library's magnitude importance."""
    for seed in (6, 7):
        model = _tiny_llama(seed)
        layer = model.model.layers[0]
        scores = attempt(fn, layer)
        want = magnitude_importance(model)[0][0]
        if not isinstance(scores, torch.Tensor) or scores.numel() != want.numel():
            return fail(f"return one score per MLP channel ({want.numel()} here), got "
                        f"{getattr(scores, 'shape', type(scores).__name__)}")
        scores = scores.detach().float().flatten()
        m = layer.mlp
        if torch.allclose(scores, m.gate_proj.weight.pow(2).sum(1) + m.up_proj.weight.pow(2).sum(1), rtol=1e-4):
            return fail("you scored gate and up rows; channel j also owns column j of down_proj (weight[:, j])")
        if torch.allclose(scores, want.sqrt(), rtol=1e-4):
            return fail("that is the L2 norm; the library (and this exercise) uses its square, the sum of w**2")
        if not torch.allclose(scores, want, rtol=1e-4, atol=1e-6):
            return fail("scores differ from sum of w**2 over gate_proj.weight[j, :], up_proj.weight[j, :] "
                        "and down_proj.weight[:, j]; check which axis is the channel in each matrix")
    return ok("Correct: a channel's score pools every weight the dependency group removes with it.")


@checked
def check_prune_mlp(fn) -> Feedback:
    """Check ``fn(mlp, remove)`` (in place or returning the MLP) against the library's ``prune_mlp_channels_``."""
    g = torch.Generator().manual_seed(16)
    for seed, n_remove in ((1, 12), (2, 1), (3, 40)):
        model = _tiny_llama(seed)
        layer = model.model.layers[0]
        inter, hidden = layer.mlp.gate_proj.out_features, layer.mlp.gate_proj.in_features
        remove = sorted(torch.randperm(inter, generator=g)[:n_remove].tolist())
        keep = [j for j in range(inter) if j not in set(remove)]
        ref = copy.deepcopy(layer)
        prune_mlp_channels_(ref, remove)
        mine = copy.deepcopy(layer.mlp)
        out = attempt(fn, mine, list(remove))
        mine = out if isinstance(out, torch.nn.Module) else mine
        shapes = {n: tuple(getattr(mine, n).weight.shape) for n in ("gate_proj", "up_proj", "down_proj")}
        if shapes["gate_proj"] == (n_remove, hidden) and n_remove != len(keep):
            return fail(f"gate_proj kept {n_remove} rows: you kept the channels listed in `remove` and dropped "
                        "the others")
        for name in ("gate_proj", "up_proj"):
            if shapes[name] != (len(keep), hidden):
                return fail(f"removing {n_remove} of {inter} channels: {name}.weight should be "
                            f"({len(keep)}, {hidden}) - one row per kept channel - but it is {shapes[name]}")
        if shapes["down_proj"] == (hidden, inter):
            return fail(f"down_proj still reads all {inter} channels: cut its *columns* too (weight[:, keep]); "
                        "its rows are the hidden size and stay")
        if shapes["down_proj"] != (hidden, len(keep)):
            return fail(f"down_proj.weight should be ({hidden}, {len(keep)}) - column j reads channel j, its "
                        f"rows are the hidden size - but it is {shapes['down_proj']}")
        x = torch.randn(3, 5, hidden, generator=g)
        with torch.no_grad():
            got, want = attempt(mine, x, what="your pruned MLP's forward"), ref.mlp(x)
        if not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
            return fail("the shapes are right but the output differs from the reference prune: gate_proj, up_proj "
                        "and down_proj must keep the *same* channels in the same order (one `keep` index list "
                        "for all three), with their weights unchanged")
    return ok("Correct: one index list cuts gate and up rows and down columns together - that is the "
              "dependency group Torch-Pruning found above, and the pruned MLP computes exactly what the "
              "original computes with those channels silenced.")


@checked
def check_group_rows(fn) -> Feedback:
    """Check ``fn(group, queries_per_kv, head_dim) -> rows of q_proj`` on a few layouts."""
    for group, qpk, hd in ((0, 4, 2), (1, 4, 2), (2, 3, 4), (1, 1, 8)):
        rows = attempt(fn, group, qpk, hd)
        want = list(range(group * qpk * hd, (group + 1) * qpk * hd))
        try:
            got = sorted(int(r) for r in rows)
        except TypeError:
            return fail(f"return a list of row indices, got {type(rows).__name__}")
        if got == list(range(group * hd, (group + 1) * hd)) and qpk > 1:
            return fail("those are k_proj/v_proj rows (one head); q_proj holds queries_per_kv heads per group")
        if got != want:
            return fail(f"group {group} with {qpk} query heads per KV head and head_dim {hd} owns q_proj rows "
                        f"{want[0]}..{want[-1]} ({len(want)} rows); you returned "
                        f"{len(got)} rows starting at {(got or [None])[0]}")
    return ok("Correct: query head h uses KV head h // queries_per_kv, so a group's rows are contiguous.")

"""Exercises for notebook 06 (pruning): checks with specific feedback.

1. ``check_magnitude_mask(fn)`` - ``fn(w, sparsity)`` returns a boolean mask of the
   weights to *keep*: the largest ``1 - sparsity`` fraction by magnitude.
2. ``check_mlp_channel_scores(fn)`` - ``fn(layer)`` returns one score per MLP channel:
   the squared L2 norm of everything that channel owns (gate row, up row, down column).
3. ``check_group_rows(fn)`` - ``fn(group, queries_per_kv, head_dim)`` returns the
   ``q_proj`` rows that belong to KV group ``group`` under grouped-query attention.
"""

from __future__ import annotations

import torch

from . import Feedback, fail, first_failure, ok


def _call(fn, *args):
    try:
        return fn(*args), None
    except Exception as e:  # the learner's code may raise anything; say what
        return None, fail(f"your function raised {type(e).__name__}: {e}")


def check_magnitude_mask(fn) -> Feedback:
    """Check ``fn(w, sparsity) -> bool mask`` (True = keep) on a few random matrices."""
    g = torch.Generator().manual_seed(6)
    checks = []
    for shape, s in (((8, 16), 0.5), ((32, 4), 0.25), ((5, 7), 0.8)):
        w = torch.randn(shape, generator=g)
        mask, err = _call(fn, w.clone(), s)
        if err is not None:
            return err
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
            checks.append(fail("your mask drops a weight that is larger in magnitude than one it keeps: "
                               "compare |w|, not w (a large negative weight matters too)"))
    return first_failure(*checks, success="Correct: the smallest |w| go, the exact fraction is dropped.")


def check_mlp_channel_scores(fn) -> Feedback:
    """Check ``fn(layer) -> (intermediate,)`` scores against the library's magnitude importance."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..pruning import magnitude_importance

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(6)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    layer = model.model.layers[0]
    scores, err = _call(fn, layer)
    if err is not None:
        return err
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


def check_group_rows(fn) -> Feedback:
    """Check ``fn(group, queries_per_kv, head_dim) -> rows of q_proj`` on a few layouts."""
    for group, qpk, hd in ((0, 4, 2), (1, 4, 2), (2, 3, 4), (1, 1, 8)):
        rows, err = _call(fn, group, qpk, hd)
        if err is not None:
            return err
        want = list(range(group * qpk * hd, (group + 1) * qpk * hd))
        got = sorted(int(r) for r in rows) if rows is not None else None
        if got == list(range(group * hd, (group + 1) * hd)) and qpk > 1:
            return fail("those are k_proj/v_proj rows (one head); q_proj holds queries_per_kv heads per group")
        if got != want:
            return fail(f"group {group} with {qpk} query heads per KV head and head_dim {hd} owns q_proj rows "
                        f"{want[0]}..{want[-1]} ({len(want)} rows); you returned "
                        f"{len(got or [])} rows starting at {(got or [None])[0]}")
    return ok("Correct: query head h uses KV head h // queries_per_kv, so a group's rows are contiguous.")

"""Exercise checks of notebook 06: the reference passes, a wrong answer gets its specific hint, a stub is not done."""

from __future__ import annotations

import torch
from torch import nn

from course_lib.exercises import ch06


def stub(*args):
    raise NotImplementedError


def ref_mask(w, sparsity):
    k = int(sparsity * w.numel())
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    threshold = w.abs().flatten().kthvalue(k).values
    return w.abs() > threshold


def ref_scores(layer):
    m = layer.mlp
    return m.gate_proj.weight.pow(2).sum(1) + m.up_proj.weight.pow(2).sum(1) + m.down_proj.weight.pow(2).sum(0)


def ref_rows(group, queries_per_kv, head_dim):
    n = queries_per_kv * head_dim
    return list(range(group * n, (group + 1) * n))


def prune_with(keep_of, down_axis=1, down=True):
    """A learner's prune_mlp that keeps ``keep_of(inter, remove)`` channels and cuts down_proj along ``down_axis``."""
    def fn(mlp, remove):
        keep = torch.tensor(keep_of(mlp.gate_proj.out_features, remove))
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight = nn.Parameter(lin.weight.detach()[keep])
        if down:
            w = mlp.down_proj.weight.detach()
            mlp.down_proj.weight = nn.Parameter(w[:, keep] if down_axis == 1 else w[keep])
        return mlp
    return fn


def kept(inter, remove):
    return [j for j in range(inter) if j not in set(remove)]


def test_references_pass():
    assert ch06.check_magnitude_mask(ref_mask).passed
    assert ch06.check_mlp_channel_scores(ref_scores).passed
    assert ch06.check_prune_mlp(prune_with(kept)).passed
    assert ch06.check_group_rows(ref_rows).passed


def test_stubs_are_not_done_not_wrong():
    for check in (ch06.check_magnitude_mask, ch06.check_mlp_channel_scores, ch06.check_prune_mlp,
                  ch06.check_group_rows):
        fb = check(stub)
        assert not fb.passed and not fb.done and "Not done yet" in fb.message


def test_mask_mistakes_are_named():
    signed = ch06.check_magnitude_mask(lambda w, s: w > w.flatten().kthvalue(int(s * w.numel())).values)
    assert not signed and "|w|" in signed.message
    assert "boolean" in ch06.check_magnitude_mask(lambda w, s: ref_mask(w, s).float()).message
    off_by = ch06.check_magnitude_mask(lambda w, s: w.abs() >= w.abs().flatten().kthvalue(
        int(s * w.numel())).values)  # keeps the k-th smallest: drops one too few
    assert not off_by and "should be dropped" in off_by.message
    inverted = ch06.check_magnitude_mask(lambda w, s: ~ref_mask(w, s))  # True = drop: the right count, wrong end
    assert not inverted and "True means *keep*" in inverted.message
    per_row = ch06.check_magnitude_mask(  # each row loses its own smallest half: not the matrix's smallest
        lambda w, s: w.abs() > w.abs().kthvalue(int(s * w.shape[1]), dim=1, keepdim=True).values)
    assert not per_row and "one threshold for the whole matrix" in per_row.message
    crash = ch06.check_magnitude_mask(lambda w, s: 1 / 0)
    assert not crash and crash.done and "raised ZeroDivisionError" in crash.message


def test_score_mistakes_are_named():
    no_down = ch06.check_mlp_channel_scores(
        lambda lay: lay.mlp.gate_proj.weight.pow(2).sum(1) + lay.mlp.up_proj.weight.pow(2).sum(1))
    assert not no_down and "down_proj" in no_down.message
    assert "square" in ch06.check_mlp_channel_scores(lambda lay: ref_scores(lay).sqrt()).message
    wrong_axis = ch06.check_mlp_channel_scores(
        lambda lay: ref_scores(lay) - lay.mlp.down_proj.weight.pow(2).sum(0)
        + lay.mlp.down_proj.weight.pow(2).sum(1).mean())
    assert not wrong_axis and "axis" in wrong_axis.message


def test_prune_mistakes_are_named():
    no_down = ch06.check_prune_mlp(prune_with(kept, down=False))
    assert not no_down and "columns" in no_down.message
    inverted = ch06.check_prune_mlp(prune_with(lambda inter, remove: sorted(remove)))
    assert not inverted and "kept the channels listed in `remove`" in inverted.message
    shuffled = ch06.check_prune_mlp(prune_with(lambda inter, remove: kept(inter, remove)[::-1]))
    assert shuffled.passed  # the same channels in another order compute the same function

    def mismatched(mlp, remove):  # gate/up keep one set, down another: shapes fine, output wrong
        prune_with(kept)(mlp, remove)
        n = mlp.down_proj.weight.shape[1]
        mlp.down_proj.weight = nn.Parameter(mlp.down_proj.weight.detach().roll(1, dims=1))
        assert mlp.down_proj.weight.shape[1] == n
        return mlp
    fb = ch06.check_prune_mlp(mismatched)
    assert not fb and "same* channels" in fb.message
    half = ch06.check_prune_mlp(prune_with(lambda inter, remove: kept(inter, remove)[1:]))
    assert not half and "should be" in half.message


def test_group_mistakes_are_named():
    kv_rows = ch06.check_group_rows(lambda g, q, hd: list(range(g * hd, (g + 1) * hd)))
    assert not kv_rows and "k_proj" in kv_rows.message
    shifted = ch06.check_group_rows(lambda g, q, hd: ref_rows(g, q, hd)[1:])
    assert not shifted and "owns q_proj rows" in shifted.message
    assert "list of row indices" in ch06.check_group_rows(lambda g, q, hd: None).message

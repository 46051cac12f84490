"""Exercise checks of notebook 06 pass on the reference solutions and explain wrong answers."""

from __future__ import annotations

import torch

from course_lib.exercises import ch06


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


def test_references_pass():
    assert ch06.check_magnitude_mask(ref_mask).passed
    assert ch06.check_mlp_channel_scores(ref_scores).passed
    assert ch06.check_group_rows(ref_rows).passed


def test_mask_mistakes_are_named():
    signed = ch06.check_magnitude_mask(lambda w, s: w > w.flatten().kthvalue(int(s * w.numel())).values)
    assert not signed and "|w|" in signed.message
    assert "boolean" in ch06.check_magnitude_mask(lambda w, s: ref_mask(w, s).float()).message
    off_by = ch06.check_magnitude_mask(lambda w, s: w.abs() >= w.abs().flatten().kthvalue(
        int(s * w.numel())).values)  # keeps the k-th smallest: drops one too few
    assert not off_by and "should be dropped" in off_by.message
    assert "raised" in ch06.check_magnitude_mask(lambda w, s: 1 / 0).message


def test_score_mistakes_are_named():
    no_down = ch06.check_mlp_channel_scores(
        lambda lay: lay.mlp.gate_proj.weight.pow(2).sum(1) + lay.mlp.up_proj.weight.pow(2).sum(1))
    assert not no_down and "down_proj" in no_down.message
    assert "square" in ch06.check_mlp_channel_scores(lambda lay: ref_scores(lay).sqrt()).message
    wrong_axis = ch06.check_mlp_channel_scores(
        lambda lay: ref_scores(lay) - lay.mlp.down_proj.weight.pow(2).sum(0)
        + lay.mlp.down_proj.weight.pow(2).sum(1).mean())
    assert not wrong_axis and "axis" in wrong_axis.message


def test_group_mistakes_are_named():
    kv_rows = ch06.check_group_rows(lambda g, q, hd: list(range(g * hd, (g + 1) * hd)))
    assert not kv_rows and "k_proj" in kv_rows.message
    shifted = ch06.check_group_rows(lambda g, q, hd: ref_rows(g, q, hd)[1:])
    assert not shifted and "owns q_proj rows" in shifted.message

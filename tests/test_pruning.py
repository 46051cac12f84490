"""Tests for course_lib.pruning: exactness of the surgery, configs, save/load, recovery."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from course_lib import pruning as P
from course_lib.models import EMBEDDED
from course_lib.pruning import PruneConfig, RecoveryConfig
from tests.conftest import make_tiny

X = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x).logits


def zeroed_reference(model, report):
    """The unpruned model with the removed channels' and groups' outputs zeroed: must equal the pruned one."""
    import copy

    ref = copy.deepcopy(model)
    hd = P.head_dim(model)
    with torch.no_grad():
        for i, layer in enumerate(P.decoder_layers(ref)):
            rm = report.removed[i]
            layer.mlp.down_proj.weight[:, rm["mlp"]] = 0
            q_per_group = layer.self_attn.num_key_value_groups * hd
            for g in rm["groups"]:
                layer.self_attn.o_proj.weight[:, g * q_per_group:(g + 1) * q_per_group] = 0
    return ref


@pytest.mark.parametrize("kind,kw", [
    ("llama", dict(num_heads=8, num_kv_heads=2)),   # GQA
    ("qwen2", dict(num_heads=8, num_kv_heads=4)),   # GQA with q/k/v biases
    ("llama", dict(num_heads=4, num_kv_heads=4)),   # MHA
])
@pytest.mark.parametrize("importance", ["magnitude", "taylor", "activation"])
def test_structured_equals_zeroing_what_was_removed(kind, kw, importance):
    model = make_tiny(kind, **kw)
    small, rep = P.pruned(model, PruneConfig(ratio=0.5, importance=importance), calibration=X)
    assert rep.plan.mlp_keep == 64 and rep.plan.groups_keep == kw["num_kv_heads"] // 2
    assert small.config.num_attention_heads == kw["num_heads"] // 2
    assert small.config.num_key_value_heads == kw["num_kv_heads"] // 2
    assert small.config.intermediate_size == 64
    assert small.model.layers[0].self_attn.q_proj.out_features == kw["num_heads"] // 2 * P.head_dim(model)
    assert rep.params_after < rep.params_before
    torch.testing.assert_close(logits(small), logits(zeroed_reference(model, rep)), atol=1e-5, rtol=1e-5)


def test_original_untouched_by_copying_variant(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    P.pruned(tiny_llama, PruneConfig(ratio=0.5))
    P.pruned(tiny_llama, PruneConfig(ratio=0.5, method="unstructured"))
    P.sensitivity_scan(tiny_llama, lambda m: float(logits(m).std()), ratio=0.5)
    after = tiny_llama.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tiny_llama.config.intermediate_size == 128 and tiny_llama.config.num_key_value_heads == 2


@pytest.mark.parametrize("kind,head_ratio,kv_left", [("llama", 0.5, 2), ("qwen2", 0.25, 3)])
def test_save_and_reload_identical_logits(kind, head_ratio, kv_left, tmp_path):
    model = make_tiny(kind, num_heads=8, num_kv_heads=4)
    P.prune_(model, PruneConfig(ratio=0.3, head_ratio=head_ratio, round_to=8))
    assert model.config.intermediate_size == 96 and model.config.num_key_value_heads == kv_left
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.head_dim == 8 and again.config.num_attention_heads == 2 * kv_left
    assert torch.equal(logits(model), logits(again))


@pytest.mark.skipif(not (EMBEDDED["course-tiny"] / "config.json").is_file(), reason="course-tiny not trained yet")
def test_course_model_round_trip(course_tiny, tmp_path):
    model, tok = course_tiny
    small, _ = P.pruned(model, PruneConfig(ratio=0.5))
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, model.config.vocab_size, (1, 16))
    assert torch.equal(logits(small, x), logits(again, x))


def test_importance_decides_which_group_goes():
    model = make_tiny("qwen2", num_heads=8, num_kv_heads=4)
    a = model.model.layers[1].self_attn
    with torch.no_grad():  # KV group 2 of layer 1 gets tiny weights: magnitude must drop it
        for p in (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight):
            rows = p.shape[0] // 4
            p[2 * rows:3 * rows] *= 1e-3
    rep = P.prune_(model, PruneConfig(ratio=0.25, target="heads"))
    assert rep.removed[1]["groups"] == [2]
    assert rep.removed[1]["mlp"] == []


def test_custom_importance_callable():
    model = make_tiny("llama")
    n = len(P.decoder_layers(model))

    def last_channels_least(m, calib):
        return [(torch.arange(128, 0, -1).float(), torch.tensor([1.0, 0.0])) for _ in range(n)]

    rep = P.prune_(model, PruneConfig(ratio=0.25, importance=last_channels_least, head_ratio=0.5))
    assert rep.removed[0]["mlp"] == list(range(96, 128)) and rep.removed[0]["groups"] == [1]


def test_unstructured_sparsity_measured_and_shapes_kept(tiny_llama):
    shapes = {k: v.shape for k, v in tiny_llama.state_dict().items()}
    small, rep = P.pruned(tiny_llama, PruneConfig(ratio=0.5, method="unstructured", scope="layer"))
    assert rep.sparsity == pytest.approx(0.5, abs=0.01)
    assert {k: v.shape for k, v in small.state_dict().items()} == shapes
    for m in P._decoder_linears(small):  # per-layer scope: every matrix at the target
        assert (m.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    glob, rep = P.pruned(tiny_llama, PruneConfig(ratio=0.7, method="unstructured"))
    assert rep.sparsity == pytest.approx(0.7, abs=0.01) and P.sparsity(tiny_llama) == 0.0
    assert not torch.equal(logits(glob), logits(tiny_llama))


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=1.0), r"\[0, 1\)"),
    (dict(ratio=-0.1), r"\[0, 1\)"),
    (dict(ratio=0.3, head_ratio=1.5), "head_ratio"),
    (dict(method="random"), "structured"),
    (dict(target="embeddings"), "mlp"),
    (dict(importance="l7"), "magnitude"),
    (dict(round_to=0), "round_to"),
    (dict(scope="row"), "global"),
    (dict(method="unstructured", head_ratio=0.5), "structured' only"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


def test_plan_rejects_what_cannot_be_met(tiny_llama):
    with pytest.raises(ValueError, match="allowed head ratios here: \\[0.5\\]"):
        P.plan(tiny_llama, PruneConfig(ratio=0.3, head_ratio=0.3))
    with pytest.raises(ValueError, match="round_to"):
        P.plan(tiny_llama, PruneConfig(ratio=0.3, round_to=256))
    with pytest.raises(ValueError, match="removes nothing"):
        P.plan(tiny_llama, PruneConfig(ratio=0.01, round_to=64, target="mlp"))
    mqa = make_tiny("llama", num_heads=4, num_kv_heads=1)
    with pytest.raises(ValueError, match="single KV group"):
        P.plan(mqa, PruneConfig(ratio=0.5, target="heads"))
    llama4 = make_tiny("llama", num_heads=8, num_kv_heads=4)  # Llama's config wants hidden % heads == 0
    with pytest.raises(ValueError, match=r"allowed head ratios here: \[0.5, 0.75\]"):
        P.plan(llama4, PruneConfig(ratio=0.3, head_ratio=0.25))
    assert P.plan(llama4, PruneConfig(ratio=0.25)).groups_keep == 4  # following ratio: prune less, not more
    # following ratio, heads that can't be split are kept, MLP is still pruned
    assert P.plan(tiny_llama, PruneConfig(ratio=0.3)).groups_keep == 2
    with pytest.raises(ValueError, match="calibration"):
        P.prune_(tiny_llama, PruneConfig(ratio=0.5, importance="taylor"))


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(ValueError, match="llama.*qwen2"):
        P.prune_(torch.nn.Sequential(torch.nn.Linear(4, 4)), PruneConfig())


def test_mlp_group_shows_the_coupling(tiny_llama):
    text = str(P.mlp_dependency_group(tiny_llama.model.layers[0], [0, 1]))
    for name in ("gate_proj", "up_proj", "down_proj", "prune_in_channels"):
        assert name in text


def test_sensitivity_scan_one_value_per_layer(tiny_llama):
    vals = P.sensitivity_scan(tiny_llama, lambda m: float((logits(m) - logits(tiny_llama)).abs().mean()))
    assert len(vals) == 2 and all(v > 0 for v in vals)


def test_sensitivity_scan_chosen_layers_match_the_full_scan(tiny_llama):
    score = lambda m: float((logits(m) - logits(tiny_llama)).abs().mean())  # noqa: E731
    full = P.sensitivity_scan(tiny_llama, score)
    assert P.sensitivity_scan(tiny_llama, score, layers=[1]) == pytest.approx([full[1]])
    with pytest.raises(ValueError, match="decoder layer indices"):
        P.sensitivity_scan(tiny_llama, score, layers=[2])


def test_recovery_lowers_loss_and_distills():
    torch.manual_seed(0)
    ids = torch.arange(64).repeat(20) % 128  # a repeating sequence: learnable in a few steps
    model = make_tiny("llama")
    teacher = make_tiny("llama")
    small, _ = P.pruned(model, PruneConfig(ratio=0.5))
    cfg = RecoveryConfig(steps=30, lr=3e-3, batch_size=4, seq_len=32, eval_every=10)
    curve = P.recover_(small, ids, cfg, evaluate=lambda m: float(m(input_ids=ids[None, :33],
                                                                   labels=ids[None, :33]).loss.detach()))
    assert curve.steps_done == 30 and len(curve.losses) == 30
    assert curve.losses[-1] < curve.losses[0] * 0.7
    assert [s for s, _ in curve.evals] == [0, 10, 20, 30] and curve.evals[-1][1] < curve.evals[0][1]
    kd = P.recover_(small, ids, RecoveryConfig(steps=3, batch_size=2, seq_len=16, distill_alpha=0.5), teacher)
    assert kd.steps_done == 3
    with pytest.raises(ValueError, match="teacher"):
        P.recover_(small, ids, RecoveryConfig(distill_alpha=0.5))
    with pytest.raises(ValueError, match="only used with RecoveryConfig"):  # a teacher the loss would ignore
        P.recover_(small, ids, RecoveryConfig(steps=1, batch_size=2, seq_len=16), teacher)
    with pytest.raises(ValueError, match="lr"):
        RecoveryConfig(lr=0)


def test_recovery_and_calibration_refuse_ids_the_model_cannot_read(tiny_llama):
    ids = torch.arange(64).repeat(10) % 128
    cfg = RecoveryConfig(steps=1, batch_size=2, seq_len=16)
    for bad, match in ((ids + 100, "train_ids hold token id 163.*vocabulary of 128"),
                       (ids.float(), "train_ids must be a tensor of integer token ids")):
        with pytest.raises(ValueError, match=match):  # was IndexError / a dtype error inside the embedding
            P.recover_(tiny_llama, bad, cfg)
    with pytest.raises(ValueError, match="teacher's context of 64"):  # the teacher reads the windows too
        P.recover_(tiny_llama, ids, RecoveryConfig(steps=1, batch_size=2, seq_len=100, distill_alpha=0.5),
                   teacher=_short_context_model())
    with pytest.raises(ValueError, match=r"cfg.seq_len \(300\) exceeds the model's context of 256"):
        P.recover_(tiny_llama, torch.arange(1000) % 128, RecoveryConfig(steps=1, batch_size=2, seq_len=300))
    calib = torch.tensor([[1, 2, 300]])
    for importance in ("taylor", "activation"):
        with pytest.raises(ValueError, match="calibration hold token id 300"):
            P.prune_(tiny_llama, PruneConfig(ratio=0.5, importance=importance), calib)
        with pytest.raises(ValueError, match="calibration hold token id 300"):
            P.IMPORTANCE[importance](tiny_llama, calib)
    with pytest.raises(ValueError, match="calibration hold token id 300"):  # a custom importance gets checked ids
        P.prune_(tiny_llama, PruneConfig(ratio=0.5, importance=lambda m, c: None), calib)


def _short_context_model():
    model = make_tiny("llama")
    model.config.max_position_embeddings = 64
    return model


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("field, value", [
    ("steps", True), ("steps", 2.5), ("batch_size", 8.0), ("seq_len", 0),
    ("lr", INF), ("lr", NAN), ("lr", True), ("lr", 1.5),
    ("temperature", True), ("temperature", INF), ("temperature", NAN), ("temperature", 0),
    ("distill_alpha", True), ("distill_alpha", NAN), ("distill_alpha", 1.5),
    ("seed", 1.5), ("seed", -1), ("seed", True),
    ("eval_every", 2.5), ("eval_every", -1), ("eval_every", True),
    ("max_seconds", NAN), ("max_seconds", 0), ("max_seconds", True), ("max_seconds", "60"),
])
def test_recovery_config_checks_every_numeric_field(field, value):
    with pytest.raises(ValueError, match=field):
        RecoveryConfig(**{field: value})


def test_recovery_config_accepts_the_edges_of_every_range():
    import numpy as np

    cfg = RecoveryConfig(steps=np.int64(3), distill_alpha=1, temperature=np.float32(1.5), max_seconds=INF,
                         eval_every=0, seed=0)
    assert cfg.steps == 3 and RecoveryConfig(max_seconds=None, distill_alpha=0.0).max_seconds is None


# --- hidden size ---------------------------------------------------------------------------


def _silence(model, silent):
    """Zero every weight that reads or writes hidden channels ``silent``: they then carry nothing."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, silent] = 0
        model.lm_head.weight[:, silent] = 0
        for layer in P.decoder_layers(model):
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                lin.weight[:, silent] = 0
            for lin in (a.o_proj, m.down_proj):
                lin.weight[silent, :] = 0
                if lin.bias is not None:
                    lin.bias[silent] = 0
    return model


SILENT = [3, 10, 17, 40, 41, 42, 50, 63]


@pytest.mark.parametrize("kind,kw", [
    ("llama", dict(num_heads=8, num_kv_heads=2)),
    ("qwen2", dict(num_heads=4, num_kv_heads=2)),
    ("llama", dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=True)),
])
def test_hidden_pruning_equals_the_model_with_those_channels_silent(kind, kw):
    """Channels whose every weight is zero carry nothing: cutting them (norm gain and eps rescaled) changes no logit."""
    tie = kw.pop("tie_word_embeddings", False)
    model = make_tiny(kind, **kw)
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    _silence(model, SILENT)
    model.model.layers[0].input_layernorm.weight.requires_grad_(False)  # a frozen weight must stay frozen
    cfg = PruneConfig(ratio=0.0, target="mlp", hidden_ratio=len(SILENT) / 64, importance="magnitude")
    small, rep = P.pruned(model, cfg)
    assert rep.removed["hidden"] == SILENT and rep.plan.hidden_keep == 56
    assert small.config.hidden_size == 56 and small.model.embed_tokens.weight.shape == (128, 56)
    assert small.lm_head.in_features == 56 and small.model.layers[0].mlp.down_proj.out_features == 56
    assert (small.lm_head.weight is small.model.embed_tokens.weight) == tie
    assert not small.model.layers[0].input_layernorm.weight.requires_grad
    assert small.model.layers[0].post_attention_layernorm.weight.requires_grad
    torch.testing.assert_close(logits(small), logits(model), atol=2e-6, rtol=1e-5)


def test_hidden_with_mlp_and_groups_equals_zeroing_all_of_it():
    model = _silence(make_tiny("llama", num_heads=8, num_kv_heads=2, attention_bias=True, mlp_bias=True), SILENT)
    small, rep = P.pruned(model, PruneConfig(ratio=0.5, hidden_ratio=len(SILENT) / 64))
    assert rep.removed["hidden"] == SILENT and small.config.num_key_value_heads == 1
    torch.testing.assert_close(logits(small), logits(zeroed_reference(model, rep)), atol=2e-6, rtol=1e-5)


def test_prune_hidden_directly_updates_config_and_rejects_bad_keeps(tmp_path):
    model = _silence(make_tiny("qwen2", num_heads=4, num_kv_heads=2), SILENT)
    keep = [i for i in range(64) if i not in SILENT]
    for bad in ([], list(range(64)), keep[:-1] + [keep[0]], keep[:-1] + [64]):
        with pytest.raises(ValueError, match="distinct channels"):
            P.prune_hidden_(make_tiny("qwen2", num_heads=4, num_kv_heads=2), bad)
    ref = logits(model)
    P.prune_hidden_(model, keep)
    assert model.config.hidden_size == 56 and model.config.head_dim == 16
    torch.testing.assert_close(logits(model), ref, atol=2e-6, rtol=1e-5)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(back), logits(model))


def test_hidden_pruning_round_trip_and_rounding(tmp_path):
    model = make_tiny("qwen2", num_heads=4, num_kv_heads=2)
    small, rep = P.pruned(model, PruneConfig(ratio=0.5, hidden_ratio=0.3, round_to=8))
    # 64 - floor(0.3 * 64) = 45, rounded up to a multiple of lcm(2 query heads left, round_to 8) = 8 -> 48
    assert rep.plan.hidden_keep == 48 and small.config.hidden_size == 48
    assert small.config.head_dim == P.head_dim(model)  # pinned: hidden / heads no longer gives it
    small.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(back), logits(small))


def test_hidden_ratio_errors(tiny_llama):
    with pytest.raises(ValueError, match="hidden_ratio"):
        PruneConfig(hidden_ratio=1.0)
    with pytest.raises(ValueError, match="structured"):
        PruneConfig(method="unstructured", hidden_ratio=0.2)
    with pytest.raises(ValueError, match="removes nothing"):
        P.plan(tiny_llama, PruneConfig(ratio=0.5, hidden_ratio=0.01, round_to=32))


def _weight_bytes_per_step(m) -> int:
    """Bytes of every parameter a decode step reads: all of them except the input embedding table."""
    emb = m.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in m.parameters() if p is not emb)


def test_ceiling_matches_the_bytes_the_models_hold():
    dense = make_tiny("llama", hidden=64, intermediate=128, vocab=256, layers=2)
    configs = [PruneConfig(ratio=0.5, method="unstructured"), PruneConfig(ratio=0.3), PruneConfig(ratio=0.5),
               PruneConfig(ratio=0.5, hidden_ratio=0.25)]
    ceilings = []
    for cfg in configs:
        small, _ = P.pruned(dense, cfg)
        want = _weight_bytes_per_step(dense) / _weight_bytes_per_step(small)
        ceilings.append(P.speedup_ceiling(dense, small))
        assert ceilings[-1] == pytest.approx(want), cfg
    assert ceilings[0] == 1.0 and 1.0 < ceilings[1] < ceilings[2] < ceilings[3]


def test_pruning_a_quantized_model_says_prune_first(tiny_llama):
    from course_lib.quantization import QuantConfig, quantize_

    quantize_(tiny_llama, QuantConfig(bits=8))
    for cfg in (PruneConfig(ratio=0.5), PruneConfig(ratio=0.5, method="unstructured")):
        with pytest.raises(ValueError, match="quantized.*prune the float model first"):
            P.prune_(tiny_llama, cfg)


# --- query heads inside KV groups (uniform: valid grouped-query attention) ---------------------

def _zero_query_heads(model, report):
    """zeroed_reference plus the removed query heads' o_proj columns (original head numbers)."""
    ref = zeroed_reference(model, report)
    hd = P.head_dim(model)
    with torch.no_grad():
        for i, layer in enumerate(P.decoder_layers(ref)):
            for h in report.removed[i].get("queries", []):
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    return ref


@pytest.mark.parametrize("kind,kw,cfg,heads_left,kv_left", [
    ("llama", dict(num_heads=8, num_kv_heads=2), dict(ratio=0.0, target="mlp", query_ratio=0.5), 4, 2),
    ("qwen2", dict(num_heads=6, num_kv_heads=2, hidden=48), dict(ratio=0.3, target="mlp", query_ratio=0.34), 4, 2),
    ("llama", dict(num_heads=8, num_kv_heads=4), dict(ratio=0.5, query_ratio=0.5), 2, 2),  # with KV groups cut
])
def test_query_heads_equal_zeroing_them_and_round_trip(kind, kw, cfg, heads_left, kv_left, tmp_path):
    model = make_tiny(kind, **kw)
    small, rep = P.pruned(model, PruneConfig(**cfg))
    assert small.config.num_attention_heads == heads_left and small.config.num_key_value_heads == kv_left
    qpk = kw["num_heads"] // kw["num_kv_heads"]
    for i in range(len(P.decoder_layers(model))):
        per_group = [0] * kw["num_kv_heads"]
        for h in rep.removed[i]["queries"]:
            per_group[h // qpk] += 1
        kept = [g for g in range(kw["num_kv_heads"]) if g not in rep.removed[i]["groups"]]
        assert {per_group[g] for g in kept} == {qpk - heads_left // kv_left}  # the same count from every group
        assert small.model.layers[i].self_attn.num_key_value_groups == heads_left // kv_left
    torch.testing.assert_close(logits(small), logits(_zero_query_heads(model, rep)), atol=1e-5, rtol=1e-5)
    small.save_pretrained(tmp_path)
    assert torch.equal(logits(small), logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()))


def test_query_heads_chosen_by_their_weights():
    model = make_tiny("llama", num_heads=8, num_kv_heads=2)
    hd = P.head_dim(model)
    with torch.no_grad():  # query heads 1 and 6 of layer 0 get tiny weights: they must be the ones to go
        for h in (1, 6):
            model.model.layers[0].self_attn.q_proj.weight[h * hd:(h + 1) * hd] *= 1e-3
            model.model.layers[0].self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] *= 1e-3
    rep = P.prune_(model, PruneConfig(ratio=0.0, target="mlp", query_ratio=0.5))
    assert {1, 6} <= set(rep.removed[0]["queries"])


def test_query_ratio_that_cannot_be_met_names_the_allowed_ones(tiny_llama):
    llama8 = make_tiny("llama", num_heads=8, num_kv_heads=2)  # 4 per group; 6 heads would break hidden % heads
    with pytest.raises(ValueError, match=r"allowed query ratios here: \[0.5, 0.75\]"):
        P.plan(llama8, PruneConfig(ratio=0.3, query_ratio=0.25))
    mha = make_tiny("llama", num_heads=4, num_kv_heads=4)
    with pytest.raises(ValueError, match="single query head"):
        P.plan(mha, PruneConfig(ratio=0.3, query_ratio=0.5))
    with pytest.raises(ValueError, match="structured' only"):
        PruneConfig(method="unstructured", query_ratio=0.5)
    with pytest.raises(ValueError, match="same number of query heads"):
        P.prune_query_heads_(tiny_llama.model.layers[0], [0, 1], P.head_dim(tiny_llama))  # both from group 0

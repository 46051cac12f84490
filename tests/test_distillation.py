"""Distillation: the loss against a hand derivation, students built from teachers, a loop that learns and resumes."""

import json
import math
from dataclasses import replace

import pytest
import torch

from course_lib.distillation import (
    DistillConfig,
    check_compatible,
    distill,
    hidden_loss,
    kd_loss,
    make_student,
    spread_layers,
)
from course_lib.models import count_parameters
from tests.conftest import make_tiny

MICRO = DistillConfig(temperature=2.0, alpha=0.5, steps=12, batch_size=4, seq_len=16, lr=5e-3,
                      warmup_steps=2, seed=0, eval_every=6, eval_tokens=256, checkpoint_every=6)


def hand_kd(s_logits, t_logits, targets, T, alpha, kind="forward"):
    """The loss written out with explicit loops over positions and the vocabulary (float64)."""
    s = s_logits.double().reshape(-1, s_logits.size(-1))
    t = t_logits.double().reshape(-1, t_logits.size(-1))
    y = targets.reshape(-1)
    kl_sum, ce_sum = 0.0, 0.0
    for i in range(s.size(0)):
        zs = [math.exp(v / T) for v in s[i].tolist()]
        zt = [math.exp(v / T) for v in t[i].tolist()]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        if kind == "forward":
            kl_sum += sum(a * math.log(a / b) for a, b in zip(pt, ps))
        else:
            kl_sum += sum(b * math.log(b / a) for a, b in zip(pt, ps))
        z1 = [math.exp(v) for v in s[i].tolist()]
        ce_sum += -math.log(z1[int(y[i])] / sum(z1))
    n = s.size(0)
    return alpha * T * T * kl_sum / n + (1 - alpha) * ce_sum / n


@pytest.mark.parametrize("T,alpha,kind", [(1.0, 0.5, "forward"), (2.0, 0.3, "forward"), (4.0, 1.0, "forward"),
                                          (2.0, 0.0, "forward"), (3.0, 0.7, "reverse")])
def test_kd_loss_matches_the_hand_derivation(T, alpha, kind):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=g) * 3, torch.randn(2, 3, 11, generator=g) * 3
    y = torch.randint(0, 11, (2, 3), generator=g)
    got = kd_loss(s, t, y, temperature=T, alpha=alpha, kind=kind).item()
    assert got == pytest.approx(hand_kd(s, t, y, T, alpha, kind), rel=1e-5)


def test_kd_loss_is_zero_when_student_equals_teacher_and_gradient_scale_is_t_independent():
    t = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    assert kd_loss(t.clone(), t, None, temperature=3.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # The T^2 factor: for large T the soft-target gradient tends to (s - t) / V, whatever T is.
    grads = []
    for T in (10.0, 40.0):
        s = (t + 0.1 * torch.randn(8, 50, generator=torch.Generator().manual_seed(2))).requires_grad_()
        kd_loss(s, t, None, temperature=T, alpha=1.0).backward()
        grads.append(s.grad.norm().item())
    assert grads[0] == pytest.approx(grads[1], rel=0.05)


@pytest.mark.parametrize("bad", [dict(temperature=0), dict(temperature=-1.0), dict(alpha=-0.1), dict(alpha=1.5),
                                 dict(kind="sideways"), dict(steps=0), dict(hidden_weight=-1.0), dict(lr=0.0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        replace(MICRO, **bad)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value", [
    ("grad_clip", -1.0), ("grad_clip", 0.0), ("grad_clip", NAN), ("weight_decay", -0.1), ("weight_decay", NAN),
    ("weight_decay", 2.0), ("hidden_weight", NAN), ("hidden_weight", INF), ("temperature", True),
    ("temperature", NAN), ("temperature", INF), ("alpha", True), ("alpha", NAN), ("warmup_steps", 2.5),
    ("warmup_steps", -1), ("warmup_steps", True), ("steps", 10.0), ("steps", True), ("batch_size", False),
    ("eval_tokens", 100.5), ("lr", NAN), ("lr", INF), ("lr", -1e-3), ("min_lr_frac", NAN), ("min_lr_frac", -0.5),
    ("seed", -1), ("seed", 1.5), ("seed", True), ("temperature", "2"), ("grad_clip", None),
])
def test_config_validates_every_numeric_field(field, value):
    # A negative grad_clip trains backwards (docs/distillation.md); NaN and bools pass a plain range check.
    with pytest.raises(ValueError, match=field) as e:
        replace(MICRO, **{field: value})
    assert repr(value) in str(e.value) and ("in [" in str(e.value) or "in (" in str(e.value) or ">" in str(e.value))


def test_eval_tokens_below_two_is_refused_at_creation():
    # eval_tokens=1 was accepted and failed only at the first evaluation (perplexity needs one target)
    with pytest.raises(ValueError, match=r"eval_tokens must be an int >= 2.*got 1"):
        replace(MICRO, eval_tokens=1)
    assert replace(MICRO, eval_tokens=2).eval_tokens == 2


def test_config_accepts_the_edges_of_every_range():
    import numpy as np

    cfg = replace(MICRO, grad_clip=INF, warmup_steps=0, weight_decay=0.0, hidden_weight=0.0, alpha=1, seed=0,
                  min_lr_frac=0.0, temperature=np.float32(1.5), steps=np.int64(12))
    assert cfg.grad_clip == INF and cfg.lr_at(0) == pytest.approx(MICRO.lr)


def test_kd_loss_rejects_bad_input():
    s = torch.randn(2, 4, 10)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, None, temperature=0.0, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, s, None, alpha=2.0)
    with pytest.raises(ValueError, match="vocabulary"):
        kd_loss(s, torch.randn(2, 4, 12), None, alpha=1.0)
    with pytest.raises(ValueError, match="targets"):
        kd_loss(s, s, None, alpha=0.5)


def test_different_vocabularies_are_refused():
    teacher, other = make_tiny(vocab=128), make_tiny(vocab=96)
    with pytest.raises(ValueError, match="vocabulary"):
        check_compatible(other, teacher)
    with pytest.raises(ValueError, match="vocabulary"):
        distill(other, teacher, torch.arange(500) % 96, MICRO)


class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return self.vocab


def test_different_tokenizers_with_the_same_size_are_refused():
    a, b = make_tiny(vocab=128), make_tiny(vocab=128)
    with pytest.raises(ValueError, match="tokenizers"):
        check_compatible(a, b, _Tok({"a": 0, "b": 1}), _Tok({"a": 1, "b": 0}))
    check_compatible(a, b, _Tok({"a": 0}), _Tok({"a": 0}))


def test_spread_layers_keeps_first_and_last():
    assert spread_layers(6, 2) == [0, 5]
    assert spread_layers(6, 3) == [0, 2, 5] or spread_layers(6, 3) == [0, 3, 5]
    assert spread_layers(6, 6) == list(range(6))
    with pytest.raises(ValueError):
        spread_layers(6, 7)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_student_from_teacher_layers_computes_what_the_kept_layers_compute(family):
    teacher = make_tiny(family, layers=3)
    student = make_student(teacher, num_layers=3, init="teacher")  # same shape: an exact copy
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.allclose(student(x).logits, teacher(x).logits, atol=1e-5)
    small = make_student(teacher, num_layers=2, intermediate_size=64, init="teacher")
    assert small.config.num_hidden_layers == 2 and small.config.intermediate_size == 64
    assert count_parameters(small) < count_parameters(teacher)
    assert torch.equal(small.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[2].self_attn.q_proj.weight)
    # The narrower MLP keeps the teacher's most important channels, in order.
    w = teacher.model.layers[0].mlp.down_proj.weight
    kept = small.model.layers[0].mlp.down_proj.weight
    assert all(any(torch.equal(kept[:, i], w[:, j]) for j in range(w.shape[1])) for i in range(kept.shape[1]))


def test_random_student_and_bad_student_shapes():
    teacher = make_tiny(layers=2)
    rand = make_student(teacher, 1, hidden_size=32, init="random")
    assert rand.config.hidden_size == 32 and rand.config.vocab_size == teacher.config.vocab_size
    with pytest.raises(ValueError, match="init='random'"):
        make_student(teacher, 1, hidden_size=32, init="teacher")
    with pytest.raises(ValueError, match="init must be"):
        make_student(teacher, 1, init="pretrained")
    with pytest.raises(ValueError, match="narrower"):
        make_student(teacher, 1, intermediate_size=4096)


def _data(n=3000, vocab=128, seed=0):
    # A learnable sequence: a noisy repeating pattern, so a few steps visibly reduce the loss.
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) * 7 % vocab
    noise = torch.randint(0, vocab, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.1, noise, base)


def test_distill_learns_and_records_a_heldout_curve():
    teacher = make_tiny(layers=2, seed=0)
    student = make_student(teacher, 1, init="random", seed=3)
    res = distill(student, teacher, _data(), replace(MICRO, alpha=0.5), heldout_ids=_data(seed=1),
                  progress=False)
    assert [r["step"] for r in res.history] == [6, 12]
    assert res.history[-1]["heldout_loss"] < res.history[0]["heldout_loss"]
    assert not student.training


def test_scratch_needs_no_teacher_and_distilling_does():
    student = make_tiny(layers=1, seed=4)
    distill(student, None, _data(), replace(MICRO, alpha=0.0, steps=3), progress=False)
    with pytest.raises(ValueError, match="teacher"):
        distill(student, None, _data(), MICRO, progress=False)


def test_hidden_state_matching_with_a_narrower_student():
    teacher = make_tiny(layers=2, seed=0)
    student = make_student(teacher, 1, hidden_size=32, init="random")
    res = distill(student, teacher, _data(), replace(MICRO, hidden_weight=1.0, steps=4), progress=False)
    assert math.isfinite(res.history[-1]["train_loss"])
    h = [torch.randn(2, 3, 8)]
    assert hidden_loss(h, [h[0].clone()]).item() == pytest.approx(0.0, abs=1e-7)


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    import course_lib.distillation as D

    teacher = make_tiny(layers=2, seed=0)
    full = make_student(teacher, 1, init="teacher")
    distill(full, teacher, _data(), MICRO, progress=False)

    real_save = D._save_checkpoint

    def save_then_crash(ckpt, cfg, step, *rest):
        real_save(ckpt, cfg, step, *rest)
        raise KeyboardInterrupt  # the learner's kernel dies right after the step-6 checkpoint

    monkeypatch.setattr(D, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        distill(make_student(teacher, 1, init="teacher"), teacher, _data(), MICRO, checkpoint_dir=tmp_path / "ck",
                progress=False)
    monkeypatch.setattr(D, "_save_checkpoint", real_save)
    with pytest.raises(ValueError, match="different config"):
        distill(make_student(teacher, 1, init="teacher"), teacher, _data(), replace(MICRO, alpha=0.9),
                checkpoint_dir=tmp_path / "ck", progress=False)
    resumed = make_student(teacher, 1, init="random", seed=99)  # its weights come from the checkpoint
    res = distill(resumed, teacher, _data(), MICRO, checkpoint_dir=tmp_path / "ck", progress=False)
    assert res.resumed_from == 6 and [r["step"] for r in res.history] == [6, 12]
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)  # bit-identical: the checkpoint (read with weights_only=True) loses nothing


def test_overwrite_removes_only_the_checkpoint_files(tmp_path):
    """overwrite=True starts afresh; the learner's files beside every file distill writes survive it."""
    mine = {"notes.txt": "mine", "checkpoint.pt.bak": "my backup", "sub/data.txt": "more of mine"}
    for name, text in mine.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    teacher = make_tiny(layers=2)
    with pytest.raises(ValueError, match="overwrite=True.*other files are left alone"):
        distill(make_student(teacher, 1), teacher, _data(), MICRO, checkpoint_dir=tmp_path, progress=False)
    short = replace(MICRO, steps=2)
    distill(make_student(teacher, 1), teacher, _data(), short, checkpoint_dir=tmp_path, overwrite=True,
            progress=False)
    assert (tmp_path / "checkpoint.pt").is_file()
    (tmp_path / "checkpoint.pt.tmp").write_text("a save cut short")  # also the library's: removed on overwrite
    res = distill(make_student(teacher, 1), teacher, _data(), short, checkpoint_dir=tmp_path, overwrite=True,
                  progress=False)
    assert res.resumed_from == 0 and not (tmp_path / "checkpoint.pt.tmp").exists()
    for name, text in mine.items():
        assert (tmp_path / name).read_text() == text, name


def test_a_planted_checkpoint_is_refused_unread(tmp_path):
    """A checkpoint.pt whose unpickling runs code: resuming refuses it and the payload never runs."""
    from tests.test_untrusted_files import plant_pickle

    marker = tmp_path / "marker"
    plant_pickle(tmp_path / "ck" / "checkpoint.pt", marker)
    teacher = make_tiny(layers=2)
    with pytest.raises(ValueError, match=r"checkpoint.pt holds objects other than tensors.*refused unread"):
        distill(make_student(teacher, 1), teacher, _data(), MICRO, checkpoint_dir=tmp_path / "ck", progress=False)
    assert not marker.exists()
    res = distill(make_student(teacher, 1), teacher, _data(), replace(MICRO, steps=2),
                  checkpoint_dir=tmp_path / "ck", overwrite=True, progress=False)  # replaced, never read
    assert res.resumed_from == 0 and not marker.exists()


def test_damaged_or_foreign_checkpoints_are_clear_errors(tmp_path):
    from course_lib.distillation import load_checkpoint

    teacher = make_tiny(layers=2)
    distill(make_student(teacher, 1), teacher, _data(), replace(MICRO, steps=2), checkpoint_dir=tmp_path / "ck",
            progress=False)
    good = tmp_path / "ck" / "checkpoint.pt"
    assert load_checkpoint(good)["step"] == 2
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:1000])  # an interrupted copy
    with pytest.raises(ValueError, match="cut.pt is damaged"):
        load_checkpoint(cut)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")  # a tensors-only file, but not ours
    with pytest.raises(ValueError, match="not a distillation checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_checkpoint_dir_that_cannot_be_made_is_refused_before_training(tmp_path, monkeypatch):
    import course_lib.distillation as D

    monkeypatch.setattr(D, "fit", lambda *a, **k: pytest.fail("trained before checking checkpoint_dir"))
    (tmp_path / "f").write_text("a file")
    teacher = make_tiny(layers=2)
    for bad, what in ((tmp_path / "f", "is a file, not a folder"), (tmp_path / "f" / "ck", "f is a file")):
        with pytest.raises(ValueError, match=f"checkpoint_dir.*{what}"):
            distill(make_student(teacher, 1), teacher, _data(), MICRO, checkpoint_dir=bad, progress=False)
    assert (tmp_path / "f").read_text() == "a file"


def test_student_recipe_refuses_to_overwrite(tmp_path):
    import argparse

    from course_lib.cli.train import train_student

    (tmp_path / "model.safetensors").write_text("not yours")
    args = argparse.Namespace(model="course-tiny-student", out=str(tmp_path), steps=1, seed=0, overwrite=False)
    with pytest.raises(ValueError, match="overwrite"):
        train_student(args)
    assert (tmp_path / "model.safetensors").read_text() == "not yours"


def test_shipped_student_record_if_present():
    from course_lib.models import EMBEDDED

    rec_path = EMBEDDED["course-tiny-student"] / "training.json"
    if not rec_path.is_file():
        pytest.skip("course-tiny-student not trained in this install")
    rec = json.loads(rec_path.read_text())
    assert rec["parameters"] <= 0.4 * rec["teacher_parameters"]
    assert rec["seed"] == rec["config"]["seed"]
    ppl = rec["heldout_ppl"]
    assert ppl["student_kd"] < ppl["student_scratch"]


def test_student_recipe_validates_its_fields():
    from course_lib.cli.train import StudentRecipe

    for bad in (dict(num_layers=0), dict(num_layers=2.0), dict(intermediate_size=True), dict(init="copy"),
                dict(final_eval_tokens=1), dict(distill={"steps": 3})):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StudentRecipe(**bad)


def test_make_student_on_gpt2_names_the_fix():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))
    for init in ("teacher", "random"):
        with pytest.raises(ValueError, match="Llama-family.*gpt2.*from_config"):  # was KeyError: 'hidden_size'
            make_student(gpt2, 1, init=init)


def test_distill_refuses_ids_outside_the_vocabulary():
    teacher = make_tiny(vocab=128)
    student = make_student(teacher, 1)
    bad = _data().clone()
    bad[7] = 128
    with pytest.raises(ValueError, match="data_ids.*vocabulary of 128"):  # was IndexError deep in the embedding
        distill(student, teacher, bad, MICRO, progress=False)
    with pytest.raises(ValueError, match="heldout_ids.*vocabulary"):
        distill(student, teacher, _data(), MICRO, heldout_ids=bad, progress=False)
    with pytest.raises(ValueError, match="integer"):
        distill(student, teacher, _data().float(), MICRO, progress=False)


def test_distill_refuses_windows_longer_than_the_students_context_before_training():
    teacher = make_tiny(vocab=128)  # context 256
    student = make_student(teacher, 1)
    with pytest.raises(ValueError, match=r"seq_len \(300\) exceeds the student's context of 256"):
        distill(student, teacher, _data(), replace(MICRO, seq_len=300), heldout_ids=_data(), progress=False)

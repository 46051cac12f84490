"""The training command: validated config, a real (tiny) run that learns, no silent overwrite."""

import json
import os
import stat

import pytest

from course_lib import load_model
from course_lib.cli.train import TrainConfig, train

MICRO = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
             num_kv_heads=2, seq_len=32, batch_size=4, steps=30, warmup_steps=5, eval_every=15,
             eval_tokens=2048, corpus_chars=60_000, lr=1e-2)


@pytest.mark.parametrize("bad", [dict(num_heads=3), dict(num_kv_heads=3), dict(steps=0), dict(lr=2.0),
                                 dict(seq_len=1024), dict(corpus_chars=10)])
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        TrainConfig(**{**MICRO, **bad})


@pytest.mark.parametrize("field, value", [
    ("steps", True), ("steps", 2.5), ("steps", 30.0), ("batch_size", False), ("eval_every", 0),
    ("eval_tokens", 1.5), ("hidden_size", 32.0), ("max_position_embeddings", True),
    ("warmup_steps", -3), ("warmup_steps", 1.5), ("warmup_steps", True), ("seed", -1), ("seed", 1.5),
    ("corpus_chars", 60_000.5), ("corpus_chars", True),
    ("lr", float("nan")), ("lr", True), ("lr", "1e-3"),
    ("min_lr_frac", float("nan")), ("min_lr_frac", -0.1), ("min_lr_frac", 1.5),
    ("weight_decay", -1), ("weight_decay", float("nan")), ("weight_decay", float("inf")), ("weight_decay", True),
])
def test_every_numeric_field_is_checked(field, value):
    # bool counts as an int in Python and NaN fails no comparison: both would train silently with a wrong value
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{**MICRO, field: value})


def test_config_accepts_the_edges_of_every_range():
    import numpy as np

    cfg = TrainConfig(**{**MICRO, "warmup_steps": 0, "weight_decay": 0.0, "min_lr_frac": 1, "seed": 0,
                         "corpus_chars": None, "steps": np.int64(30), "lr": np.float32(1e-2)})
    assert cfg.lr_at(0) == pytest.approx(1e-2) == pytest.approx(cfg.lr_at(29))


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(**MICRO)
    assert cfg.lr_at(0) < cfg.lr_at(4) == pytest.approx(cfg.lr)
    assert cfg.lr_at(cfg.steps - 1) < cfg.lr / 2


def test_micro_training_learns_and_saves_a_loadable_model(tmp_path):
    out = tmp_path / "micro"
    record = train(TrainConfig(**MICRO), out)
    hist = record["history"]
    assert hist[-1]["heldout_loss"] < hist[0]["heldout_loss"] or hist[-1]["train_loss"] < 5.5
    saved = json.loads((out / "training.json").read_text())
    assert saved["config"]["seed"] == 1234 and saved["corpus"]["train"]["sha256"]
    model, tok = load_model(str(out))
    assert model.config.num_key_value_heads == 2 and len(tok) == 300


def test_refuses_to_overwrite_a_non_empty_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("learner's work")
    with pytest.raises(ValueError, match="overwrite"):
        train(TrainConfig(**MICRO), tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "learner's work"


def test_out_that_is_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "model.txt"
    f.write_text("a file, not a folder")
    with pytest.raises(ValueError, match="is a file"):
        train(TrainConfig(**MICRO), f)
    assert f.read_text() == "a file, not a folder"


# --- the student's trainer (python -m course_lib train --model course-tiny-student) ------------------------

@pytest.fixture
def micro_student(monkeypatch):
    """``train_student`` on a tiny random teacher, a short random token stream and 4 steps: seconds."""
    import argparse
    import functools

    import torch

    import course_lib.cli.train as recipe
    import course_lib.data
    import course_lib.distillation as dist
    from course_lib import load_tokenizer
    from tests.conftest import make_tiny

    tok = load_tokenizer("course-tiny")
    real_recipe = recipe.StudentRecipe
    teacher = make_tiny(vocab=len(tok), hidden=32, intermediate=64, layers=2)
    ids = torch.randint(0, len(tok), (6000,), generator=torch.Generator().manual_seed(0))
    cfg = dist.DistillConfig(temperature=2.0, alpha=0.5, steps=4, batch_size=2, seq_len=16, lr=5e-3,
                             warmup_steps=1, seed=0, eval_every=2, eval_tokens=128, checkpoint_every=2)

    def run(out, overwrite=False):
        # Patched on call, so a test may run course-tiny's real trainer before.
        monkeypatch.setattr(recipe, "load_model", lambda name: (teacher, tok))  # where train_student calls it
        monkeypatch.setattr(course_lib.data, "encode_split", lambda tok, split, **kw: ids)
        monkeypatch.setattr(recipe, "StudentRecipe", functools.partial(
            real_recipe, num_layers=1, intermediate_size=32, distill=cfg, final_eval_tokens=128))
        args = argparse.Namespace(model="course-tiny-student", out=str(out), steps=None, seed=None,
                                  overwrite=overwrite, teacher=None)
        return recipe.train_student(args)

    return run


def test_overwrite_keeps_other_files_for_both_models(tmp_path, micro_student):
    """--overwrite replaces the model's own files and leaves the rest alone, for course-tiny and the student."""
    for name in ("tiny", "student"):
        out = tmp_path / name
        out.mkdir()
        (out / "notes.txt").write_text("learner's notes")
        (out / "training.json").write_text("{}")
        if name == "tiny":
            train(TrainConfig(**{**MICRO, "steps": 2, "eval_every": 2}), out, overwrite=True)
        else:
            assert micro_student(out, overwrite=True) == 0
        assert (out / "notes.txt").read_text() == "learner's notes", name
        assert json.loads((out / "training.json").read_text())["config"], name  # replaced by this run's record
        load_model(str(out))
    assert not (tmp_path / "student.ckpt").exists()  # the student's checkpoints are removed once it finished


def test_saved_models_are_readable_by_others_under_umask_022_and_other_files_keep_their_modes(tmp_path,
                                                                                             micro_student):
    """A class shares its trained models: every file a trainer saves gets the umask's mode (safetensors writes
    0600 whatever the umask); a learner's own file in the folder keeps the mode it had."""
    old = os.umask(0o022)
    try:
        for name in ("tiny", "student"):
            out = tmp_path / name
            out.mkdir()
            (out / "private.txt").write_text("learner's notes")
            (out / "private.txt").chmod(0o600)
            if name == "tiny":
                train(TrainConfig(**{**MICRO, "steps": 2, "eval_every": 2}), out, overwrite=True)
            else:
                assert micro_student(out, overwrite=True) == 0
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
            assert modes.pop("private.txt") == 0o600, name
            assert "model.safetensors" in modes and "tokenizer.json" in modes, (name, modes)
            assert all(m == 0o644 for m in modes.values()), (name, {k: oct(m) for k, m in modes.items()})
    finally:
        os.umask(old)


@pytest.mark.parametrize("overwrite", [False, True])
def test_student_never_touches_a_ckpt_folder_it_did_not_make(tmp_path, micro_student, overwrite):
    ckpt = tmp_path / "student.ckpt"
    ckpt.mkdir()
    (ckpt / "sentinel.txt").write_text("the learner's")
    with pytest.raises(ValueError, match="--overwrite") as err:
        micro_student(tmp_path / "student", overwrite=overwrite)
    assert "did not make" in str(err.value)
    assert (ckpt / "sentinel.txt").read_text() == "the learner's" and sorted(ckpt.iterdir()) == [ckpt / "sentinel.txt"]
    assert not (tmp_path / "student").exists()


def test_student_resumes_its_own_checkpoint_and_removes_only_its_files(tmp_path, micro_student, monkeypatch, caplog):
    import logging

    import course_lib.cli.train as recipe
    import course_lib.distillation as dist

    real_make_student = _stop_after_the_kd_stage(monkeypatch, tmp_path, micro_student)
    ckpt = tmp_path / "student.ckpt"
    assert (ckpt / "kd" / dist.CHECKPOINT).is_file()
    (ckpt / "mine.txt").write_text("dropped here by the learner")
    monkeypatch.setattr(recipe, "make_student", real_make_student)
    with caplog.at_level(logging.INFO, logger="course_lib"):
        assert micro_student(tmp_path / "student") == 0
    assert "resuming from step 4" in caplog.text  # the KD stage was not trained again
    assert sorted(p.name for p in ckpt.iterdir()) == ["mine.txt"]  # its checkpoints gone, the learner's file kept
    load_model(str(tmp_path / "student"))


def test_checkpoint_folder_helpers(tmp_path):
    from course_lib.training import CHECKPOINT_MARKER, claim_checkpoint_dir, release_checkpoint_dir

    ckpt, files = tmp_path / "run.ckpt", ["kd/checkpoint.pt"]
    claim_checkpoint_dir(ckpt, files, overwrite=False)
    assert (ckpt / CHECKPOINT_MARKER).is_file()
    (ckpt / "kd").mkdir()
    (ckpt / "kd" / "checkpoint.pt").write_text("state")
    claim_checkpoint_dir(ckpt, files, overwrite=False)  # its own folder: kept, to resume from
    assert (ckpt / "kd" / "checkpoint.pt").is_file()
    claim_checkpoint_dir(ckpt, files, overwrite=True)  # afresh: only its checkpoint files go
    assert not (ckpt / "kd" / "checkpoint.pt").exists() and (ckpt / CHECKPOINT_MARKER).is_file()
    release_checkpoint_dir(ckpt, files)
    assert not ckpt.exists()
    (tmp_path / "file.ckpt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        claim_checkpoint_dir(tmp_path / "file.ckpt", files, overwrite=True)


def test_student_trainer_refuses_a_planted_checkpoint_unread(tmp_path, micro_student, capsys):
    """DIR.ckpt/kd/checkpoint.pt is read on resume; a pickle planted there (with the marker anyone can write)
    is refused by the library and by `python -m course_lib train`, and its payload never runs."""
    from course_lib.__main__ import main
    from course_lib.training import CHECKPOINT_MARKER
    from tests.test_untrusted_files import plant_pickle

    ckpt = tmp_path / "student.ckpt"
    ckpt.mkdir()
    (ckpt / CHECKPOINT_MARKER).write_text("planted")
    marker = tmp_path / "marker"
    plant_pickle(ckpt / "kd" / "checkpoint.pt", marker)
    with pytest.raises(ValueError, match="refused unread"):
        micro_student(tmp_path / "student")
    assert not marker.exists()
    rc = main(["train", "--model", "course-tiny-student", "--out", str(tmp_path / "student")])  # still patched
    err = capsys.readouterr().err
    assert rc == 2 and "refused unread" in err and "Traceback" not in err, err
    assert not marker.exists() and not (tmp_path / "student").exists()


def test_student_overwrite_keeps_the_learners_files_beside_every_checkpoint(tmp_path, micro_student, monkeypatch):
    """--overwrite on an interrupted run starts afresh, removing only the checkpoint files it wrote."""
    import course_lib.cli.train as recipe

    real_make_student = _stop_after_the_kd_stage(monkeypatch, tmp_path, micro_student)
    ckpt = tmp_path / "student.ckpt"
    mine = [ckpt / "mine.txt", ckpt / "kd" / "mine.txt", ckpt / "kd" / "checkpoint.pt.bak"]
    for f in mine:
        f.write_text("the learner's")
    monkeypatch.setattr(recipe, "make_student", real_make_student)
    assert micro_student(tmp_path / "student", overwrite=True) == 0
    assert all(f.read_text() == "the learner's" for f in mine)
    left = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert left == ["kd/checkpoint.pt.bak", "kd/mine.txt", "mine.txt"], left


def _stop_after_the_kd_stage(monkeypatch, tmp_path, micro_student):
    """Run the micro student recipe into tmp_path/student and interrupt it where the scratch baseline is built
    (after the KD stage), leaving its checkpoint folder behind; returns the real make_student, to put back."""
    import course_lib.cli.train as recipe

    real_make_student = recipe.make_student

    def interrupted(*a, init="teacher", **kw):
        if init == "random":
            raise KeyboardInterrupt
        return real_make_student(*a, init=init, **kw)

    monkeypatch.setattr(recipe, "make_student", interrupted)
    with pytest.raises(KeyboardInterrupt):
        micro_student(tmp_path / "student")
    return real_make_student

"""The training command: validated config, a real (tiny) run that learns, no silent overwrite."""

import json

import pytest

from course_lib import load_model
from course_lib.train import TrainConfig, lr_at, train

MICRO = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
             num_kv_heads=2, seq_len=32, batch_size=4, steps=30, warmup_steps=5, eval_every=15,
             eval_tokens=2048, corpus_chars=60_000, lr=1e-2)


@pytest.mark.parametrize("bad", [dict(num_heads=3), dict(num_kv_heads=3), dict(steps=0), dict(lr=2.0),
                                 dict(seq_len=1024), dict(corpus_chars=10)])
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        TrainConfig(**{**MICRO, **bad})


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(**MICRO)
    assert lr_at(0, cfg) < lr_at(4, cfg) == pytest.approx(cfg.lr)
    assert lr_at(cfg.steps - 1, cfg) < cfg.lr / 2


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

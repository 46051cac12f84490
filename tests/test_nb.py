"""course_lib.nb: what every notebook calls first, and notebook outputs without noise.

A learner reads a cell's output for the number it measured. transformers' "Loading weights" / "Writing model
shards" bars and the profiler's "USDT: ... profiler_start" lines said nothing and came 9-12 times a notebook.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

from course_lib import load_model, nb, timing

ROOT = Path(__file__).resolve().parents[1]
BARS = ("Loading weights", "Writing model shards")


@pytest.fixture
def restore_tqdm_hook():
    previous = hf_logging.set_tqdm_hook(None)
    hf_logging.set_tqdm_hook(previous)
    yield
    hf_logging.set_tqdm_hook(previous)


def test_load_model_prints_no_weight_bar(capfd, restore_tqdm_hook):
    hf_logging.set_tqdm_hook(None)
    model, _ = load_model("course-tiny")
    err = capfd.readouterr().err
    assert not [b for b in BARS if b in err], f"load_model printed a progress bar:\n{err[:500]}"
    assert model.training is False
    # Outside load_model, transformers' bars are the learner's business: the hook is put back.
    assert hf_logging.set_tqdm_hook(None) is None


def test_quiet_weight_bars_hides_save_and_keeps_other_bars(capfd, tmp_path, restore_tqdm_hook):
    hf_logging.set_tqdm_hook(None)
    model, _ = load_model("course-tiny")
    capfd.readouterr()
    with nb.quiet_weight_bars():
        model.save_pretrained(tmp_path / "m")
        for _ in hf_logging.tqdm(range(3), desc="some other work"):
            pass
    err = capfd.readouterr().err
    assert "Writing model shards" not in err, err[:500]
    assert "some other work" in err, "only the weight bars are hidden; other transformers bars still show"
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_banner_hides_weight_bars_for_the_session(capfd, tmp_path, restore_tqdm_hook):
    hf_logging.set_tqdm_hook(None)
    nb.banner()
    model, _ = load_model("course-tiny")
    model.save_pretrained(tmp_path / "m")  # a notebook's own call, not through course_lib
    err = capfd.readouterr().err
    assert not [b for b in BARS if b in err], err[:500]


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build keeps kineto's log (its errors matter)")
def test_profiler_prints_no_usdt_lines():
    """kineto writes straight to file descriptor 2 and reads its log level once: a fresh process shows it."""
    code = textwrap.dedent("""
        import torch, course_lib
        from torch.profiler import ProfilerActivity, profile
        x = torch.randn(8, 8)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            x @ x
        print(len(prof.key_averages()) > 0)
    """)
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True", "the profiler must still record events"
    assert "USDT" not in r.stderr and "profiler_start" not in r.stderr, r.stderr


def test_banner_warns_on_a_busy_machine(capsys, monkeypatch, restore_tqdm_hook):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(timing, "_probe_times", lambda threads, rounds: (0.09e-3, 11e-3))
    info = nb.banner()
    out = capsys.readouterr().out
    assert info["machine_load"].startswith("busy")
    assert "BUSY MACHINE" in out and "torch.set_num_threads(1)" in out and "Close other work" in out


def test_banner_says_quiet_on_an_idle_machine(capsys, monkeypatch, restore_tqdm_hook):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(timing, "_probe_times", lambda threads, rounds: (0.09e-3, 0.06e-3))
    nb.banner()
    out = capsys.readouterr().out
    assert "machine_load: quiet" in out and "BUSY" not in out

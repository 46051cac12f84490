"""The command line and a non-editable install: what a learner runs first."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env_extra: dict | None = None, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "course_lib", *args], capture_output=True, text=True,
                          env=env, timeout=300, **kw)


def test_doctor_reports_and_succeeds(smollm2):
    res = run("doctor", env_extra={"COURSE_CACHE": str(smollm2[2])})  # the session's converted copy: no 2nd GGUF
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bandwidth" in res.stdout and "course-tiny loads" in res.stdout
    assert "smollm2-135m-instruct loads" in res.stdout


def test_bench_unknown_suite_is_a_clear_error():
    res = run("bench", "--suite", "warp-speed")
    assert res.returncode == 2 and "choose from" in res.stderr


def test_train_refuses_existing_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    res = run("train", "--out", str(tmp_path), "--steps", "1")
    assert res.returncode == 2 and "overwrite" in res.stderr


def test_train_teacher_only_for_the_student(tmp_path):
    res = run("train", "--out", str(tmp_path / "m"), "--steps", "1", "--teacher", "course-tiny")
    assert res.returncode == 2 and "course-tiny-student" in res.stderr
    assert not (tmp_path / "m").exists()


def test_student_refuses_existing_folder_before_loading_teacher(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    res = run("train", "--model", "course-tiny-student", "--teacher", str(tmp_path / "nowhere"),
              "--out", str(tmp_path), "--steps", "1")
    assert res.returncode == 2 and "overwrite" in res.stderr
    assert (tmp_path / "keep.txt").read_text() == "x"


@pytest.mark.slow
def test_non_editable_install_loads_embedded_model(tmp_path, smollm2):
    """`pip install .` (not -e) must carry the weights inside the package, and find the real model offline."""
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                          "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    code = ("import course_lib, sys; m, t = course_lib.load_model(); "
            "assert 'site' in course_lib.__file__, course_lib.__file__; print(m.config.model_type); "
            "r, _ = course_lib.load_model('smollm2-135m-instruct'); print(type(r).__name__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1",
                              "COURSE_CACHE": str(smollm2[2])})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["llama", "LlamaForCausalLM"]

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


def cli(capsys, *args):
    """The command line in this process (no interpreter start-up): exit code and stderr."""
    from course_lib.__main__ import main

    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_student_refuses_a_ckpt_folder_it_did_not_make(tmp_path, capsys):
    """DIR.ckpt beside --out is where the student keeps checkpoints; a user's folder there is never touched."""
    ckpt = tmp_path / "student.ckpt"
    ckpt.mkdir()
    (ckpt / "sentinel.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        rc, err = cli(capsys, "train", "--model", "course-tiny-student", "--out", str(tmp_path / "student"),
                      "--steps", "1", *extra)
        assert rc == 2 and "--overwrite" in err and "did not make" in err, err
    assert (ckpt / "sentinel.txt").read_text() == "mine" and not (tmp_path / "student").exists()


def test_train_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "weights.bin"
    f.write_text("not a folder")
    for model in ("course-tiny", "course-tiny-student"):
        rc, err = cli(capsys, "train", "--model", model, "--out", str(f), "--steps", "1")
        assert rc == 2 and err.startswith("error: ") and "is a file" in err, err
    assert f.read_text() == "not a folder"


def test_truncated_weights_are_one_error_line_not_a_traceback(tmp_path):
    import shutil

    from course_lib.models import EMBEDDED

    folder = tmp_path / "broken"
    shutil.copytree(EMBEDDED["course-tiny"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])  # an interrupted download
    res = run("evaluate", "--model", str(folder), "--functions", "1")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr


def test_evaluate_refuses_an_existing_json_before_evaluating(tmp_path, capsys):
    out = tmp_path / "card.json"
    out.write_text("my notes")
    rc, err = cli(capsys, "evaluate", "--json", str(out), "--model", str(tmp_path / "no-such-model"))
    # refused up front: the missing model would be the error if the evaluation had started
    assert rc == 2 and "--overwrite" in err and "already exists" in err, err
    assert out.read_text() == "my notes"


def test_bench_json_over_the_readme_is_refused_up_front(tmp_path, capsys, monkeypatch):
    from course_lib import bench

    monkeypatch.setattr(bench, "machine_info", lambda: pytest.fail("the suites ran before the outputs were checked"))
    readme = tmp_path / "README.md"
    readme.write_text("# mine\n<!-- bench:begin -->\n<!-- bench:end -->\n")
    rc, err = cli(capsys, "bench", "--suite", "decode", "--json", str(readme), "--readme", str(readme))
    assert rc == 2 and "both write" in err, err
    assert readme.read_text() == "# mine\n<!-- bench:begin -->\n<!-- bench:end -->\n"

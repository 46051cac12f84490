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


def cli_exit(capsys, *args):
    """Like :func:`cli`, also for argparse's own refusals (they exit with 2 before the command runs)."""
    try:
        return cli(capsys, *args)
    except SystemExit as e:
        return e.code, capsys.readouterr().err


@pytest.fixture
def no_work(monkeypatch):
    """Every command's first slow step fails the test: an argument must be refused before it."""
    import course_lib.cli.evaluate
    import course_lib.cli.train
    from course_lib import bench

    def reached(what):
        return lambda *a, **k: pytest.fail(f"{what} started before the arguments were checked")

    monkeypatch.setattr(bench, "machine_info", reached("bench"))
    monkeypatch.setattr(course_lib.cli.evaluate, "load_model", reached("evaluate"))
    monkeypatch.setattr(course_lib.cli.train, "train_tokenizer", reached("train"))
    monkeypatch.setattr(course_lib.cli.train, "load_model", reached("the student trainer"))


@pytest.mark.parametrize("args,flag", [
    (["evaluate", "--functions", "0"], "--functions"),  # before the evaluation, naming the flag
    (["evaluate", "--functions", "many"], "--functions"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--model", "course-tiny-student", "--steps", "-3"], "--steps"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--model", "course-tiny-student", "--seed", "1.5"], "--seed"),
])
def test_numbers_are_refused_before_any_work_naming_the_flag(args, flag, capsys, no_work, tmp_path):
    rc, err = cli_exit(capsys, *args, *(["--out", str(tmp_path / "m")] if args[0] == "train" else []))
    assert rc == 2 and f"argument {flag}: must be an int >=" in err, err


def test_outputs_under_a_file_are_refused_before_any_work(tmp_path, capsys, no_work):
    """An output path under a file fails at once, naming its flag, before minutes of work whose results it loses."""
    f = tmp_path / "results.txt"
    f.write_text("mine")
    for args, flag in ((["bench", "--suite", "decode", "--json", str(f / "out.json")], "--json"),
                       (["bench", "--suite", "decode", "--report", str(f / "report")], "--report"),
                       (["evaluate", "--json", str(f / "sub" / "card.json")], "--json"),
                       (["train", "--out", str(f / "model")], "--out"),
                       (["train", "--model", "course-tiny-student", "--out", str(f / "model")], "--out")):
        rc, err = cli_exit(capsys, *args)
        assert rc == 2 and f"{flag} " in err and "is a file" in err, (args, err)
    assert f.read_text() == "mine"


def test_unknown_model_or_teacher_names_the_flag_before_any_work(tmp_path, capsys, no_work):
    rc, err = cli_exit(capsys, "evaluate", "--model", str(tmp_path / "nowhere"))
    assert rc == 2 and "--model" in err and "no such model folder" in err, err
    rc, err = cli_exit(capsys, "train", "--model", "course-tiny-student", "--teacher", str(tmp_path / "nowhere"),
                       "--out", str(tmp_path / "student"))
    assert rc == 2 and "--teacher" in err and "no such model folder" in err, err
    assert not (tmp_path / "student").exists() and not (tmp_path / "student.ckpt").exists()


def test_bench_keeps_its_results_when_writing_them_fails(tmp_path, monkeypatch):
    import json

    import course_lib.bench.decode
    from course_lib import bench

    rows = [{"suite": "decode", "method": "x", "decode_tok_s": 1.5}]
    monkeypatch.setattr(bench, "machine_info", lambda: {"cpu_threads": 1})
    monkeypatch.setattr(course_lib.bench.decode, "run", lambda quick: {"rows": rows})

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench, "_write_outputs", disk_full)
    with pytest.raises(ValueError, match="No space left.*results are kept in") as err:
        bench.run_bench(["decode"], json_path=str(tmp_path / "out.json"))
    kept = Path(str(err.value).rsplit(" ", 1)[-1])
    try:
        assert json.loads(kept.read_text())["rows"] == rows
    finally:
        kept.unlink()

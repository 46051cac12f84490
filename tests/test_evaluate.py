"""The model card of `python -m course_lib evaluate`: measured figures plus the training record, for every
shipped model (course-tiny, trained from scratch, and course-tiny-student, distilled: their records differ)."""

import json
import math

import pytest

from course_lib.cli.evaluate import evaluate_model, read_training_record, training_summary
from course_lib.models import EMBEDDED


def test_card_of_the_shipped_student_with_tiny_settings():
    """Was KeyError: 'train_tokens' after the whole evaluation: the student's record has no corpus counts."""
    if not (EMBEDDED["course-tiny-student"] / "training.json").is_file():
        pytest.skip("course-tiny-student not trained in this install")
    card = evaluate_model("course-tiny-student", max_tokens=600, n_functions=1, progress=False)
    assert math.isfinite(card["heldout_perplexity"]) and 0 <= card["heldout_compile_rate"] <= 1
    rec = json.loads((EMBEDDED["course-tiny-student"] / "training.json").read_text())
    assert card["training"]["train_tokens_seen"] == rec["train_tokens_seen"]
    assert card["training"]["train_seconds"] == rec["seconds"]["student_kd"]
    assert card["training"]["teacher"] == "course-tiny" and card["training"]["corpus_train_tokens"] is None
    json.dumps(card)  # what --json writes


@pytest.mark.parametrize("name", ["course-tiny", "course-tiny-student"])
def test_training_summary_of_each_shipped_record(name):
    record = read_training_record(EMBEDDED[name])
    if record is None:
        pytest.skip(f"{name} not trained in this install")
    summary = training_summary(record)
    assert summary["train_tokens_seen"] == record["train_tokens_seen"] > 0
    assert summary["train_seconds"] > 0 and summary["torch"] == record["torch"]
    if name == "course-tiny":
        assert summary["corpus_train_tokens"] == record["corpus"]["train_tokens"] and summary["teacher"] is None


def test_a_damaged_record_or_bad_arguments_fail_before_the_evaluation(tmp_path, monkeypatch):
    import shutil

    import course_lib.cli.evaluate as ev

    monkeypatch.setattr(ev, "load_model", lambda *a, **k: pytest.fail("loaded the model before the checks"))
    folder = tmp_path / "m"
    shutil.copytree(EMBEDDED["course-tiny"], folder)
    (folder / "training.json").write_text("{cut short")
    with pytest.raises(ValueError, match="training.json is not valid JSON"):
        evaluate_model(str(folder))
    for kw, name in ((dict(n_functions=0), "n_functions"), (dict(max_tokens=1), "max_tokens"),
                     (dict(n_functions=True), "n_functions"), (dict(progress="no"), "progress")):
        with pytest.raises(ValueError, match=name):
            evaluate_model("course-tiny", **kw)
    assert training_summary({}) == dict.fromkeys(training_summary({}), None)  # an empty record: all None

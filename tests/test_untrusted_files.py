"""Files a learner is handed are data, never code: every reader refuses a pickle that would run a payload.

A pickle names functions to call while it is read, so ``torch.load(..., weights_only=False)`` on a planted
file runs whatever it names. :func:`plant_pickle` writes such a file, whose payload writes a marker; each
reader must refuse it with a clear error and the marker must not appear. The distillation resume and the
student trainer's resume are tested beside their own tests (test_distillation.py, test_train.py).
"""

import re
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this calls ``exec``: it writes the marker file (the stand-in for an attacker's code)."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('payload ran')"

    def __reduce__(self):
        return (exec, (self.code,))


def plant_pickle(path: Path, marker: Path, state: dict | None = None) -> None:
    """Write ``state`` (default: a checkpoint-shaped dict) with a payload inside it to ``path``, as torch.save does."""
    state = dict(state or {"config": {}, "step": 1, "student": {}, "history": []})
    state["student"] = _Payload(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def test_the_planted_pickle_does_run_its_payload_when_loaded_unsafely(tmp_path):
    """The control: without weights_only the payload runs, so the tests that assert it does not are meaningful."""
    marker = tmp_path / "marker"
    plant_pickle(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.read_text() == "payload ran"


def test_load_model_refuses_a_pickled_bin_weights_file(tmp_path):
    from course_lib.models import EMBEDDED, load_model

    folder = tmp_path / "model"
    shutil.copytree(EMBEDDED["course-tiny"], folder)
    (folder / "model.safetensors").unlink()  # the old format: pytorch_model.bin, a pickle
    marker = tmp_path / "marker"
    plant_pickle(folder / "pytorch_model.bin", marker, {"model.embed_tokens.weight": None})
    with pytest.raises(ValueError, match=r"refused unread.*safetensors"):
        load_model(str(folder))
    assert not marker.exists()


UNSAFE = [
    (re.compile(r"weights_only\s*=\s*False"), "torch.load(..., weights_only=False)"),
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|shelve|marshal)\b", re.M), "a pickle module"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval / exec"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"yaml\.load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
]


def test_no_unsafe_loader_anywhere_in_the_library():
    """The library, its scripts and the GPU check: no loader that can run code from a file."""
    files = [*ROOT.glob("course_lib/**/*.py"), *ROOT.glob("scripts/*.py"), ROOT / "tests" / "gpu_check.py"]
    found = []
    for f in files:
        text = f.read_text()
        for pattern, what in UNSAFE:
            for m in pattern.finditer(text):
                line = text[: m.start()].count("\n") + 1
                # `import pickle` only to catch pickle.UnpicklingError is fine: it loads nothing
                if what == "a pickle module" and not re.search(r"pickle\.(loads?|Unpickler)\(", text):
                    continue
                found.append(f"{f.relative_to(ROOT)}:{line}: {what}")
    assert len(files) > 30 and not found, found

"""course_lib._files: folders written atomically, with the umask's modes, and no temporary folders left behind."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from course_lib import _files
from tests.conftest import assert_readable_by_others


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_apply_umask_opens_a_safetensors_file_to_what_the_umask_allows(shared_dir):
    f = shared_dir / "w.safetensors"
    save_file({"w": torch.zeros(3)}, str(f))
    assert stat.S_IMODE(f.stat().st_mode) == 0o600  # safetensors' own mode, whatever the umask: the bug
    _files.apply_umask(shared_dir)
    assert_readable_by_others(shared_dir)
    old = os.umask(0o077)  # a private umask stays private
    try:
        _files.apply_umask(f)
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert _files.current_umask() == 0o077
    finally:
        os.umask(old)


def test_stale_temp_folders_are_removed_and_live_writers_kept(tmp_path):
    target = tmp_path / "model"
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folders = {
            "dead writer": tmp_path / f".model.tmp-{host}.{_dead_pid()}.abcd1234",
            "live writer": tmp_path / f".model.tmp-{host}.{live.pid}.abcd1234",
            "other host, fresh": tmp_path / f".model.tmp-elsewhere.{_dead_pid()}.abcd1234",
            "other host, silent": tmp_path / ".model.tmp-elsewhere.1.abcd1234",
            "legacy, silent": tmp_path / ".model-abcd1234",
            "legacy, fresh": tmp_path / ".model-efgh5678",
            "another target": tmp_path / f".other.tmp-{host}.{_dead_pid()}.abcd1234",
            "the user's": tmp_path / ".model.tmp-notes",
        }
        for f in folders.values():
            f.mkdir()
            (f / "model.safetensors").write_bytes(b"x" * 10)
        hour_ago = time.time() - _files.STALE_AFTER_S - 60
        for key in ("other host, silent", "legacy, silent"):
            for p in (folders[key] / "model.safetensors", folders[key]):
                os.utime(p, (hour_ago, hour_ago))
        removed = _files.remove_stale_temp_folders(target, legacy_prefix=".model-")
    finally:
        live.kill()
        live.wait()
    gone = {"dead writer", "other host, silent", "legacy, silent"}
    assert sorted(removed) == sorted(folders[k] for k in gone)
    assert {k for k, f in folders.items() if f.exists()} == set(folders) - gone


def test_a_failed_write_leaves_nothing_and_the_target_untouched(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(OSError, match="No space"), _files.writing_folder(target) as tmp:
        (tmp / "config.json").write_text("new")
        raise OSError("No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "config.json").read_text() == "old"


def test_move_files_into_replaces_only_its_own_names_and_moves_the_marker_last(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "config.json").write_text("old")
    order = []
    real_replace = os.replace
    monkeypatch.setattr(_files.os, "replace", lambda a, b: (order.append(os.path.basename(b)), real_replace(a, b)))
    with _files.writing_folder(target) as tmp:
        for name in ("a_marker.json", "config.json", "z.safetensors"):
            (tmp / name).write_text("new")
        _files.move_files_into(tmp, target, last=("a_marker.json",))
    assert order[-1] == "a_marker.json" and len(order) == 3
    assert (target / "notes.txt").read_text() == "mine" and (target / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

"""Writing a folder of weights safely (a leaf module: it imports nothing from course_lib).

Every folder of weights the library writes follows three rules:

- **Atomic.** Files are written into a temporary folder beside the target, then renamed into place. A rename
  within one file system needs no space and cannot stop half-way, so a full disk, Ctrl-C or kill -9 during the
  writing never leaves a target that a later load would trust, nor spoils the good copy that was there.
- **As readable as the umask says.** safetensors creates its files 0600 whatever the umask, and ``mkdtemp``
  makes folders 0700: a class's shared cache would be unreadable by the class (and transformers reports an
  unreadable file as a missing one). :func:`apply_umask` gives files and folders the modes a plain ``open`` /
  ``mkdir`` would have.
- **No litter.** A temporary folder left by a killed process is removed by the next write to the same target:
  when its owner process (named in the folder's name) is gone, or when nothing was written into it for an hour
  (the owner may be on another machine sharing the folder). A live writer's folder is never touched, so two
  processes may write the same target at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

STALE_AFTER_S = 3600  # a writer silent for an hour is gone (a real-model conversion writes within minutes)
_TMP = ".tmp-"  # .<target>.tmp-<host>.<pid>.<random>


def current_umask() -> int:
    """The process's umask, read without changing it where the OS says it (Linux), else by setting it back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the mode a plain ``open``/``mkdir`` would give it.

    Call it on whatever a save wrote (safetensors makes its files 0600, whatever the umask), so that a shared
    cache or a class's model folder is readable by those the umask lets read it.
    """
    mask = current_umask()
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else ())]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _prefix(target: Path) -> str:
    return f".{target.name}{_TMP}{socket.gethostname()}.{os.getpid()}."


def _owner(name: str, target: Path) -> tuple[str, int] | None:
    """(host, pid) of a temporary folder of ``target`` made by :func:`writing_folder`, else None."""
    head = f".{target.name}{_TMP}"
    if not name.startswith(head):
        return None
    parts = name[len(head):].rsplit(".", 2)  # the host may hold dots; the pid and mkdtemp's suffix do not
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _last_write(folder: Path) -> float:
    times = [folder.lstat().st_mtime]
    with contextlib.suppress(OSError):
        times += [p.lstat().st_mtime for p in folder.iterdir()]
    return max(times)


def remove_stale_temp_folders(target: str | os.PathLike, legacy_prefix: str | None = None) -> list[Path]:
    """Remove the temporary folders of ``target`` whose writer is gone; returns what was removed.

    Gone: its process (same host) no longer exists, or nothing was written into it for :data:`STALE_AFTER_S`.
    ``legacy_prefix``: also age out folders named ``<legacy_prefix><8 characters>`` (an older naming, no owner).
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    host, now = socket.gethostname(), time.time()
    for p in target.parent.iterdir():
        owner = _owner(p.name, target)
        legacy = legacy_prefix is not None and p.name.startswith(legacy_prefix) \
            and len(p.name) == len(legacy_prefix) + 8
        if (owner is None and not legacy) or not p.is_dir() or p.is_symlink():
            continue
        try:
            gone = (owner is not None and owner[0] == host and not _alive(owner[1])) \
                or now - _last_write(p) > STALE_AFTER_S
        except OSError:  # removed by someone else meanwhile
            continue
        if gone:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def writing_folder(target: str | os.PathLike, legacy_prefix: str | None = None) -> Iterator[Path]:
    """A fresh temporary folder beside ``target`` to write into; removed if the block raises.

    Stale temporary folders of the same target are removed first (:func:`remove_stale_temp_folders`). Finish
    the block with :func:`replace_folder` or :func:`move_files_into`; whatever is left is removed at the end.
    """
    target = Path(target).absolute()  # "." has no name to put beside it
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(target, legacy_prefix)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was renamed into place


def replace_folder(tmp: Path, target: Path, replace_existing: bool = False) -> None:
    """Rename the finished folder ``tmp`` to ``target``, with the umask's modes.

    An existing ``target`` makes the rename fail (OSError) unless ``replace_existing``: then it is renamed aside
    first and deleted after, so ``target`` is never half old, half new. Only for folders the library owns whole.
    """
    apply_umask(tmp)
    if not (replace_existing and target.exists()):
        os.replace(tmp, target)  # onto a non-empty folder this fails: another writer finished first
        return
    aside = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))  # empty: a rename may replace it
    try:
        os.replace(target, aside)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def move_files_into(tmp: Path, target: Path, last: Iterable[str] = ()) -> None:
    """Move the files of the finished folder ``tmp`` into the existing folder ``target``, one rename each.

    Files of other names in ``target`` stay as they are. ``last`` names the files moved last (the one that
    marks the folder complete), so a reader never sees the marker before what it describes.
    """
    apply_umask(tmp)
    last = set(last)
    for p in sorted(tmp.iterdir(), key=lambda p: p.name in last):
        os.replace(p, target / p.name)
    tmp.rmdir()

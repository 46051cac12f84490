"""Small argument checks shared by the config dataclasses (a leaf module: it imports nothing from course_lib).

Each raises a ValueError that names the field, what is allowed and the value it got. Two slips are refused that a
plain ``v < 1`` or ``0 < v`` comparison lets through: ``bool`` (Python counts ``True`` as the int 1, so
``steps=True`` would train one step) and NaN (every comparison with NaN is False, so no range check fires).
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
import tempfile
from pathlib import Path


def check_number(name: str, value, allowed: str, ok) -> None:
    """ValueError naming the field, its allowed range and the bad value, unless ``value`` is a number with ``ok``.

    NaN is refused (it passes no range check silently: every comparison is False), and so is ``bool``, which
    Python counts as an int: ``temperature=True`` is a slip, not a 1.
    """
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value)
            or not ok(value)):
        raise ValueError(f"{name} must be a number {allowed}, got {value!r}")


def check_int(name: str, value, low: int, hint: str = "") -> None:
    """ValueError unless ``value`` is an int (not a bool, not a float like 2.0 or 2.5) and >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{hint}, got {value!r}")


def check_new_tokens(max_new_tokens) -> None:
    """ValueError unless ``max_new_tokens`` is an int >= 1 (every decode loop's token count; True is not one token)."""
    check_int("max_new_tokens", max_new_tokens, 1)


def check_flag(name: str, value) -> None:
    """ValueError unless ``value`` is a bool (or the int 0 or 1): ``quick="no"`` is truthy and would run quick."""
    if not (isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1))):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_output_path(path, flag: str) -> None:
    """ValueError naming ``flag`` unless ``path`` could be created: no folder above it is a file, and the
    nearest existing one is writable. Checked before a long run, so its results are not lost at the end."""
    path = Path(path).expanduser().absolute()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder, so nothing can be written "
                                 "under it; choose a path in a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {path}: the folder {parent} is not writable by this user; choose a "
                                 "path in a folder you can write to")
            return


def check_text(name: str, text: str) -> None:
    """ValueError if ``text`` holds a lone surrogate (e.g. ``"\\ud800"``): a str that is not text.

    Python strings may carry half of a UTF-16 pair (from a JSON escape cut in two, or bytes decoded with
    ``errors="surrogateescape"``); UTF-8 cannot encode it, and the tokenizer fails with a TypeError that names
    neither the argument nor the character.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name} holds {text[e.start]!r} at character {e.start}, a lone surrogate (half of a UTF-16 pair, "
            "e.g. from an emoji's JSON escape cut in two) that is not text and cannot be encoded: remove it, or "
            "clean the string with s.encode('utf-8', 'replace').decode('utf-8')"
        ) from None


def writable_dir(folder, variable: str | None = None) -> Path:
    """Create ``folder`` (and its parents) and check that files can be written in it; return it as a Path.

    A ValueError names the folder, why it is unusable (a file, read-only) and, when it came from an environment
    variable, that ``variable``: a raw PermissionError or FileExistsError names neither.
    """
    folder = Path(folder)
    where = f"{variable}={str(folder)!r}" if variable else str(folder)
    fix = f"set {variable} to a folder you can write" if variable else "choose a folder you can write"
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"{where} cannot be used as a folder: {blocker} is a file; {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"{where} is not writable ({e.strerror or e}); {fix}") from e
    return folder


def int_at_least(low: int, what: str = ""):
    """An argparse ``type``: an int >= ``low``; argparse names the flag in its error and exits before any work."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}{what}, got {text!r}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse

"""Small helpers every notebook calls first: quick mode and the version banner."""

from __future__ import annotations

import os

QUICK_ENV = "COURSE_QUICK"


def quick_mode() -> bool:
    """True when ``COURSE_QUICK`` is set to 1/true/yes: smaller runs so CI and Binder stay fast."""
    return os.environ.get(QUICK_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def pick(quick, full):
    """``quick`` in quick mode, ``full`` otherwise: ``steps = pick(20, 500)``."""
    return quick if quick_mode() else full


def banner() -> dict:
    """Print versions, device and threads (and return them): every notebook opens with this."""
    from .doctor import environment_report

    info = environment_report()
    info["quick_mode"] = quick_mode()
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:>{width}}: {v}")
    return info

"""Notebook helpers: quick mode, the version banner, outputs without noise, and Markdown tables."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from collections.abc import Iterator

import torch
import transformers
from transformers.utils import logging as hf_logging

from . import __version__
from .timing import busy_check

QUICK_ENV = "COURSE_QUICK"

# transformers' per-call bars: they flash by in milliseconds for the course's models and fill a notebook's
# output with "Loading weights: 100%|...". Hub downloads (huggingface_hub's own bars) stay visible.
SILENT_BARS = frozenset({"Loading weights", "Writing model shards"})

# The profiler's C++ side (kineto) prints "USDT: ... profiler_start / profiler_stop" lines to stderr at every
# profile() call. With a CPU-only torch it has nothing else to say (CPU events come from torch itself), so its
# log is off unless the learner set KINETO_LOG_LEVEL. It is read once, when the profiler first starts; a CUDA
# build keeps kineto's log, where its errors (e.g. no permission to read GPU counters) matter.
if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above kineto's highest level (5, USDT): nothing


def _silence_weight_bars():
    """Install the hook that drops the SILENT_BARS; return the hook it replaced (``None`` on old transformers)."""
    if not hasattr(hf_logging, "set_tqdm_hook"):  # older transformers: nothing to hook, its bars stay
        return None
    previous = hf_logging.set_tqdm_hook(None)
    if getattr(previous, "course_lib_silent", False):  # already silenced (nested, or after banner())
        hf_logging.set_tqdm_hook(previous)
        return previous

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in SILENT_BARS:
            return hf_logging.EmptyTqdm(*args, **kwargs)
        return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

    hook.course_lib_silent = True
    hf_logging.set_tqdm_hook(hook)
    return previous


@contextlib.contextmanager
def quiet_weight_bars() -> Iterator[None]:
    """Within the block, transformers shows no "Loading weights" / "Writing model shards" bars."""
    previous = _silence_weight_bars()
    try:
        yield
    finally:
        if hasattr(hf_logging, "set_tqdm_hook"):
            hf_logging.set_tqdm_hook(previous)


def hide_weight_bars() -> None:
    """For the rest of the session, no "Loading weights" / "Writing model shards" bars (``banner()`` calls this)."""
    _silence_weight_bars()


def quick_mode() -> bool:
    """True when ``COURSE_QUICK`` is set to 1/true/yes: smaller runs so CI and Binder stay fast."""
    return os.environ.get(QUICK_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def pick(quick, full):
    """``quick`` in quick mode, ``full`` otherwise: ``steps = pick(20, 500)``."""
    return quick if quick_mode() else full


def environment_report() -> dict:
    """Versions, device and threads: what every notebook prints first (and ``python -m course_lib doctor``)."""
    info = {
        "course_lib": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:  # read from its install, not by importing it: Torch-Pruning is optional and slow to import
        info["torch_pruning"] = importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:
        info["torch_pruning"] = None
    return info


def banner() -> dict:
    """Print versions, device and threads (and return them): every notebook opens with this.

    It measures how busy the machine is (:func:`course_lib.timing.busy_check`) and, when other work stalls
    torch's threads, prints a warning that says what to do: every timing in the course would measure the load.
    It also hides transformers' weight-loading and -saving bars for the session (``hide_weight_bars``), so a
    notebook's own ``save_pretrained`` / ``from_pretrained`` cells print what they measured and nothing else.
    """
    hide_weight_bars()

    info = environment_report()
    info["quick_mode"] = quick_mode()
    check = busy_check()
    info["machine_load"] = "busy: see the warning below" if check.busy else str(check)
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:>{width}}: {v}")
    if check.busy:
        print(f"\n{check}")
    return info


def markdown_table(rows: list[dict]) -> str:
    """One Markdown table over the union of the rows' keys (in first-seen order); floats to 4 significant digits."""
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)

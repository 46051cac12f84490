"""The course's one device, chosen once per process.

Every notebook and bench puts its models and inputs on ``course_device()``:
the ``COURSE_DEVICE`` environment variable (``auto``, ``cpu``, ``cuda``,
``cuda:N`` or ``mps``), where ``auto`` (the default) picks CUDA, then Apple's
MPS, then the CPU. It is read once, so a notebook that is half on the GPU and
half on the CPU cannot happen by changing the variable mid-session.

This module depends on torch only: timing, models and everything above may
import it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import itertools
import os
import shutil
import sys
import types
from collections.abc import Callable

import torch

ALLOWED = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def pick_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Validate a device name; ``auto`` (or None) is CUDA > MPS > CPU. Raises ValueError for one that is not here."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec.strip().lower() if isinstance(spec, str) else spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {spec!r}; use {ALLOWED}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but this machine has no CUDA GPU; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ValueError(f"device {spec!r} asked for, but this machine has {n} CUDA GPU(s): "
                             f"use cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("device 'mps' asked for, but MPS is not available here; use 'cpu' or 'auto'")
    elif dev.type != "cpu":
        raise ValueError(f"device type {dev.type!r} not supported; use {ALLOWED}")
    return dev


@functools.cache
def course_device() -> torch.device:
    """The device of the whole course: ``COURSE_DEVICE`` (default ``auto``: CUDA > MPS > CPU), read once."""
    spec = os.environ.get("COURSE_DEVICE", "auto")
    try:
        return pick_device(spec)
    except ValueError as e:
        raise ValueError(f"COURSE_DEVICE={spec!r}: {e}") from None


def device_of(model: torch.nn.Module) -> torch.device:
    """Where a model's first parameter (or buffer) lives; CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def release_memory() -> None:
    """Hand freed memory back to the system: Python's garbage, the CUDA cache, and glibc's malloc arenas.

    After a big job (many models built and freed) glibc keeps the freed blocks for reuse, so the process stays
    as large as at its peak (docs/binder.md, "Memory and time budget", has a measurement). A notebook's next
    cell (and Binder's 2 GB limit) then sees only what is really in use.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    if name:
        try:
            trim = ctypes.CDLL(name).malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
            return
        trim(0)


def compile_supported(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Can ``torch.compile`` (inductor) build kernels here? (ok, reason when not)."""
    dev = torch.device(device)
    if sys.platform == "win32":
        return False, "torch.compile's inductor backend is not supported on Windows"
    if dev.type == "cpu" and not (shutil.which("gcc") or shutil.which("g++") or shutil.which("clang")):
        return False, "torch.compile on CPU needs a C++ compiler (gcc or clang) on PATH"
    if dev.type == "mps":
        return False, "torch.compile's inductor backend for MPS is experimental; skipped"
    return True, ""


_OWN_CODES = itertools.count()


def own_code(fn: Callable) -> Callable:
    """``fn`` (a function or a bound method) with a code object of its own, for ``torch.compile``.

    Dynamo keeps at most ``recompile_limit`` (8) graphs per code object and, with ``fullgraph=True``, fails beyond.
    Every decoder compiles the same two methods and every streaming kernel the same function, so a process that
    builds many of them (a test suite, the engines bench) would share one budget of 8 between all of them.
    """
    bound = getattr(fn, "__self__", None) if isinstance(fn, types.MethodType) else None
    func = fn.__func__ if bound is not None else fn
    code = func.__code__.replace(co_name=f"{func.__name__}_{next(_OWN_CODES)}")
    own = types.FunctionType(code, func.__globals__, code.co_name, func.__defaults__, func.__closure__)
    own.__kwdefaults__ = func.__kwdefaults__
    return types.MethodType(own, bound) if bound is not None else own

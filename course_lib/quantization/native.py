"""Native decode kernels: the matrix-vector products of ``csrc/`` and decode attention, built here at first use.

The compiled reductions of :mod:`.streaming` leave the loop to inductor, which reads one weight row after
another with nothing asked for ahead: a core then waits on memory and streams a weight matrix at about half
the bandwidth it can. ``csrc/gemv.cpp`` is the same product written by hand: blocks of four rows, the block
two ahead prefetched, int8 and int4 unpacked in registers (AVX-512; W4A8's int4 x int8 through the integer
dot-product instructions, AVX512-VNNI). It is built once per machine with ``torch.utils.cpp_extension``
(``-march=native``; about 30 seconds, kept in torch's extensions folder) and registered as
``torch.ops.course_lib.gemv_float / gemv_int8 / gemv_int4 / gemv_int4_a8``, so a compiled decode step calls it
from its graph. ``csrc/attention.cpp`` (``decode_attention``) is built with it: a decode step's attention over the
static cache, which is two matrix-vector products over the filled slots (:mod:`course_lib.scratch_llama` calls it).

Where it cannot be built (no AVX-512, no C++ compiler, no ``ninja``, Windows) :func:`available` says why, and
the streaming kernels fall back to the compiled reductions; ``COURSE_NATIVE_KERNELS=0`` turns it off. Either
way they are candidates of the measured kernel choice, never assumed faster.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
from pathlib import Path

import torch

from ..device import compile_supported

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "gemv.cpp", CSRC / "attention.cpp")  # compiled; CSRC's headers are included by them
ENV = "COURSE_NATIVE_KERNELS"  # "0" turns the native kernels off
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # -fopenmp: at::parallel_for runs on torch's OpenMP threads
ROWS = 2  # the kernels take one or two rows of activations (a decode step, a pair of sequences) ...
BF16_ROWS = 16  # ... but bf16 x bf16 takes up to 16 (a speculative verification pass), on AMX where the CPU has it


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_VNNI = "avx512_vnni" in _cpu_flags()
_STATE: list[tuple[bool, str]] = []  # the one answer of available(), once known


def built() -> bool:
    """Are the kernels loaded? Never builds: what a compiled graph asks (dynamo reads the answer as a constant)."""
    return bool(_STATE) and _STATE[0][0]


def available() -> tuple[bool, str]:
    """(True, "") once the kernels are built and loaded here, else (False, why not). Builds on the first call."""
    if not _STATE:
        _STATE.append(_load())
    return _STATE[0]


def ready() -> bool:
    """May a caller run the kernels now? Inside a compiled graph only if already loaded (:func:`built`: dynamo reads
    it as a constant, and a build must not start while tracing); elsewhere :func:`available`, which builds once."""
    return built() if torch.compiler.is_compiling() else available()[0]


def _load() -> tuple[bool, str]:
    if os.environ.get(ENV, "").strip() == "0":
        return False, f"turned off ({ENV}=0)"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"built for x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    flags = _cpu_flags()
    if "avx512f" not in flags or "avx512bw" not in flags:
        return False, "needs a CPU with AVX-512 (avx512f, avx512bw)"
    ok, why = compile_supported("cpu")
    if not ok:
        return False, why
    if importlib.util.find_spec("ninja") is None:
        return False, "building them needs ninja (pip install ninja)"
    try:
        _build(flags)
    except Exception as e:  # a failed build leaves the course working on the compiled reductions
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first = next((ln for ln in lines if "error:" in ln), lines[-1])[:200]  # the compiler's first error
        log.warning("native decode kernels not built (%s); the compiled reductions stand in", first)
        return False, f"build failed: {first}"
    return True, ""


def _build(cpu_flags: set[str]) -> None:
    from torch.utils.cpp_extension import load  # imports setuptools: only when a build is wanted

    # a changed source, torch or CPU builds anew (-march=native: a build for one CPU may not run on another that
    # shares the extensions folder)
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h"))
                         + " ".join([*FLAGS, torch.__version__, *sorted(cpu_flags)]).encode())
    name = f"course_lib_gemv_{key.hexdigest()[:12]}"
    log.info("building the native decode kernels (%s, once per machine: about 30 s)", name)
    load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
         is_python_module=False, verbose=False)
    _register_fakes()


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing: each kernel returns (rows, N) float32."""
    def out(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], n), dtype=torch.float32)

    torch.library.register_fake("course_lib::gemv_float")(lambda x, w: out(x, w.shape[0]))
    torch.library.register_fake("course_lib::gemv_int8")(lambda x, q, scales: out(x, q.shape[0]))
    torch.library.register_fake("course_lib::gemv_int4")(
        lambda x, packed, scales_and_zeros, group_size: out(x, packed.shape[0]))
    torch.library.register_fake("course_lib::gemv_int4_a8")(lambda x, packed, scales_and_zeros: out(x, packed.shape[0]))
    torch.library.register_fake("course_lib::decode_attention")(lambda q, k, v, slot, scale: q.new_empty(q.shape))


def max_rows(kind: str, x: torch.Tensor, w: torch.Tensor) -> int:
    """How many rows of ``x`` the native kernel ``kind`` takes with these operands: :data:`BF16_ROWS` for bf16
    activations times bf16 weights (K a multiple of 32), :data:`ROWS` otherwise."""
    if kind == "float" and x.dtype == w.dtype == torch.bfloat16 and x.shape[-1] % 32 == 0:
        return BF16_ROWS
    return ROWS


def gemv_float(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(R, K) x (N, K) float32 / bfloat16 / float16 weights -> (R, N) float32; R up to :func:`max_rows`.

    bf16 x bf16 runs on AMX tiles where the CPU has them (and the output rows come in multiples of 16), else on
    the bf16 dot-product instruction; either way a row's result does not depend on how many rows came with it."""
    return torch.ops.course_lib.gemv_float(x, w)


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(R, K) x (N, K) int8 with one scale per output channel -> (R, N) float32."""
    return torch.ops.course_lib.gemv_int8(x, q, scales)


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(R, K) x int4 weights in :func:`.streaming.pack_int4_halves` layout -> (R, N) float32.

    ``scales_and_zeros`` is (K/g, N, 2) as the layer stores it; the kernel reads it through its strides, so the
    layer keeps it with each output channel's groups side by side (:func:`rows_major`).
    """
    return torch.ops.course_lib.gemv_int4(x, packed, scales_and_zeros, group_size)


def gemv_int4_a8(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """W4A8: int4 weights in groups of 32 (halves layout, rows-major scales) times x rounded to int8 per group of 32
    (:func:`.primitives.round_activation_groups`), integer dot products (AVX512-VNNI) -> (R, N) float32."""
    return torch.ops.course_lib.gemv_int4_a8(x, packed, scales_and_zeros)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """New tokens' attention over a static cache: q (B, H, T, D), the tokens at slots ``slot .. slot + T - 1``,
    query t against the slots ``0 .. slot + t`` of k and v (B, H_kv, L, D), query head h reading key/value head
    h // (H / H_kv) -> (B, H, T, D) in q's dtype. T is 1 at a decode step, a few in a speculative verification
    pass (each query computed as at T = 1). ``slot`` is a 0-d tensor (one graph serves every step); the empty
    slots are never read."""
    return torch.ops.course_lib.decode_attention(q, k, v, slot, scale)


def vnni() -> bool:
    """Does this CPU have the integer dot-product instructions the W4A8 kernel needs (AVX512-VNNI)? (read once,
    at import: a compiled graph asks too)"""
    return _VNNI


def rows_major(sz: torch.Tensor) -> torch.Tensor:
    """The same (K/g, N, 2) values, laid out so one output channel's scales and zeros are contiguous."""
    return sz.transpose(0, 1).contiguous().transpose(0, 1)


KERNELS = {"float": gemv_float, "int8": gemv_int8, "int4": gemv_int4, "int4_a8": gemv_int4_a8}

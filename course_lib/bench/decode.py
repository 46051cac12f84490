"""Benchmark suite ``decode``: the same greedy generation four ways, and the roofline's prediction.

Rows: ``no-cache``, ``kv-cache`` (from scratch), ``hf-generate`` and
``compiled-static-cache`` on a speed-lab model in float32 (the KV-cache
goal: >= 5x the no-cache tokens/s at 256 new tokens), then ``kv-cache`` and
``hf-generate`` at bf16 next to the roofline's predicted tokens/s (goal:
within 25 %). Machine figures: STREAM bandwidth and matmul GFLOP/s.

For every method, ``prefill_ms`` is the time to produce the first token and
``decode_tok_s`` = (N - 1) / (time for N tokens - time for 1 token).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .._checks import check_flag
from ..decode_speed import overhead_model
from ..generation import CompiledDecoder, compile_supported, generate_hf, generate_kv_cache, generate_no_cache
from ..machine import measure_machine
from ..models import resolve_device, speed_lab_model
from ..quantization import preset, quantize_
from ..roofline import decode_cost, predict
from ..scratch_llama import ScratchLlama
from ..timing import time_tokens

log = logging.getLogger(__name__)

DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _decode_overhead(method: str, cfg, dtype: torch.dtype, device: torch.device, prompt_len: int) -> float:
    """Per-token decode time of ``method`` on a same-depth, near-zero-width model: the fixed cost per step."""
    thin = overhead_model(cfg, dtype, device)
    gen = _generator(method, thin)
    prompt = torch.randint(0, thin.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    _, tok_s = time_tokens(gen, prompt.to(device), 32, device, repeat=3, warmup=1)
    return 1.0 / tok_s


def _generator(method: str, model) -> Callable[[torch.Tensor, int], torch.Tensor]:
    if method == "no-cache":
        scratch = ScratchLlama(model)
        return lambda p, n: generate_no_cache(scratch, p, n)
    if method == "kv-cache":
        scratch = ScratchLlama(model)
        return lambda p, n: generate_kv_cache(scratch, p, n)
    if method == "hf-generate":
        return lambda p, n: generate_hf(model, p, n)
    raise ValueError(f"unknown method {method!r}")


def run(quick: bool = False, device: str = "auto") -> dict:
    """Run the suite; quick mode uses a 4-layer cut of the model and fewer repeats (< 5 min on 2 cores)."""
    check_flag("quick", quick)  # before minutes of loading and timing
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    name = "smollm2-135m"
    small = quick and not gpu
    layers = 2 if small else None
    model_label = f"{name}" + (f" ({layers} layers)" if layers else "")
    # The goal is stated at 256 new tokens; --quick on a CPU uses 128 so it stays under 5 minutes.
    new_tokens, prompt_len, repeat = (128 if small else 256), (32 if small else 64), (1 if quick else 3)
    t0 = time.perf_counter()

    hw = measure_machine(dev, quick=quick)
    machine = {"bandwidth_gbs": round(hw.bandwidth_gbs, 2),
               "matmul_gflops_fp32": round(hw.matmul_gflops.get("fp32", float("nan")), 2),
               "matmul_gflops_bf16": round(hw.matmul_gflops.get("bf16", float("nan")), 2),
               "gemv_gbs_fp32": round(hw.gemv_gbs.get("fp32", float("nan")), 2),
               "gemv_gbs_bf16": round(hw.gemv_gbs.get("bf16", float("nan")), 2),
               "decode_device": str(dev)}
    rows: list[dict] = []

    # Part 1: the cache goal, float32 on CPU (bf16 on a GPU), 256 new tokens.
    dtype = torch.bfloat16 if gpu else torch.float32
    model, cfg = speed_lab_model(name, dtype=dtype, device=dev, num_layers=layers)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
    methods = ["no-cache", "kv-cache", "hf-generate", "compiled-static-cache"]
    for method in tqdm(methods, desc="decode suite", leave=False):
        row = {"suite": "decode", "method": method, "model": model_label, "dtype": DTYPE_NAME[dtype],
               "new_tokens": new_tokens, "decode_tok_s": None, "prefill_ms": None, "predicted_decode_tok_s": None}
        if method == "compiled-static-cache":
            ok, why = compile_supported(dev)
            if not ok:
                row["note"] = f"cannot run: {why}"
            elif quick and not gpu:
                row["note"] = "skipped in --quick: compiling takes minutes on a CPU; run without --quick"
            else:
                decoder = CompiledDecoder(model)
                t = time.perf_counter()
                decoder(prompt, 4, max_len=prompt_len + new_tokens)  # compile once for this cache size
                compile_s = time.perf_counter() - t
                first, tok_s = time_tokens(lambda p, n, d=decoder: d(p, n, max_len=prompt_len + new_tokens),
                                           prompt, new_tokens, dev, repeat, warmup=1)
                row.update(decode_tok_s=tok_s, prefill_ms=first * 1e3, note=f"compile took {compile_s:.0f} s")
            rows.append(row)
            continue
        first, tok_s = time_tokens(_generator(method, model), prompt, new_tokens, dev, repeat, warmup=1)
        row.update(decode_tok_s=tok_s, prefill_ms=first * 1e3)
        rows.append(row)
    base = rows[0]["decode_tok_s"]
    for r in rows:
        if r["decode_tok_s"]:
            r["speedup_vs_no_cache"] = r["decode_tok_s"] / base
    del model

    # Part 2: roofline prediction vs measurement at bf16 (the whole model, full depth).
    pred_layers = 4 if small else None
    n_pred = 16 if quick else 64
    model, cfg = speed_lab_model(name, dtype=torch.bfloat16, device=dev, num_layers=pred_layers)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
    overheads, kernels = {}, ""
    for method in ("kv-cache", "hf-generate", "hf-generate int8-wo"):
        weight_bits, label = 16, "bf16"
        if method == "hf-generate int8-wo":
            # The quantization chapter's packed int8 layers (head included), bf16 activations, timed through
            # Hugging Face's decode loop (the scratch loops run them too; this row checks the roofline).
            kernels = quantize_(model, preset("int8-wo")).summary()  # which kernel each layer got, for the row
            weight_bits, label = 8, "int8-wo (bf16 act.)"
            overhead = overheads["hf-generate"]  # same loop and depth; the overhead model has no weights to speak of
        else:
            overhead = overheads[method] = _decode_overhead(method, cfg, torch.bfloat16, dev, prompt_len)
        first, tok_s = time_tokens(_generator(method.split()[0], model), prompt, n_pred, dev, repeat, warmup=1)
        cost = decode_cost(cfg, batch=1, context=prompt_len + n_pred // 2, weight_bits=weight_bits, kv_bits=16)
        p = predict(cost, hw, "bf16", overhead_s=overhead)
        rows.append({"suite": "decode", "method": f"{method} (roofline check)",
                     "model": name + (f" ({pred_layers} layers)" if pred_layers else ""), "dtype": label,
                     "new_tokens": n_pred, "decode_tok_s": tok_s, "prefill_ms": first * 1e3,
                     "predicted_decode_tok_s": p.tokens_per_s, "prediction_error": p.tokens_per_s / tok_s - 1,
                     "bound": p.bound, "overhead_ms": overhead * 1e3,
                     **({"note": kernels} if weight_bits == 8 else {})})
    log.info("decode suite took %.0f s", time.perf_counter() - t0)
    return {"machine": machine, "rows": rows}

"""Benchmark suite ``quant``: every weight format side by side, speed and quality.

Speed rows run on a speed-lab model big enough that reading the weights
dominates a decode step (the Qwen2.5-0.5B shapes; ``--quick`` keeps fewer
layers of the same shapes). Quality (held-out perplexity) is measured on
``course-tiny``, whose weights were trained and so mean something, and on the
real chat model SmolLM2-135M-Instruct (its rows come from :mod:`.quant_real`:
prose and code perplexity, answer agreement, int4 with group 32).
Each row: decode tokens/s at batch 1, prefill time, bytes of weights,
achieved bandwidth (bytes x tokens/s) and its fraction of the machine's
measured copy bandwidth. Speed is timed interleaved (see ``_speed_all``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .._checks import check_flag
from ..data import calibration_batches, encode_split
from ..decode_speed import decode_speed
from ..device import course_device
from ..machine import measure_bandwidth
from ..metrics import perplexity, stored_weight_bytes
from ..models import count_parameters, load_model, load_tokenizer, speed_lab_model
from ..quantization import preset, quantize_
from ..timing import error_text
from . import quant_real

log = logging.getLogger(__name__)

SPEED_MODEL = "qwen2.5-0.5b"
METHODS = ("fp32", "bf16", "int8-wo", "int4-wo", "gptq-int4", "torch-dynamic-int8", "torchao-int8-wo")
# rows in course_lib's formats -> their preset (course_lib.quantization.PRESETS); group 128: the speed model's widths
# all take it
PRESET_OF = {"int8-wo": "int8-wo", "int4-wo": "int4-wo-g128", "gptq-int4": "gptq-int4-g128"}


def _torchao_int8(model: torch.nn.Module) -> torch.nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization import quantize_ as ao_quantize_

    ao_quantize_(model, Int8WeightOnlyConfig())
    return model


def _torch_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    # Dynamic quantization also quantizes activations per call (fbgemm, fp32 in/out).
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _prepare(method: str, model: torch.nn.Module, calibration: torch.Tensor | None) -> torch.nn.Module:
    """The model in ``method``'s format (``model`` is a float32 model, changed in place)."""
    if method == "fp32":
        return model
    if method == "torch-dynamic-int8":
        return _torch_dynamic_int8(model)
    if method in ("bf16", "torchao-int8-wo"):
        model = model.to(torch.bfloat16)
        return model if method == "bf16" else _torchao_int8(model)
    # Our packed layers cast their input to the compute dtype measured fastest for the kernel and back; the rest of
    # the model (norms, attention) stays fp32. A name that is no row of this suite is taken as a preset's name.
    cfg = preset(PRESET_OF.get(method, method))
    quantize_(model, cfg, calibration=calibration if cfg.needs_calibration else None)
    return model


def _speed_all(methods: list[str], make: Callable[[], torch.nn.Module], quick: bool,
               bandwidth: float) -> dict[str, dict]:
    """Every format built first, then timed interleaved with :func:`course_lib.decode_speed.decode_speed`.

    Interleaving keeps the ratios between formats honest when the machine drifts during the run. The price is
    memory: every format is resident at once (about 3.5 GB in quick mode, 6 GB in full).
    """
    calibration = torch.randint(0, 1000, (2 if quick else 8, 64), generator=torch.Generator().manual_seed(0))
    models, out = {}, {}
    for method in tqdm(methods, desc="quant: build", leave=False):
        try:
            models[method] = _prepare(method, make(), calibration if method == "gptq-int4" else None)
            out[method] = {"bytes": stored_weight_bytes(models[method])}
        except Exception as e:  # a method that cannot run here gets a row that says why
            log.warning("%s failed: %s", method, e)
            out[method] = {"error": error_text(e)}
        gc.collect()
    new_tokens, rounds = (16, 3) if quick else (32, 5)
    prompt = torch.randint(0, 1000, (128,), generator=torch.Generator().manual_seed(1))
    errors: dict[str, str] = {}
    speed = decode_speed(models, prompt, new_tokens=new_tokens, rounds=rounds, errors=errors)
    for method, message in errors.items():  # one format failing must not cost the others' rows
        log.warning("%s failed while timing: %s", method, message)
        out[method] = {"error": message}
    for method, (tok_s, prefill_ms) in speed.items():
        bw = out[method]["bytes"] * tok_s / 1e9
        out[method].update(decode_tok_s=tok_s, prefill_ms=prefill_ms, bandwidth_gbs=bw,
                           roofline_frac=bw / bandwidth, timing_rounds=rounds)
    return out


def _quality(method: str, quick: bool, calibration: torch.Tensor, ids: torch.Tensor) -> float:
    model, _ = load_model("course-tiny")
    model = _prepare(method, model, calibration)
    with torch.inference_mode():
        return perplexity(model, ids, max_tokens=None)


def run(quick: bool = False) -> dict:
    """All methods: speed on the Qwen2.5-0.5B shapes, perplexity on course-tiny."""
    check_flag("quick", quick)  # before minutes of loading and timing

    torch.manual_seed(0)
    bandwidth = measure_bandwidth(size_mb=128 if quick else 256, device=course_device())  # where the models run
    layers = 12 if quick else None  # 12 of 24 layers: same per-layer shapes, still > 0.3B parameters
    make = lambda: speed_lab_model(SPEED_MODEL, num_layers=layers)[0]  # noqa: E731
    n_params = count_parameters(speed_lab_model(SPEED_MODEL, num_layers=layers, device="meta")[0])
    tok = load_tokenizer("course-tiny")
    calibration = calibration_batches(tok, n=8 if quick else 32, seq_len=128)
    heldout = encode_split(tok, "heldout", max_chars=(8192 if quick else 65536) * 8)[: 8192 if quick else 65536]
    model_name = f"{SPEED_MODEL}" + (f" ({layers} layers)" if layers else "")
    # GPTQ changes which integers are stored, not the format: same packed int4 layers and kernel as int4-wo. On
    # random speed-lab weights its column loop costs minutes, so quick mode reuses the int4-wo timing and says so;
    # the full run quantizes the speed model with GPTQ for real.
    timed = [m for m in METHODS if not (quick and m == "gptq-int4")]
    speed = _speed_all(timed, make, quick, bandwidth)
    if quick:
        if "error" in speed["int4-wo"]:
            speed["gptq-int4"] = {"speed_from": "int4-wo, which failed (see its row); quick mode times it once"}
        else:
            speed["gptq-int4"] = {**speed["int4-wo"], "speed_from": "int4-wo (identical packed layers; quick mode)"}
    rows = []
    for method in METHODS:
        row = {"suite": "quant", "method": method, "model": model_name, "params": n_params, **speed[method]}
        if "error" not in row:
            try:
                row["ppl"] = _quality(method, quick, calibration, heldout)
            except Exception as e:
                log.warning("%s quality failed: %s", method, e)
                row["error"] = error_text(e)
        log.info("%s", row)
        rows.append(row)
        gc.collect()
    base = {r["method"]: r for r in rows}
    for r in rows:
        for ref in ("fp32", "bf16"):
            if "decode_tok_s" in r and "decode_tok_s" in base.get(ref, {}):
                r[f"speedup_vs_{ref}"] = r["decode_tok_s"] / base[ref]["decode_tok_s"]
        if "ppl" in r and "ppl" in base.get("fp32", {}):
            r["ppl_vs_fp32"] = r["ppl"] / base["fp32"]["ppl"] - 1
    machine = {"bandwidth_gbs": bandwidth, "speed_model": model_name, "quality_model": "course-tiny",
               "heldout_tokens": int(heldout.numel())}
    real = quant_real.run(quick)  # the same formats judged on the real model (quality and answers, no speed)
    return {"machine": {**machine, **real["machine"]}, "rows": rows + real["rows"]}

"""``quantize_(model, cfg)``: replace a model's Linear layers with packed ones, in place, by the method ``cfg`` names.

It handles ``nn.Linear`` and GPT-2's ``Conv1D`` (a Linear with its weight stored transposed), leaves in float what
``cfg.skip`` names or what the int4 group size does not divide (and says so, loudly when that is most layers),
hands the rest to the registered method (:mod:`.registry`), and quantizes the output head (and a tied input
embedding) to int8 rows. Afterwards :func:`~course_lib.quantization.save.save_quantized` stores the model and
``course_lib.load_model(folder)`` rebuilds it.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import kernel_choice
from .config import INT4_GROUP_SIZES, QuantConfig, QuantReport
from .kernels import INT8PACK, KERNEL_REQUESTS
from .layers import Int8Embedding, Int8WeightOnlyLinear, is_quantized, set_module
from .primitives import quantize
from .registry import method_for
from .streaming import streams_from_memory

log = logging.getLogger(__name__)


def quantize_(model: nn.Module, cfg: QuantConfig, calibration: torch.Tensor | None = None) -> QuantReport:
    """Replace the model's ``nn.Linear`` (and GPT-2 ``Conv1D``) layers with packed int8/int4 layers, in place.

    The output head (``lm_head``) and input embedding follow ``cfg.embeddings`` and ``cfg.skip``.
    ``calibration``: (batch, seq) token ids, needed by ``method="gptq"`` / ``"awq"`` and ``smooth``
    (``course_lib.data.calibration_batches(tokenizer)``). Afterwards ``save_quantized(model, folder)``
    stores the packed layers and ``course_lib.load_model(folder)`` rebuilds them.
    """
    if not isinstance(cfg, QuantConfig):
        raise ValueError(f"cfg must be a QuantConfig, got {type(cfg).__name__}")
    if is_quantized(model):
        raise ValueError("this model is already quantized; quantize a fresh float copy instead "
                         "(quantizing twice would round already-rounded weights)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head}
    if not linears and head is None:
        raise ValueError("the model has no nn.Linear layers to quantize (quantize_ handles nn.Linear and "
                         "transformers' Conv1D only)")
    method = method_for(cfg)
    if method.needs_calibration and calibration is None:
        what = f"method={cfg.method!r}" if method.option is None else f"{method.option}={getattr(cfg, method.option)!r}"
        raise ValueError(f"{what} needs calibration token ids: "
                         "quantize_(model, cfg, calibration=course_lib.data.calibration_batches(tokenizer))")
    report = QuantReport({}, {})
    todo: dict[str, nn.Linear] = {}
    for name, lin in linears.items():
        reason = _cannot_take(name, lin, cfg)
        if reason:
            report.skipped[name] = reason
            log.info("left %s in float: %s", name, reason)
        else:
            todo[name] = lin
    if not todo and linears:
        reasons = sorted(set(report.skipped.values()))
        raise ValueError(f"no Linear layer can take {cfg.name}: all {len(linears)} projections would stay in float "
                         f"({'; '.join(reasons[:3])}){_fitting_group_hint(linears.values(), cfg)}")
    _warn_if_mostly_float(linears, report, cfg)
    for name, lin in todo.items():
        if isinstance(lin, Conv1D):  # same numbers, Linear layout: RTN and GPTQ then treat it like any Linear
            todo[name] = _conv1d_as_linear(lin)
            set_module(model, name, todo[name])
    # a model bigger than the last-level cache is read from memory by every decode step: its kernels are timed so
    with kernel_choice.timed_cold(streams_from_memory(model)):
        method.quantize_model(model, todo, cfg, calibration, report)
        _quantize_embeddings(model, head, emb, cfg, report)
    model.course_quant_config = cfg  # what save_quantized records
    log.info("quantize_ %s: %s", cfg.name, report.summary())
    return report


def _conv1d_as_linear(conv: Conv1D) -> nn.Linear:
    """GPT-2's Conv1D is a Linear that stores its weight transposed (in, out): the same layer as ``nn.Linear``."""
    lin = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    return lin


def _in_features(m: nn.Module) -> int:
    return m.nx if isinstance(m, Conv1D) else m.in_features


def _skip_pattern(name: str, cfg: QuantConfig) -> str | None:
    return next((p for p in cfg.skip if re.search(p, name)), None)


def _cannot_take(name: str, lin: nn.Module, cfg: QuantConfig) -> str | None:
    """Why this layer stays in float, or None."""
    pattern = _skip_pattern(name, cfg)
    if pattern is not None:
        return f"matches skip pattern {pattern!r}"
    if cfg.bits == 4 and _in_features(lin) % cfg.group_size:
        return f"in_features={_in_features(lin)} is not a multiple of group_size={cfg.group_size}"
    return None


def _fitting_group_hint(layers, cfg: QuantConfig) -> str:
    """For int4: the group sizes that divide every layer's in_features (SmolLM2's 576 takes 32 and 64, not 128)."""
    if cfg.bits != 4:
        return ""
    widths = sorted({_in_features(m) for m in layers})
    fits = [g for g in INT4_GROUP_SIZES if all(w % g == 0 for w in widths)]
    if fits:
        return f"; in_features {widths} all take group_size in {fits}, e.g. QuantConfig(bits=4, group_size={fits[-1]})"
    return f"; no int4 group size in {INT4_GROUP_SIZES} divides every in_features {widths}"


def _warn_if_mostly_float(linears: dict[str, nn.Module], report: QuantReport, cfg: QuantConfig) -> None:
    """Say so loudly when the group size, not the user's skip list, leaves most projections in float."""
    by_group = [n for n, r in report.skipped.items() if "group_size" in r]
    if 2 * len(by_group) > len(linears):
        msg = (f"{cfg.name} leaves {len(by_group)} of {len(linears)} projections in float because group_size="
               f"{cfg.group_size} does not divide their in_features{_fitting_group_hint(linears.values(), cfg)}; "
               "quality and size numbers from this run are mostly the float model's")
        report.warnings.append(msg)
        log.warning(msg)


def _quantize_embeddings(model: nn.Module, head: nn.Module | None, emb: nn.Module | None,
                         cfg: QuantConfig, report: QuantReport) -> None:
    """lm_head (and the input embedding) to int8 rows, or left alone, per ``cfg.embeddings`` and ``cfg.skip``."""
    if head is None or not isinstance(head, nn.Linear):
        return
    names = {id(m): n for n, m in model.named_modules()}
    head_name = names[id(head)]
    if cfg.embeddings == "float":
        report.skipped[head_name] = "embeddings='float' keeps the output head (and embedding) in float"
        return
    tied = emb is not None and getattr(emb, "weight", None) is head.weight
    head_skip = _skip_pattern(head_name, cfg)
    new_head = None
    if head_skip is not None:
        report.skipped[head_name] = f"matches skip pattern {head_skip!r}"
    else:
        # int8 even in an int4 config: the head is the widest layer and the most sensitive to error.
        kernel = cfg.kernel if cfg.kernel in (*KERNEL_REQUESTS, INT8PACK) else "auto"
        new_head = Int8WeightOnlyLinear.from_linear(head, cfg.dtype(), kernel)
        set_module(model, head_name, new_head)
        report.quantized[head_name] = new_head.kernel
    if isinstance(emb, nn.Embedding):
        emb_name = names[id(emb)]
        emb_skip = _skip_pattern(emb_name, cfg)
        if emb_skip is not None or (tied and new_head is None):
            report.skipped[emb_name] = (f"matches skip pattern {emb_skip!r}" if emb_skip is not None
                                        else f"tied to {head_name}, which matches skip pattern {head_skip!r}")
        else:
            if tied:  # share the head's int8 rows: one copy, like the float model had
                new_emb = Int8Embedding(new_head.weight_int8, new_head.scales, emb.weight.dtype)
            else:
                qt = quantize(emb.weight, 8, symmetric=True, granularity="per_channel")
                new_emb = Int8Embedding(qt.q, qt.scale.reshape(-1).to(emb.weight.dtype), emb.weight.dtype)
            set_module(model, emb_name, new_emb)
            report.quantized[emb_name] = "int8 lookup" + (" (tied to lm_head)" if tied else "")
    if new_head is not None and hasattr(model, "config"):
        model.config.tie_word_embeddings = False  # HF must not try to re-tie float weights onto our buffers

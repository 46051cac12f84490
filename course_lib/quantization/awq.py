"""Activation-aware scaling: AWQ (int4, ``method="awq"``) and SmoothQuant (W8A8, ``smooth=alpha``).

A few input channels carry much larger activations than the rest, and their weights matter most. Both methods
multiply each input channel of a weight by ``s`` and divide the layer's input by ``s``: the product ``x W^T`` is
unchanged in float, but the rounding is not.

* **AWQ** (Lin et al., 2023): ``s = mean|x|^alpha``, alpha searched on a grid to minimize the layer's output
  error on calibration data, before rounding to int4.
* **SmoothQuant** (Xiao et al., 2022): ``s = max|x|^a / max|w|^(1-a)`` moves activation outliers into the
  weights, so that rounding the activations per token (W8A8) hurts less.

Where the input comes straight from a norm (q/k/v after input_layernorm, gate/up after post_attention_layernorm in
Llama, Qwen2, Mistral) the ``1/s`` is folded into the norm's weight, for free; elsewhere (o_proj, down_proj) the
layer keeps an ``input_scale`` vector (K multiplies per token). Layers sharing a norm share one ``s``. Calibration
runs through the shared walk (:mod:`.calibration`), so later groups see the rounding of the earlier ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .calibration import SHARED_INPUTS, Group, walk
from .config import QuantConfig, QuantReport
from .layers import packed_linear, set_module
from .primitives import fake_quantize
from .registry import Method, register

AWQ_ALPHAS = tuple(i / 10 for i in range(11))  # the grid AWQ searches for its scale exponent
MAX_CALIB_ROWS = 2048  # activation rows kept per layer group for the scale search


def awq_scales(x: torch.Tensor, weights: list[torch.Tensor], cfg: QuantConfig,
               alphas: tuple[float, ...] = AWQ_ALPHAS) -> tuple[torch.Tensor, float, dict[float, float]]:
    """AWQ's search: s = mean|x|^alpha per input channel, alpha on a grid, minimizing the output error.

    ``x``: (rows, K) calibration inputs of the layers in ``weights`` (each (N, K), sharing that input). For each
    alpha the weights are multiplied by s, rounded to int4 (RTN, ``cfg.group_size``) and divided by s again;
    the error is || x W^T - x W_hat^T ||^2 summed over the layers. alpha = 0 is s = 1, plain RTN, so the chosen
    s is never worse than RTN on these activations. Returns (s, alpha, error per alpha).
    """
    x = x.float()
    mag = x.abs().mean(0).clamp_min(1e-6)
    ws = [w.detach().float() for w in weights]
    refs = [x @ w.T for w in ws]
    errs: dict[float, float] = {}
    best = (math.inf, None, None)
    for a in alphas:
        s = mag**a
        s = s / (s.max() * s.min()).sqrt()  # centre the range so neither end under- or overflows
        err = 0.0
        for w, ref in zip(ws, refs):
            w_hat = fake_quantize(w * s, 4, False, "per_group", cfg.group_size) / s
            err += float(((x @ w_hat.T - ref) ** 2).sum())
        errs[a] = err
        if err < best[0]:
            best = (err, a, s)
    return best[2], best[1], errs


def smoothquant_scales(x: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant: s = max|x|^alpha / max|w|^(1 - alpha) per input channel (the max over every layer's rows)."""
    xmax = x.float().abs().amax(0).clamp_min(1e-5)
    wmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0).clamp_min(1e-5)
    return (xmax**alpha / wmax ** (1 - alpha)).clamp_min(1e-5)


@torch.no_grad()
def _fold_into_norm(norm: nn.Module, s: torch.Tensor) -> bool:
    """Divide a norm's output by ``s`` through its weight (and bias); False (and unchanged) where that is not
    what the norm computes (e.g. Gemma's ``x * (1 + weight)``), checked on random inputs."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.shape != s.shape:
        return False
    b = getattr(norm, "bias", None)
    x = torch.randn(4, s.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    before = norm(x).float()
    saved = (w.detach().clone(), None if b is None else b.detach().clone())
    w.div_(s.to(w.device, w.dtype))
    if b is not None:
        b.div_(s.to(b.device, b.dtype))
    after = norm(x).float()
    want = before / s.to(before.device)
    if (after - want).norm() <= 1e-2 * want.norm():
        return True
    w.copy_(saved[0])
    if b is not None:
        b.copy_(saved[1])
    return False


class _Inputs:
    """Forward hook: the inputs a layer sees, as (rows, K) float32, up to ``MAX_CALIB_ROWS`` rows."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []
        self.n = 0

    def __call__(self, module, inputs, output) -> None:
        if self.n < MAX_CALIB_ROWS:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()[: MAX_CALIB_ROWS - self.n]
            self.rows.append(x)
            self.n += x.shape[0]

    def x(self) -> torch.Tensor:
        return torch.cat(self.rows)


def _scale_group(model: nn.Module, block: nn.Module | None, prefix: str, members: list[str],
                 todo: dict[str, nn.Linear], x: torch.Tensor, cfg: QuantConfig, report: QuantReport) -> None:
    """Find s for one group of layers sharing an input, fold 1/s into the norm or keep it per layer, quantize."""
    weights = [todo[n].weight for n in members]
    if cfg.smooth is None:  # AWQ
        s, alpha, _ = awq_scales(x, weights, cfg)
        how = f"awq alpha={alpha:g}"
    else:
        alpha = float(cfg.smooth)
        s = smoothquant_scales(x, weights, alpha)
        how = f"smoothquant alpha={alpha:g}"
    s = s.to(weights[0].device)
    rel = [n[len(prefix):] for n in members]
    shared = next((g for g in SHARED_INPUTS if rel[0] in g), None)
    folded = False
    if block is not None and shared is not None and hasattr(block, SHARED_INPUTS[shared]):
        # every consumer of the norm must take W * s: the quantized members, and any sibling left in float
        siblings = [block.get_submodule(r) for r in shared if r not in rel and _has_submodule(block, r)]
        if all(isinstance(m, nn.Linear) for m in siblings):
            folded = _fold_into_norm(block.get_submodule(SHARED_INPUTS[shared]), s)
            if folded:
                with torch.no_grad():
                    for m in siblings:
                        m.weight.mul_(s.to(m.weight.dtype))
    for n in members:
        lin = todo[n]
        w = lin.weight.detach().float() * s
        new = packed_linear(lin, cfg, weight=w.to(lin.weight.dtype),
                               input_scale=None if folded else 1 / s)
        set_module(model, n, new)
        report.quantized[n] = new.kernel
        report.scaled[n] = f"{how}, " + (f"folded into {prefix}{SHARED_INPUTS[shared]}" if folded else "input_scale")


def _has_submodule(m: nn.Module, name: str) -> bool:
    try:
        m.get_submodule(name)
        return True
    except AttributeError:
        return False


def _scaled_model(model: nn.Module, todo: dict[str, nn.Linear], cfg: QuantConfig, calibration: torch.Tensor,
                  report: QuantReport) -> None:
    """AWQ / SmoothQuant over the calibration walk: each group of layers sharing an input scaled and quantized."""
    def quantize_group(group: Group) -> None:
        _scale_group(model, group.block, group.prefix, group.names, todo, group.stats.x(), cfg, report)

    walk(model, todo, calibration, lambda lin: _Inputs(), quantize_group, f"{cfg.name} blocks")


def _check_awq(cfg: QuantConfig) -> None:
    if cfg.bits != 4:
        raise ValueError("method='awq' is for int4: QuantConfig(bits=4, group_size=32, method='awq')")


def _check_smoothquant(cfg: QuantConfig) -> None:
    if cfg.activations != "int8" or cfg.bits != 8:
        raise ValueError("smooth (SmoothQuant) is for W8A8: QuantConfig(bits=8, activations='int8', smooth=0.5)")
    if isinstance(cfg.smooth, bool) or not isinstance(cfg.smooth, (int, float)) or not 0 <= cfg.smooth <= 1:
        raise ValueError(f"smooth must be a number in [0, 1] (SmoothQuant's alpha, 0.5 is usual) or None, "
                         f"got {cfg.smooth!r}")


AWQ = register(Method("awq", _scaled_model, needs_calibration=True, check=_check_awq))
SMOOTHQUANT = register(Method("smoothquant", _scaled_model, needs_calibration=True, check=_check_smoothquant,
                              option="smooth"))

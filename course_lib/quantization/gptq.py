"""GPTQ (Frantar et al., 2022): error-compensating rounding, registered as ``method="gptq"``.

Round-to-nearest (RTN) rounds every weight on its own; GPTQ rounds one input column at a time and pushes the
rounding error onto the columns not yet rounded, weighted by how the calibration activations correlate (the
Hessian ``X^T X``). It changes only the Linear weights and works at 4 bits, where RTN hurts most. Each layer's
Hessian comes from the shared calibration walk (:mod:`.calibration`), on what the already-quantized layers
before it produce.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration import Group, walk
from .config import QuantConfig, QuantReport
from .kernels import INT4_MID
from .layers import packed_linear, set_module, stored_scale_dtype
from .primitives import Quantized, qrange, quantize
from .registry import Method, register


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig,
                         scale_dtype: torch.dtype = torch.float32) -> Quantized:
    """GPTQ on one weight (N, K) given H = 2 X^T X / n over its calibration inputs.

    Columns are rounded left to right; each column's error is spread over the
    later columns with the inverse Hessian (Cholesky form), in blocks of
    ``cfg.gptq_block`` columns for speed. Group scales are set from the
    already-updated weights when a group starts (the paper's choice).
    ``scale_dtype``: the dtype the packed layer stores its scales (and int4 offsets) in. Each column is rounded
    to that grid and its error measured against it: rounding to fp32 scales and storing bf16 ones afterwards
    adds an error nothing compensates (measured in docs/quantization.md, "GPTQ on the real model").
    """
    W = weight.detach().float().clone()
    N, K = W.shape
    dev = W.device  # everything stays on the weight's device (a GPU does the Cholesky and the updates)
    H = hessian.float().to(dev).clone()
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += cfg.gptq_damp * torch.mean(torch.diag(H)) * torch.eye(K, device=dev)  # dampening keeps H invertible
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    bits, sym = cfg.bits, cfg.bits == 8
    gs = cfg.group_size or K
    qmin, qmax = qrange(bits, sym)
    Q = torch.zeros(N, K, device=dev)
    scales = torch.zeros(N, K // gs, device=dev)
    zeros = torch.zeros(N, K // gs, device=dev)

    def params(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, integer zero point, the zero point rounding sees) as the packed layer will store them."""
        qt = quantize(cols, bits, sym, "per_channel")
        scale, zero = qt.scale.reshape(-1), qt.zero_point.reshape(-1)
        if scale_dtype == torch.float32:
            return scale, zero, zero
        scale = scale.to(scale_dtype).float()
        if sym:
            return scale, zero, zero
        # the int4 layer stores (q - 8) * scale + offset with offset = (8 - zero) * scale in scale_dtype, so the
        # zero point it dequantizes with is 8 - offset / scale: near the integer, not on it
        offset = ((INT4_MID - zero) * scale).to(scale_dtype).float()
        return scale, zero, INT4_MID - offset / scale

    scale, zero, z_eff = params(W)  # int8: one scale per channel from the whole row
    for i1 in range(0, K, cfg.gptq_block):
        i2 = min(i1 + cfg.gptq_block, K)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if cfg.group_size and col % gs == 0:
                # scales from the weights as GPTQ has updated them so far
                scale, zero, z_eff = params(torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs])
                scales[:, col // gs], zeros[:, col // gs] = scale, zero
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scale + z_eff), qmin, qmax)
            Q[:, col] = q
            err = (w - (q - z_eff) * scale) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    if not cfg.group_size:
        scales[:, 0], zeros[:, 0] = scale, zero
    if cfg.group_size:
        return Quantized(Q.to(torch.uint8), scales.unsqueeze(-1), zeros.unsqueeze(-1), bits, sym, "per_group", gs)
    return Quantized(Q.to(torch.int8), scales, zeros, bits, sym, "per_channel", None)


class Hessian:
    """Forward hook: running mean of 2 x x^T over every token a layer sees (independent of token count)."""

    def __init__(self, k: int):
        self.H = torch.zeros(k, k)
        self.n = 0

    def __call__(self, module, inputs, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        self.H = self.H.to(x.device)  # kept where the layer runs: no copy of every activation to the CPU
        total = self.n + x.shape[0]
        self.H *= self.n / total
        self.H += (2 / total) * x.t() @ x
        self.n = total


def gptq_linear(lin: nn.Linear, cfg: QuantConfig, hessian: torch.Tensor) -> nn.Module:
    """The packed layer ``cfg`` asks for, its integers chosen by GPTQ from ``hessian`` on the grid the layer stores
    (bf16 scales for compute_dtype "auto")."""
    qt = gptq_quantize_weight(lin.weight, hessian, cfg, scale_dtype=stored_scale_dtype(cfg.dtype()))
    return packed_linear(lin, cfg, qt)


def float_stand_in(lin: nn.Linear, packed: nn.Module) -> nn.Linear:
    """A float Linear holding exactly ``packed``'s dequantized weight, in ``lin``'s dtype and device."""
    out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(packed.dequantized_weight().to(lin.weight))
        if lin.bias is not None:
            out.bias.copy_(lin.bias)
    return out


def _gptq_model(model: nn.Module, todo: dict[str, nn.Linear], cfg: QuantConfig, calibration: torch.Tensor,
                report: QuantReport) -> None:
    """Sequential GPTQ over the calibration walk. Until the end the model runs float stand-ins of the packed layers:
    the layers calibrated later see these layers' rounding error, but not which kernel a timing picked for them
    (bf16 and fp32 activations give slightly different outputs, so Hessians, and then the integers, would change
    from run to run)."""
    packed: dict[str, nn.Module] = {}

    def quantize_group(group: Group) -> None:
        for n in group.names:
            packed[n] = gptq_linear(todo[n], cfg, group.stats.H)
            set_module(model, n, float_stand_in(todo[n], packed[n]))

    walk(model, todo, calibration, lambda lin: Hessian(lin.in_features), quantize_group, "GPTQ blocks")
    for n, new in packed.items():
        set_module(model, n, new)
        report.quantized[n] = new.kernel


GPTQ = register(Method("gptq", _gptq_model, needs_calibration=True))

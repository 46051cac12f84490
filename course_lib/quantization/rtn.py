"""Round to nearest (``method="rtn"``, the default): each weight rounded on its own, no calibration.

The baseline every other method is measured against, and W8A8's weight rounding.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig, QuantReport
from .layers import packed_linear, set_module
from .registry import Method, register


def _rtn_model(model: nn.Module, todo: dict[str, nn.Linear], cfg: QuantConfig, calibration: torch.Tensor | None,
               report: QuantReport) -> None:
    for name, lin in tqdm(todo.items(), desc=f"quantizing ({cfg.name})", leave=False):
        new = packed_linear(lin, cfg)
        set_module(model, name, new)
        report.quantized[name] = new.kernel


RTN = register(Method("rtn", _rtn_model))

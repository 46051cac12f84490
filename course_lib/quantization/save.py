"""Saving and loading a quantized model: ``save_quantized(model, folder)`` and :func:`load_quantized`.

transformers' ``from_pretrained`` knows nothing of packed layers: given their state dict it would build float
layers, find no ``weight`` for them and initialise them at random (a warning only). So a quantized model is saved
under file names ``from_pretrained`` does not read - it then refuses the folder ("no model.safetensors") instead of
loading noise - and ``course_lib.load_model(folder)`` rebuilds the packed layers from :data:`QUANT_FILE`. Each
packed layer names its own kind and rebuilds itself (:data:`~course_lib.quantization.layers.SAVED_LAYERS`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .config import QuantConfig
from .layers import SAVED_LAYERS, SavedLayer, set_module

log = logging.getLogger(__name__)

QUANT_FILE = "course_quant.json"
QUANT_WEIGHTS = "course_quant.safetensors"
_FLOAT_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")


def save_quantized(model: nn.Module, save_directory: str | os.PathLike, **kwargs) -> None:
    """Save a quantized model: config.json, the packed tensors (QUANT_WEIGHTS) and how to rebuild them (QUANT_FILE).

    Load it with ``course_lib.load_model(folder)``. ``kwargs`` are accepted for the call shape of
    ``save_pretrained``: only ``safe_serialization`` and ``max_shard_size``, which change nothing here.
    """
    unsupported = sorted(k for k, v in kwargs.items() if k not in ("safe_serialization", "max_shard_size") and v)
    if unsupported:
        raise ValueError(f"save_pretrained of a quantized model takes only a folder; {unsupported} are not "
                         "supported (save it, then share the folder)")
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; save_pretrained needs a folder")
    stale = [f for f in _FLOAT_WEIGHT_FILES if (folder / f).exists()] + sorted(
        p.name for p in folder.glob("model-*-of-*.safetensors"))
    if stale:
        raise ValueError(f"{folder} already holds float weights ({', '.join(stale)}); transformers would load those "
                         "beside the quantized ones. Save the quantized model to an empty folder")
    cfg = getattr(model, "course_quant_config", None)
    layers = {name: m.saved_spec() for name, m in model.named_modules() if isinstance(m, SavedLayer)}
    if not layers:
        raise ValueError("this model has no packed layers; save it with the ordinary save_pretrained")
    # A tied head and embedding share one int8 tensor: store it once, note the second name (an alias).
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_file(tensors, str(folder / QUANT_WEIGHTS), metadata={"format": "pt"})
    meta = {"format": 1, "quant_config": None if cfg is None else {**asdict(cfg), "skip": list(cfg.skip)},
            "layers": layers, "aliases": aliases}
    (folder / QUANT_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    log.info("saved %d packed layers to %s (load with course_lib.load_model)", len(layers), folder)


def load_quantized(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`: float layers from its config, packed layers from the file.

    ``dtype`` is for the layers that stayed in float; each packed layer keeps the compute dtype it was saved with.
    """
    folder = Path(folder)
    meta = json.loads((folder / QUANT_FILE).read_text())
    if meta.get("format") != 1:
        raise ValueError(f"{folder / QUANT_FILE} has format {meta.get('format')!r}; this course_lib reads format 1")
    # clone: safetensors hands back tensors at 8-byte offsets, and the int8 kernel needs aligned rows
    tensors = {k: t.clone() for k, t in load_file(str(folder / QUANT_WEIGHTS)).items()}
    for key, source in meta["aliases"].items():
        tensors[key] = tensors[source]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    built: dict[int, torch.Tensor] = {}  # storage of a file tensor -> the buffer built from it (re-ties aliases)
    for name, spec in meta["layers"].items():
        def get(key: str, name: str = name) -> torch.Tensor | None:
            t = tensors.get(f"{name}.{key}")
            return None if t is None else built.get(id(t), t)
        if spec["type"] not in SAVED_LAYERS:
            raise ValueError(f"{folder / QUANT_FILE}: unknown layer type {spec['type']!r} for {name}")
        new = SAVED_LAYERS[spec["type"]].from_saved(get, spec, dtype)
        for key, buf in new.named_buffers(recurse=False):
            if f"{name}.{key}" in tensors and buf is not None:
                built.setdefault(id(tensors[f"{name}.{key}"]), buf)
        set_module(model, name, new)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or missing:
        raise ValueError(f"{folder / QUANT_WEIGHTS} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    qc = meta.get("quant_config")
    model.course_quant_config = QuantConfig(**{**qc, "skip": tuple(qc["skip"])}) if qc else None
    return model.eval()

"""Saving and loading a quantized model: ``save_quantized(model, folder)`` and :func:`load_quantized`.

transformers' ``from_pretrained`` knows nothing of packed layers: given their state dict it would build float
layers, find no ``weight`` for them and initialise them at random (a warning only). So a quantized model is saved
under file names ``from_pretrained`` does not read - it then refuses the folder ("no model.safetensors") instead of
loading noise - and ``course_lib.load_model(folder)`` rebuilds the packed layers from :data:`QUANT_FILE`. Each
packed layer names its own kind, the fields and tensors it is saved with, and rebuilds itself
(:data:`~course_lib.quantization.layers.SAVED_LAYERS`), so nothing here lists layer types.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .._checks import check_flag
from .._files import move_files_into, replace_folder, writing_folder
from .config import QuantConfig
from .kernels import COMPUTE_DTYPES
from .layers import SAVED_LAYERS, SavedLayer, set_module

log = logging.getLogger(__name__)

QUANT_FILE = "course_quant.json"
QUANT_WEIGHTS = "course_quant.safetensors"
QUANT_OUTPUTS = ("config.json", "generation_config.json", QUANT_WEIGHTS, QUANT_FILE)  # all a save writes
_FLOAT_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")
# What each top-level field of QUANT_FILE must be: {field: (type, required)}; a layer's own come from its class.
_QUANT_FILE_FIELDS = {"format": (int, True), "quant_config": ((dict, type(None)), True), "layers": (dict, True),
                      "aliases": (dict, True)}


def save_quantized(model: nn.Module, save_directory: str | os.PathLike, overwrite: bool = False,
                   **kwargs) -> Path:
    """Save a quantized model: config.json, the packed tensors (QUANT_WEIGHTS) and how to rebuild them (QUANT_FILE).

    Load it with ``course_lib.load_model(folder)``. A non-empty folder is refused unless ``overwrite=True``, which
    replaces only the files listed in :data:`QUANT_OUTPUTS`. Atomic: the files are written beside the folder first
    and renamed into it, so a failed save (a full disk) leaves the folder as it was. ``kwargs`` are accepted for
    the call shape of ``save_pretrained``: only ``safe_serialization`` and ``max_shard_size``, which change nothing.
    """
    unsupported = sorted(k for k, v in kwargs.items() if k not in ("safe_serialization", "max_shard_size") and v)
    if unsupported:
        raise ValueError(f"save_quantized takes only a folder (and overwrite); {unsupported} are not "
                         "supported (save it, then share the folder)")
    check_flag("overwrite", overwrite)
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; save_quantized needs a folder")
    stale = [f for f in _FLOAT_WEIGHT_FILES if (folder / f).exists()] + sorted(
        p.name for p in folder.glob("model-*-of-*.safetensors"))
    if stale:
        raise ValueError(f"{folder} already holds float weights ({', '.join(stale)}); transformers would load those "
                         "beside the quantized ones. Save the quantized model to an empty folder")
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if present and not overwrite:
        raise ValueError(f"{folder} is not empty ({', '.join(present[:5])}{', ...' if len(present) > 5 else ''}); "
                         "save the quantized model to a new or empty folder, or pass overwrite=True to replace the "
                         f"files it writes ({', '.join(QUANT_OUTPUTS)}) and keep the others")
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
    meta = {"format": 1, "quant_config": None if cfg is None else {**asdict(cfg), "skip": list(cfg.skip)},
            "layers": layers, "aliases": aliases}
    with writing_folder(folder) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(tensors, str(tmp / QUANT_WEIGHTS), metadata={"format": "pt"})
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if folder.is_dir():
            move_files_into(tmp, folder, last=(QUANT_FILE,))
        else:
            replace_folder(tmp, folder)
    log.info("saved %d packed layers to %s (load with course_lib.load_model)", len(layers), folder)
    return folder


def load_quantized(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`: float layers from its config, packed layers from the file.

    ``dtype`` is for the layers that stayed in float; each packed layer keeps the compute dtype it was saved with.
    """
    folder = Path(folder)
    meta, cfg = _read_quant_file(folder / QUANT_FILE)
    # clone: safetensors hands back tensors at 8-byte offsets, and the int8 kernel needs aligned rows
    tensors = {k: t.clone() for k, t in load_file(str(folder / QUANT_WEIGHTS)).items()}
    for key, source in meta["aliases"].items():
        if source not in tensors:
            raise ValueError(f"{folder / QUANT_FILE}: aliases[{key!r}] names {source!r}, which {QUANT_WEIGHTS} "
                             "does not hold; save the quantized model again")
        tensors[key] = tensors[source]
    for name, spec in meta["layers"].items():
        absent = [k for k in SAVED_LAYERS[spec["type"]].SAVED_TENSORS if f"{name}.{k}" not in tensors]
        if absent:
            raise ValueError(f"{folder / QUANT_WEIGHTS} lacks {name}.{absent[0]}, which layer {name!r} of "
                             f"{QUANT_FILE} needs; save the quantized model again")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    built: dict[int, torch.Tensor] = {}  # storage of a file tensor -> the buffer built from it (re-ties aliases)
    for name, spec in meta["layers"].items():
        def get(key: str, name: str = name) -> torch.Tensor | None:
            t = tensors.get(f"{name}.{key}")
            return None if t is None else built.get(id(t), t)
        try:
            new = SAVED_LAYERS[spec["type"]].from_saved(get, spec, dtype)
            set_module(model, name, new)
        except (ValueError, RuntimeError, AttributeError) as e:
            raise ValueError(f"{folder / QUANT_FILE}: layers[{name!r}] cannot be rebuilt ({e}); the file is damaged "
                             "or was edited: save the quantized model again") from e
        for key, buf in new.named_buffers(recurse=False):
            if f"{name}.{key}" in tensors and buf is not None:
                built.setdefault(id(tensors[f"{name}.{key}"]), buf)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or missing:
        raise ValueError(f"{folder / QUANT_WEIGHTS} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.course_quant_config = cfg  # what save_quantized records when this model is saved again
    return model.eval()


def _read_quant_file(path: Path) -> tuple[dict, QuantConfig | None]:
    """QUANT_FILE checked field by field, and the QuantConfig it records.

    A wrong type or a missing field is a ValueError naming the file and the field; a field this version does not
    know (a newer course_lib wrote it) is ignored with a warning.
    """
    def fail(where: str, what: str) -> ValueError:
        return ValueError(f"{path}: {where} {what}; the file is damaged or was edited: save the quantized "
                          "model again")

    def check(obj, where: str, spec: dict) -> None:
        if not isinstance(obj, dict):
            raise fail(where or "the file", f"must be a JSON object, got {type(obj).__name__}")
        for key, (typ, required) in spec.items():
            at = f"{where}[{key!r}]" if where else f"field {key!r}"
            if key not in obj:
                if required:
                    raise fail(at, "is missing")
            elif typ is not object and (isinstance(obj[key], bool) or not isinstance(obj[key], typ)):
                raise fail(at, f"has the wrong type ({type(obj[key]).__name__}): {obj[key]!r}")
        extra = sorted(set(obj) - set(spec))
        if extra:
            log.warning("%s: ignoring %s %s, unknown to this course_lib (saved by a newer version?)", path,
                        f"{where} fields" if where else "fields", ", ".join(map(repr, extra)))

    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); save the quantized model again") from e
    check(meta, "", _QUANT_FILE_FIELDS)
    if meta["format"] != 1:
        raise ValueError(f"{path} has format {meta['format']!r}; this course_lib reads format 1")
    for name, spec in meta["layers"].items():
        where = f"layers[{name!r}]"
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in SAVED_LAYERS:
            raise fail(f"{where}['type']", f"must be one of {sorted(SAVED_LAYERS)}, got {kind!r}")
        check(spec, where, SAVED_LAYERS[kind].SAVED_FIELDS)
        for key in ("compute_dtype", "float_dtype"):
            if key in spec and spec[key] not in COMPUTE_DTYPES and not (key == "compute_dtype" and spec[key] == "auto"):
                raise fail(f"{where}[{key!r}]", f"must be 'auto' or one of {sorted(COMPUTE_DTYPES)}, got {spec[key]!r}")
    for key, source in meta["aliases"].items():
        if not isinstance(source, str):
            raise fail(f"aliases[{key!r}]", f"must name a tensor, got {source!r}")
    qc = meta["quant_config"]
    if qc is None:
        return meta, None
    known = {f.name: (list if f.name == "skip" else object, True) for f in fields(QuantConfig)}
    check(qc, "quant_config", known)  # the values' types: QuantConfig checks them, naming the field
    try:
        cfg = QuantConfig(**{k: tuple(v) if k == "skip" else v for k, v in qc.items() if k in known})
    except ValueError as e:
        raise fail("quant_config", f"is invalid: {e}") from e
    return meta, cfg

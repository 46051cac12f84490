"""Loading models: the embedded course model, speed-lab architectures, any HF model.

Two kinds of model serve two purposes in this course:

* **quality lab** - ``course-tiny``, a small Llama-family model trained by this
  project on the Python standard library and shipped inside the package. Its
  perplexity means something, so compression methods are judged on it.
* **speed lab** - real-size architectures (the published shapes of SmolLM2-135M,
  Qwen2.5-0.5B, ...) built with *random* weights. A matmul takes the same time
  whatever numbers are in the matrix, so these give honest timings of a
  realistic model with no download. Their text is gibberish, by design.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import real_model
from .device import course_device, pick_device
from .nb import quiet_weight_bars
from .quantization import load_quantized

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "course-tiny"
# The integers of course_lib.quantization's packed layers (they have no `weight`): a folder whose weights hold these
# but no course_quant.json was saved by transformers, which would load it as random float layers.
PACKED_TENSORS = ("weight_int8", "weight_packed", "scales_and_zeros")

# Named presets: embedded folders first, then short names for hub models.
EMBEDDED = {
    "course-tiny": WEIGHTS_DIR / "course-tiny",
    "course-tiny-student": WEIGHTS_DIR / "course-tiny-student",
}
HUB_ALIASES = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
}

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Turn "bf16", "float32", torch.float16, ... into a torch dtype (default float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} not supported; use one of {sorted(DTYPES)}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or a torch.dtype")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto" is the course's device (``COURSE_DEVICE``, default CUDA > MPS > CPU); others are validated."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return course_device()
    return pick_device(device)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine fails in seconds instead of hanging."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model_path(name_or_path: str) -> str:
    """Map a preset name, local folder or hub id to what `from_pretrained` takes."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(f"model name must be a non-empty string; try {DEFAULT_MODEL!r}")
    name = str(name_or_path)
    if real_model.is_real_model(name):  # SmolLM2-135M-Instruct, converted once from its wheel's GGUF
        return real_model.resolve()
    if name in EMBEDDED:
        folder = EMBEDDED[name]
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"embedded model {name!r} is not in this install ({folder}); "
                f"train it with `python -m course_lib train` or use {DEFAULT_MODEL!r}"
            )
        return _checked_folder(folder)
    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(f"folder {folder} has no config.json: not a saved Hugging Face model")
        return _checked_folder(folder)
    if _looks_like_path(name_or_path):  # else "./no/such/dir" would be looked up on the hub and called "offline"
        where = Path(name).expanduser().absolute()
        what = "is a file, not a model folder" if where.exists() else "does not exist"
        raise ValueError(f"no such model folder: {name!r} ({where}) {what}; check the path, or use a preset "
                         f"such as {DEFAULT_MODEL!r} or a hub id like 'org/name'")
    hub_id = HUB_ALIASES.get(name.lower(), name)
    if "/" not in hub_id:
        raise ValueError(
            f"unknown model {name!r}; presets are {sorted(EMBEDDED) + [real_model.NAME] + sorted(HUB_ALIASES)}, "
            "or pass a local folder or a hub id like 'org/name'"
        )
    return hub_id


# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone does not: it only points at them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def _looks_like_path(name) -> bool:
    """A name no hub id could be: a path object, a leading / . ~, a backslash, or more than one '/'."""
    text = str(name)
    return (isinstance(name, os.PathLike) or text.startswith(("/", ".", "~")) or "\\" in text
            or text.count("/") > 1 or Path(text).expanduser().exists())


def _checked_folder(folder: Path) -> str:
    """A saved model folder, checked before any slow load: it has a tokenizer and readable safetensors files.

    Without these checks a folder with no tokenizer fails only after the model has loaded, and a
    truncated weights file fails deep inside safetensors with a message that names no file.
    """
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(
            f"folder {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save it beside the "
            f"model with tokenizer.save_pretrained({str(folder)!r}), or copy the tokenizer files of the model "
            "it was made from"
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is damaged ({e}); save the model again with save_pretrained") from e
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(f"{index} lists weight files that are missing from {folder}: {missing}; copy the "
                             "whole folder again, or save the model again with save_pretrained")

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as sf:  # reads and checks the header against the file size
                keys = list(sf.keys())
        except Exception as e:  # safetensors raises its own error type (SafetensorError), or OSError
            raise ValueError(
                f"weights file {f} is damaged and cannot be read ({e}); it was probably cut short by an "
                "interrupted save, copy or download: save the model again (model.save_pretrained) or copy "
                "the folder again"
            ) from e
        packed = [k for k in keys if k.rpartition(".")[2] in PACKED_TENSORS]
        if packed and not (folder / "course_quant.json").is_file():  # transformers would load random float layers
            raise ValueError(
                f"{f} holds packed quantized layers ({packed[0]}, ...) saved by transformers' save_pretrained, "
                "which cannot rebuild them; save the quantized model with "
                "course_lib.quantization.save_quantized(model, folder) instead"
            )
    return str(folder)


def _from_pretrained_offline_aware(loader, path: str, **kw):
    """Load from a folder, the local hub cache, or (only if reachable) the hub."""
    if Path(path).is_dir():
        return loader.from_pretrained(path, **kw)
    try:
        return loader.from_pretrained(path, local_files_only=True, **kw)
    except OSError:
        pass
    if not _hub_reachable():
        raise ValueError(
            f"{path!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline). Use the embedded default {DEFAULT_MODEL!r}, a local folder, or "
            "download the model on a machine with internet first."
        )
    return loader.from_pretrained(path, **kw)


# The JSON files a fast tokenizer is read from: one cut short or edited by hand fails inside transformers with a
# JSONDecodeError or a KeyError ('added_tokens') that names no file.
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _damaged_tokenizer_file(folder: Path) -> tuple[Path, str] | None:
    """(file, what is wrong) for the first of the folder's tokenizer JSON files that cannot be read, else None."""
    for name in TOKENIZER_JSON:
        f = folder / name
        if not f.is_file():
            continue
        try:
            text = f.read_text(encoding="utf-8")
            if not isinstance(json.loads(text), dict):
                return f, "not a JSON object"
            if name == "tokenizer.json":
                Tokenizer.from_str(text)
        except Exception as e:  # JSONDecodeError, UnicodeDecodeError, the tokenizers library's own Exception
            return f, f"{type(e).__name__}: {e}"
    return None


def _tokenizer_from(path: str):
    """AutoTokenizer of a resolved path; a damaged tokenizer file in a local folder is named in a ValueError."""
    try:
        return _from_pretrained_offline_aware(AutoTokenizer, path)
    except Exception as e:
        bad = _damaged_tokenizer_file(Path(path)) if Path(path).is_dir() else None
        if bad is None:
            raise
        raise ValueError(f"tokenizer file {bad[0]} is damaged and cannot be read ({bad[1][:200]}): it was probably "
                         "cut short by an interrupted copy or edited by hand; copy it again from the model it came "
                         "from, or save the tokenizer again with tokenizer.save_pretrained(folder)") from e


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer of a preset, folder or hub id."""
    return _tokenizer_from(resolve_model_path(name_or_path))


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer, in eval mode.

    ``name_or_path`` is a preset (``course-tiny``, ``smollm2-135m``, ...), a
    local folder saved with ``save_pretrained``, or a hub id. ``device=None`` is the course's device
    (:func:`course_lib.course_device`).
    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    path = resolve_model_path(name_or_path)
    if (Path(path) / "course_quant.json").is_file():  # saved by a quantized model's save_pretrained

        with quiet_weight_bars():
            model = load_quantized(path, torch_dtype)
    else:
        try:
            with quiet_weight_bars():  # no "Loading weights" bar in every notebook that loads a model
                model = _from_pretrained_offline_aware(AutoModelForCausalLM, path, dtype=torch_dtype)
        except pickle.UnpicklingError as e:  # transformers reads *.bin with weights_only=True: refused unread
            raise ValueError(f"a weights file (.bin) of {path} holds objects other than tensors; it was refused "
                             "unread, because loading it could run code. Use a copy saved as safetensors from a "
                             "source you trust") from e
    tokenizer = _tokenizer_from(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(dev).eval(), tokenizer


# --- speed lab -----------------------------------------------------------------
# Published shapes (from each model's config.json); weights are random.
SPEED_LAB_CONFIGS: dict[str, dict] = {
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "smollm2-360m": dict(
        model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
        num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
    ),
}


# Mixture-of-experts shapes, from each model's config.json: every MLP is `num_experts` SwiGLU experts of which a
# token uses `num_experts_per_tok`. Built from transformers' own MoE classes (OlmoeForCausalLM, ...).
SPEED_LAB_MOE_CONFIGS: dict[str, dict] = {
    "olmoe-1b-7b": dict(  # allenai/OLMoE-1B-7B-0924
        model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        vocab_size=50304, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
    ),
    "qwen3-30b-a3b": dict(  # Qwen/Qwen3-30B-A3B
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, tie_word_embeddings=False,
    ),
    "mixtral-8x7b": dict(  # mistralai/Mixtral-8x7B-v0.1
        model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=32000, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False,
    ),
}
# What each model's authors publish as its parameter count (billions), and where: tests check the shapes above.
MOE_PUBLISHED_PARAMS: dict[str, dict] = {
    "olmoe-1b-7b": dict(total_b=6.9, active_b=1.3, source="Muennighoff et al. 2024, 'OLMoE: Open Mixture-of-"
                        "Experts Language Models' (arXiv:2409.02060): 6.9B total, 1.3B active parameters"),
    "qwen3-30b-a3b": dict(total_b=30.5, active_b=3.3, source="Qwen3-30B-A3B model card (Qwen/Qwen3-30B-A3B): "
                          "30.5B in total and 3.3B activated"),
    "mixtral-8x7b": dict(total_b=46.7, active_b=12.9, source="Mistral AI, 'Mixtral of experts' (announcement, "
                         "Dec 2023): 46.7B total parameters, 12.9B used per token"),
}


def speed_lab_config(name: str, num_layers: int | None = None):
    """The Hugging Face config of a speed-lab architecture, dense or mixture-of-experts (optionally fewer layers)."""
    key = name.lower() if isinstance(name, str) else None
    known = {**SPEED_LAB_CONFIGS, **SPEED_LAB_MOE_CONFIGS}
    if key not in known:
        raise ValueError(f"unknown speed-lab model {name!r}; choose one of {sorted(SPEED_LAB_CONFIGS)} (dense) "
                         f"or {sorted(SPEED_LAB_MOE_CONFIGS)} (mixture of experts)")
    spec = dict(known[key])
    model_type = spec.pop("model_type")
    rope_theta = spec.pop("rope_theta")
    if num_layers is not None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        spec["num_hidden_layers"] = num_layers
    cfg = AutoConfig.for_model(model_type, **spec)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    return cfg


def speed_lab_model(
    name: str = "smollm2-135m",
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = None,
    num_layers: int | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, object]:
    """A real-size architecture with random weights: honest timings, no download.

    ``device=None`` is the course's device; ``device="meta"`` builds the shapes only (no memory, no weights):
    enough to count parameters and FLOPs.
    """
    cfg = speed_lab_config(name, num_layers)
    torch_dtype = resolve_dtype(dtype)
    if str(device) == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
        return model.eval(), cfg
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    return model.to(dev).eval(), cfg


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_token_ids(model, ids: torch.Tensor, what: str = "ids") -> None:
    """ValueError unless ``ids`` are integer token ids the model can embed (0 <= id < its vocabulary size).

    Ids from another tokenizer would otherwise fail as an IndexError deep in the embedding or the loss.
    ``model`` is a Hugging Face model or a :class:`~course_lib.scratch_llama.ScratchLlama` wrapping one.
    """
    model = getattr(model, "hf_model", model)
    if (not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex
            or ids.dtype == torch.bool):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{what} must be a tensor of integer token ids (torch.long), got {got}")
    sizes = [model.config.vocab_size]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(getattr(emb, "num_embeddings", None), int):
        sizes.append(emb.num_embeddings)
    vocab = min(sizes)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
        raise ValueError(
            f"{what} hold token id {bad}, outside this model's vocabulary of {vocab} ids (0..{vocab - 1}): they "
            "were made by another tokenizer; encode the text with this model's own tokenizer (load_model "
            "returns it)"
        )


def context_length(model) -> int | None:
    """The most positions the model was made for (``config.max_position_embeddings``), or None if it has none.

    ``model`` is a Hugging Face model or a :class:`~course_lib.scratch_llama.ScratchLlama` wrapping one.
    """
    cfg = getattr(getattr(model, "hf_model", model), "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_prompt_ids(model, ids: torch.Tensor, max_new_tokens: int, truncate: bool | None = None,
                     what: str = "prompt") -> torch.Tensor:
    """``ids`` (..., T) checked before any work: token ids the model can embed, and room for the answer.

    Past its context (``max_position_embeddings``) a model gives no error, only worse and worse tokens (RoPE
    positions it never saw), after a prefill that can take minutes; and a static cache sized for a huge
    ``max_new_tokens`` fails as an allocation of hundreds of GB. So prompt + ``max_new_tokens`` beyond the
    context is a ValueError; with ``truncate=True`` the prompt instead keeps its last tokens, with a warning.
    ``truncate=None``: the caller offers no truncation (the message does not suggest it).
    """
    check_token_ids(model, ids, f"{what} ids")
    n = context_length(model)
    t = ids.shape[-1]
    if n is None or t + max_new_tokens <= n:
        return ids
    if truncate and max_new_tokens < n:
        keep = n - max_new_tokens
        warnings.warn(f"{what} of {t} tokens + max_new_tokens={max_new_tokens} exceeds the model's context of "
                      f"{n} tokens: kept the last {keep} tokens of the {what} (truncate=True)", stacklevel=2)
        return ids[..., t - keep:]
    if max_new_tokens >= n:
        fix = f"ask for fewer new tokens (max_new_tokens <= {n - 1})"
    elif t >= n:
        fix = f"shorten the {what} (at most {n - max_new_tokens} tokens leave room for {max_new_tokens} new ones)"
    else:
        fix = f"ask for at most {n - t} new tokens, or shorten the {what}"
    if truncate is not None and max_new_tokens < n:
        fix += f", or pass truncate=True to keep only its last {n - max_new_tokens} tokens"
    raise ValueError(f"max_new_tokens ({max_new_tokens}) + {what} length ({t} tokens) = {t + max_new_tokens} "
                     f"exceeds the model's context of {n} tokens (config.max_position_embeddings): {fix}")

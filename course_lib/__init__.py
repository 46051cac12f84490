"""course_lib: the library behind the course on making LLMs answer faster.

Notebooks derive each technique by hand, then import it from here.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from . import real_model
from .chat import chat
from .decode_speed import time_generation
from .device import course_device
from .generation import generate, stream_generate
from .metrics import answer_agreement, model_size_bytes, next_token_accuracy, perplexity, prose_perplexity
from .models import count_parameters, load_model, load_tokenizer, speed_lab_model
from .timing import benchmark

# The one-call APIs of the compression chapters, imported on first use: `import course_lib` stays quick and
# does not pull in Torch-Pruning until a learner asks for pruning.
_LAZY = {
    "QuantConfig": "quantization", "quantize_": "quantization", "save_quantized": "quantization",
    "PruneConfig": "pruning", "prune_": "pruning", "pruned": "pruning",
    "DistillConfig": "distillation", "distill": "distillation", "make_student": "distillation",
    "speculative_generate": "speculative", "prompt_lookup_generate": "speculative",
}

__all__ = [
    "__version__", "answer_agreement", "benchmark", "chat", "count_parameters", "course_device", "generate",
    "load_model", "load_tokenizer", "model_size_bytes", "next_token_accuracy", "perplexity", "prose_perplexity",
    "real_model", "speed_lab_model", "stream_generate", "time_generation", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'course_lib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # tab completion lists the lazy names too

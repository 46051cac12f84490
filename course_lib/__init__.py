"""course_lib: the library behind the course on making LLMs answer faster.

Notebooks derive each technique by hand, then import it from here.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .generation import generate, stream_generate
from .metrics import model_size_bytes, next_token_accuracy, perplexity
from .models import count_parameters, load_model, load_tokenizer, speed_lab_model
from .timing import benchmark, time_generation

__all__ = [
    "__version__", "benchmark", "count_parameters", "generate", "load_model", "load_tokenizer",
    "model_size_bytes", "next_token_accuracy", "perplexity", "speed_lab_model", "stream_generate",
    "time_generation",
]

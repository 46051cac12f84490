"""``python -m course_lib evaluate``: the figures of a model card, measured now."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .generation import generate
from .metrics import compile_rate, next_token_accuracy, perplexity
from .models import count_parameters, load_model, resolve_model_path

SAMPLE_PROMPTS = (
    "def is_prime(n):",
    "class Stack:\n    def __init__(self):",
    "import os\n\ndef list_python_files(",
)


def evaluate_model(name: str = "course-tiny", max_tokens: int | None = None, n_functions: int = 64,
                   progress: bool = True) -> dict:
    """Held-out perplexity and accuracy (whole split by default), compile rate, samples, training record."""
    model, tok = load_model(name)
    t0 = time.perf_counter()
    card = {
        "model": name,
        "parameters": count_parameters(model),
        "heldout_perplexity": perplexity(model, tok, max_tokens=max_tokens),
        "heldout_next_token_accuracy": next_token_accuracy(model, tok, max_tokens=max_tokens),
        "heldout_compile_rate": compile_rate(model, tok, n=n_functions, progress=progress),
        "compile_rate_functions": n_functions,
        "samples": {p: generate(model, tok, p, max_new_tokens=48) for p in SAMPLE_PROMPTS},
    }
    card["eval_seconds"] = round(time.perf_counter() - t0, 1)
    record = Path(resolve_model_path(name)) / "training.json"
    if record.is_file():
        tr = json.loads(record.read_text())
        card["training"] = {k: tr.get(k) for k in ("train_tokens_seen", "train_seconds", "threads", "torch")}
        card["training"]["corpus_train_tokens"] = tr["corpus"]["train_tokens"]
        card["training"]["corpus_heldout_tokens"] = tr["corpus"]["heldout_tokens"]
    return card

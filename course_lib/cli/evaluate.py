"""``python -m course_lib evaluate``: the figures of a model card, measured now."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .._checks import check_flag, check_int, int_at_least
from ..bench.report import check_new_file
from ..generation import generate
from ..metrics import compile_rate, next_token_accuracy, perplexity
from ..models import count_parameters, load_model, resolve_model_path

HELP = "held-out perplexity, accuracy, compile rate and samples of a model"

SAMPLE_PROMPTS = (
    "def is_prime(n):",
    "class Stack:\n    def __init__(self):",
    "import os\n\ndef list_python_files(",
)


def read_training_record(folder: str | Path) -> dict | None:
    """The ``training.json`` beside a model's weights (None when there is none); a damaged one is a ValueError."""
    path = Path(folder) / "training.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it, or move it away to evaluate without it") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a {type(record).__name__}, not a training record (a JSON object)")
    return record


def training_summary(record: dict) -> dict:
    """The training figures a card shows, from the record of either trainer.

    ``course-tiny``'s trainer (:func:`course_lib.cli.train.train`) records ``train_seconds`` and the corpus token
    counts; the student trainer (:func:`course_lib.cli.train.train_student`) records per-stage ``seconds``, its
    teacher and the corpus hashes only. A figure a record does not hold is None, never a KeyError.
    """
    corpus = record.get("corpus") if isinstance(record.get("corpus"), dict) else {}
    seconds = record.get("seconds") if isinstance(record.get("seconds"), dict) else {}
    recipe = record.get("recipe") if isinstance(record.get("recipe"), dict) else {}
    return {
        "train_tokens_seen": record.get("train_tokens_seen"),
        "train_seconds": record.get("train_seconds", seconds.get("student_kd")),
        "threads": record.get("threads"),
        "torch": record.get("torch"),
        "corpus_train_tokens": corpus.get("train_tokens"),
        "corpus_heldout_tokens": corpus.get("heldout_tokens"),
        "teacher": recipe.get("teacher"),  # a distilled student's teacher; None for a model trained from scratch
    }


def evaluate_model(name: str = "course-tiny", max_tokens: int | None = None, n_functions: int = 64,
                   progress: bool = True) -> dict:
    """Held-out perplexity and accuracy (whole split by default), compile rate, samples, training record."""
    check_int("n_functions", n_functions, 1, " (held-out functions for the compile rate)")
    if max_tokens is not None:
        check_int("max_tokens", max_tokens, 2, " or None (None = the whole held-out split)")
    check_flag("progress", progress)
    record = read_training_record(resolve_model_path(name))  # read before minutes of evaluation, not after
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
    if record is not None:
        card["training"] = training_summary(record)
    return card


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="course-tiny")
    p.add_argument("--functions", type=int_at_least(1), default=64,
                   help="held-out functions for the compile rate")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_new_file(Path(args.json), "--json", args.overwrite)  # before the evaluation, not after it
    try:
        resolve_model_path(args.model)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from e
    card = evaluate_model(args.model, n_functions=args.functions)
    print(json.dumps(card, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(card, indent=2))
    return 0

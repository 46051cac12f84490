"""Command line: ``python -m course_lib {doctor,train,evaluate,bench,serve,loadtest,editions,grade}``.

Every argument and output path is checked before the work starts (argparse types for the numbers, the
commands' own checks for paths), so a slip fails in a second naming its flag, never after minutes of work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ._checks import check_output_path


def _cmd_train(args: argparse.Namespace) -> int:
    from .models import EMBEDDED
    from .train import TrainConfig, train

    if args.model != "course-tiny":
        from .distillation import main_train_student  # the student is trained by its own chapter

        return main_train_student(args)
    if args.teacher:
        raise ValueError("--teacher only applies to --model course-tiny-student (course-tiny trains from scratch)")
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    cfg = TrainConfig(**overrides)
    out = Path(args.out) if args.out else EMBEDDED["course-tiny"]
    record = train(cfg, out, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in record.items() if k != "corpus"}, indent=2))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    return run_doctor()


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .bench.report import check_new_file
    from .evaluate import evaluate_model
    from .models import resolve_model_path

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


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    from .bench.report import results_markdown

    result = run_bench(suites=args.suite, quick=args.quick, json_path=args.json, report_dir=args.report,
                       readme=args.readme, overwrite=args.overwrite)
    # A reader wants the tables (rounded); the full-precision numbers go to --json. Without --json the JSON
    # follows the tables, so a long run's numbers are never lost.
    print(results_markdown(result))
    if args.json:
        print(f"full results: {args.json}")
    else:
        print(json.dumps(result, indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .models import load_model
    from .serving.engine import EngineConfig
    from .serving.server import serve_forever

    model, tok = load_model(args.model)
    if args.quant:
        from .quantization import QuantConfig, quantize_

        quantize_(model, QuantConfig(bits=8) if args.quant == "int8" else QuantConfig(bits=4, group_size=32))
    cfg = EngineConfig(max_batch=args.max_batch, max_waiting=args.max_waiting)
    serve_forever(model, tok, host=args.host, port=args.port, model_name=args.model, config=cfg,
                  api_key=args.api_key)
    return 0


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from .serving.loadgen import LoadConfig, run_load

    if args.json:
        check_output_path(Path(args.json), "--json")
    rows = []
    for rate in args.rate or [None]:
        cfg = LoadConfig(requests=args.requests, rate=rate, concurrency=None if rate else args.concurrency,
                         max_tokens=args.max_tokens, seed=args.seed)
        row = run_load(args.url, cfg, model=args.model, api_key=args.api_key, budget=args.budget)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "results"}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _cmd_editions(args: argparse.Namespace) -> int:
    from .cli.editions import write_editions

    written = write_editions(Path(args.source), Path(args.out), overwrite=args.overwrite)
    print(f"{len(written)} notebooks: instructor edition in {Path(args.out) / 'source'}, student edition in "
          f"{Path(args.out) / 'release'} (nbgrader course folder {args.out})")
    return 0


def _cmd_grade(args: argparse.Namespace) -> int:
    from .bench.report import check_new_file
    from .cli.grade import GradeConfig, grade_submissions, write_gradebook

    check_new_file(Path(args.out), "--out", args.overwrite)
    cfg = GradeConfig(notebook_timeout_s=args.notebook_timeout, cell_timeout_s=args.cell_timeout)
    scores = grade_submissions(Path(args.submissions), Path(args.source), cfg)
    out_csv, out_md = write_gradebook(scores, Path(args.out))
    print(f"{len({s.learner for s in scores})} learners, {len(scores)} graded checks: {out_csv}, {out_md}")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a wrong argument or a bad file raises: reported in one line, never as a traceback."""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError)  # OSError: missing / unreadable files
    try:
        from safetensors import SafetensorError  # a truncated or corrupted weights file

        errors += (SafetensorError,)
    except ImportError:
        pass
    return errors


def _int_at_least(low: int, what: str = ""):
    """An argparse type: an int >= ``low``; argparse names the flag in its error and exits before any work."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}{what}, got {text!r}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="versions, device, bandwidth, and whether the embedded model loads")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("train", help="train the embedded model (course-tiny) from scratch, offline")
    p.add_argument("--model", default="course-tiny", choices=["course-tiny", "course-tiny-student"])
    p.add_argument("--out", help="output folder (default: the package's embedded folder)")
    p.add_argument("--steps", type=_int_at_least(1), help="training steps (default: the recipe's)")
    p.add_argument("--seed", type=_int_at_least(0), help="random seed (default: the recipe's)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder (the model's "
                   "files are replaced, other files are left alone)")
    p.add_argument("--teacher", help="course-tiny-student only: the teacher to distil (preset or folder; "
                   "default course-tiny)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="held-out perplexity, accuracy, compile rate and samples of a model")
    p.add_argument("--model", default="course-tiny")
    p.add_argument("--functions", type=_int_at_least(1), default=64,
                   help="held-out functions for the compile rate")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("bench", help="run benchmark suites and write JSON (and a report)")
    p.add_argument("--suite", action="append", help="suite name; repeat for several (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller models and fewer repeats")
    p.add_argument("--json", help="write results to this JSON file")
    p.add_argument("--report", help="write a Markdown table and plots into this folder")
    p.add_argument("--readme", help="also put the tables between the <!-- bench:begin/end --> lines of this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file and the report's "
                   "own files (results.md, pareto.png, roofline.png)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (the course's engine)")
    p.add_argument("--model", default="course-tiny", help="a preset, a folder or a hub id (what load_model takes)")
    p.add_argument("--quant", choices=["int8", "int4"], help="quantize the weights first (weight-only)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the log says which)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-batch", type=_int_at_least(1), default=8, help="requests decoded at once")
    p.add_argument("--max-waiting", type=_int_at_least(0), default=64, help="requests that may wait; more get HTTP 429")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("loadtest", help="load an OpenAI-compatible server: TTFT, TPOT, ITL, throughput, goodput")
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--rate", type=float, action="append", help="requests per second (Poisson); repeat for several")
    p.add_argument("--concurrency", type=_int_at_least(1), default=4, help="clients at once (without --rate)")
    p.add_argument("--requests", type=_int_at_least(1), default=32)
    p.add_argument("--max-tokens", type=_int_at_least(1), default=64)
    p.add_argument("--model", help="model name to send (default: the server's first model)")
    p.add_argument("--api-key")
    p.add_argument("--budget", default="customer service", help="the chapter-10 budget goodput counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows, per-request results included, to this JSON file")
    p.set_defaults(func=_cmd_loadtest)

    notebooks = str(Path(__file__).resolve().parents[1] / "notebooks")  # the single source, in a checkout
    p = sub.add_parser("editions", help="student and instructor editions of the notebooks (an nbgrader course folder)")
    p.add_argument("--out", required=True, help="folder for the editions: source/ (instructor), release/ (student)")
    p.add_argument("--source", default=notebooks, help="the source notebooks (default: this checkout's notebooks/)")
    p.add_argument("--overwrite", action="store_true", help="rebuild the editions in a non-empty --out folder")
    p.set_defaults(func=_cmd_editions)

    p = sub.add_parser("grade", help="grade submitted notebooks into a CSV and Markdown gradebook")
    p.add_argument("submissions", help="folder with one folder per learner: LEARNER/NN_name.ipynb")
    p.add_argument("--out", default="gradebook.csv", help="the CSV to write (the Markdown goes beside it)")
    p.add_argument("--source", default=notebooks, help="the source notebooks (default: this checkout's notebooks/)")
    p.add_argument("--notebook-timeout", type=float, default=900.0, help="seconds per notebook")
    p.add_argument("--cell-timeout", type=float, default=300.0, help="seconds per cell")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_cmd_grade)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except _user_errors() as e:
        hint = "a weights file is truncated or corrupted: " if type(e).__name__ == "SafetensorError" else ""
        print(f"error: {hint}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

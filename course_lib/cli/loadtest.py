"""``python -m course_lib loadtest URL``: load any OpenAI-compatible server; TTFT, TPOT, ITL, goodput."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .._checks import check_output_path, int_at_least
from ..serving.loadgen import LoadConfig, run_load

HELP = "load an OpenAI-compatible server: TTFT, TPOT, ITL, throughput, goodput"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--rate", type=float, action="append", help="requests per second (Poisson); repeat for several")
    p.add_argument("--concurrency", type=int_at_least(1), default=4, help="clients at once (without --rate)")
    p.add_argument("--requests", type=int_at_least(1), default=32)
    p.add_argument("--max-tokens", type=int_at_least(1), default=64)
    p.add_argument("--model", help="model name to send (default: the server's first model)")
    p.add_argument("--api-key")
    p.add_argument("--budget", default="customer service", help="the chapter-10 budget goodput counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows, per-request results included, to this JSON file")


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_path(Path(args.json), "--json")  # before the load, not after it
    configs = [LoadConfig(requests=args.requests, rate=rate, concurrency=None if rate else args.concurrency,
                          max_tokens=args.max_tokens, seed=args.seed) for rate in args.rate or [None]]
    rows = []
    for cfg in configs:
        row = run_load(args.url, cfg, model=args.model, api_key=args.api_key, budget=args.budget)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "results"}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0

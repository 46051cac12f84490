"""``python -m course_lib bench``: run benchmark suites, print their tables, write JSON and a report."""

from __future__ import annotations

import argparse
import json

from ..bench import run_bench
from ..bench.report import results_markdown

HELP = "run benchmark suites and write JSON (and a report)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", action="append", help="suite name; repeat for several (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller models and fewer repeats")
    p.add_argument("--json", help="write results to this JSON file")
    p.add_argument("--report", help="write a Markdown table and plots into this folder")
    p.add_argument("--readme", help="also put the tables between the <!-- bench:begin/end --> lines of this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file and the report's "
                   "own files (results.md, pareto.png, roofline.png)")


def run(args: argparse.Namespace) -> int:
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

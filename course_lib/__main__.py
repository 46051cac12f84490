"""Command line: ``python -m course_lib {doctor,train,evaluate,bench,assets,serve,loadtest,editions,grade}``.

Each subcommand is one module of ``course_lib/cli`` with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> exit code``; this file only dispatches. Every argument and output path is checked before the
work starts (argparse types for the numbers, the commands' own checks for paths), so a slip fails in a second
naming its flag, never after minutes of work.
"""

from __future__ import annotations

import argparse
import logging
import sys

from safetensors import SafetensorError

from .cli import assets, bench, doctor, editions, evaluate, grade, loadtest, serve, train

COMMANDS = {  # name -> the module that runs it
    "doctor": doctor,
    "train": train,
    "evaluate": evaluate,
    "bench": bench,
    "assets": assets,
    "serve": serve,
    "loadtest": loadtest,
    "editions": editions,
    "grade": grade,
}

# What a wrong argument or a bad file raises: reported in one line, never as a traceback.
# OSError: a missing or unreadable file; SafetensorError: a truncated or corrupted weights file.
USER_ERRORS = (ValueError, OSError, SafetensorError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.HELP)
        command.add_arguments(p)
        p.set_defaults(func=command.run)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        hint = "a weights file is truncated or corrupted: " if isinstance(e, SafetensorError) else ""
        print(f"error: {hint}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

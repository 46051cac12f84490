"""``python -m course_lib doctor``: is this machine ready for the course?"""

from __future__ import annotations

import argparse
import time

from .. import real_model
from ..machine import measure_bandwidth
from ..metrics import perplexity
from ..models import DEFAULT_MODEL, count_parameters, load_model
from ..nb import environment_report

HELP = "versions, device, bandwidth, and whether the embedded model loads"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """doctor takes no arguments."""


def run_doctor() -> int:
    """Print the report, measure bandwidth, load the embedded model; 0 when all is well."""
    ok = True
    for k, v in environment_report().items():
        print(f"{k:>16}: {v}")
    print(f"{'bandwidth':>16}: {measure_bandwidth(size_mb=128):.1f} GB/s (copy, measured now)")
    try:
        t0 = time.perf_counter()
        model, tok = load_model(DEFAULT_MODEL)
        ppl = perplexity(model, tok, max_tokens=4096)
        print(f"{'embedded model':>16}: {DEFAULT_MODEL} loads, {count_parameters(model) / 1e6:.2f}M parameters, "
              f"held-out perplexity {ppl:.2f} on 4k tokens ({time.perf_counter() - t0:.1f} s)")
    except Exception as e:  # doctor reports, it does not crash
        ok = False
        print(f"{'embedded model':>16}: FAILED - {e}")
    try:  # the real chat model: the first load converts its GGUF into the cache (once, ~20 s)
        t0 = time.perf_counter()
        model, tok = load_model(real_model.NAME)
        print(f"{'real model':>16}: {real_model.NAME} loads, {count_parameters(model) / 1e6:.1f}M parameters "
              f"({time.perf_counter() - t0:.1f} s); {real_model.model_source()}")
    except Exception as e:
        ok = False
        print(f"{'real model':>16}: FAILED - {e}")
    print("all good" if ok else "problems found (see above)")
    return 0 if ok else 1


def run(args: argparse.Namespace) -> int:
    return run_doctor()

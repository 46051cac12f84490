"""``python -m course_lib serve``: a model behind the course's OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse

from .._checks import int_at_least
from ..models import load_model
from ..quantization import preset, quantize_
from ..serving.engine import EngineConfig

HELP = "serve a model over an OpenAI-compatible HTTP API (the course's engine)"
QUANT_PRESETS = {"int8": "int8-wo", "int4": "int4-wo-g32"}  # --quant -> the preset table's name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="course-tiny", help="a preset, a folder or a hub id (what load_model takes)")
    p.add_argument("--quant", choices=sorted(QUANT_PRESETS), help="quantize the weights first (weight-only)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="port (0: any free port; the log says which)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-batch", type=int_at_least(1), default=8, help="requests decoded at once")
    p.add_argument("--max-waiting", type=int_at_least(0), default=64, help="requests that may wait; more get HTTP 429")


def run(args: argparse.Namespace) -> int:
    # The HTTP stack (FastAPI, uvicorn, sse-starlette) is the `serve` extra: only this command needs it.
    from ..serving.server import serve_forever

    cfg = EngineConfig(max_batch=args.max_batch, max_waiting=args.max_waiting)  # checked before the model loads
    model, tok = load_model(args.model)
    if args.quant:
        quantize_(model, preset(QUANT_PRESETS[args.quant]))
    serve_forever(model, tok, host=args.host, port=args.port, model_name=args.model, config=cfg,
                  api_key=args.api_key)
    return 0

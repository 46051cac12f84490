"""Serving: why servers batch (a simulation on a virtual clock), the engine behind an HTTP server, a load generator.

* :mod:`.simulation` - static vs continuous batching, the paged KV cache, prefix caching and chunked prefill,
  every forward pass real and timed, the clock virtual (chapter 10's figures);
* :mod:`.scheduler` - the one scheduler both the simulation and the engine drive (:func:`schedule_step`);
* :mod:`.engine` - that scheduler on the wall clock, in its own thread: requests join the running batch;
* :mod:`.server` - the engine behind an OpenAI-compatible HTTP API (FastAPI, uvicorn, sse-starlette);
* :mod:`.loadgen` - an OpenAI-API load generator: Poisson or fixed-concurrency load, TTFT / TPOT / ITL, goodput.

The server and the load generator need the ``serve`` extra (``pip install -e ".[serve]"``); they are
imported on first use, so the simulation works without it.
"""

from __future__ import annotations

from .engine import Engine, EngineConfig, EngineStopped, QueueFull, RequestHandle
from .scheduler import PagedBatch, Scheduler, schedule_step
from .simulation import (
    KV_LAYOUTS,
    POLICIES,
    Finished,
    Request,
    ServeConfig,
    ServeReport,
    batch_sweep,
    interleaved_runs,
    others_latency,
    poisson_requests,
    serve,
    spread,
    with_long_prompt,
)

__all__ = [
    "KV_LAYOUTS", "POLICIES", "Engine", "EngineConfig", "EngineStopped", "Finished", "PagedBatch", "QueueFull",
    "Request", "RequestHandle", "Scheduler", "ServeConfig", "ServeReport", "batch_sweep",
    "interleaved_runs", "others_latency", "poisson_requests", "schedule_step", "serve", "spread",
    "start_server", "with_long_prompt",
]


def start_server(*args, **kwargs):
    """Start the OpenAI-compatible server in this process: see :func:`course_lib.serving.server.start_server`."""
    from .server import start_server as _start

    return _start(*args, **kwargs)

"""The serving engine: the course's continuous batching on the wall clock, in a thread of its own.

The simulation (:mod:`.simulation`) shows what continuous batching, the paged KV cache, prefix caching and
chunked prefill buy on a virtual clock. The engine runs the *same* :class:`~.scheduler.PagedBatch` - same
scheduler, same admission rule - in a background thread, on real time: :meth:`Engine.submit` may be called
from any thread at any moment, and a request that arrives while others decode joins the running batch at
the next iteration. Each new token goes to the request's *sink* as it is made (the HTTP server forwards it
to its client), so a client sees its answer stream while other answers are still being computed.

Greedy decoding gives token for token what offline generation gives for the same prompt, whatever else is
in the batch: each row attends only to its own blocks (tested).
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .._checks import check_flag, check_int, check_number
from ..models import check_token_ids
from ..scratch_llama import ScratchLlama
from .scheduler import PagedBatch, Row, blocks_needed

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests wait than the engine's queue holds: try again later (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches.

    ``max_batch`` requests decode at once; the KV pool has ``kv_blocks`` blocks of ``block_size`` tokens
    (None: room for ``max_batch`` requests of 512 tokens, and always for one of ``max_context``);
    ``max_context`` caps prompt + answer (None: the model's ``max_position_embeddings``, at most 2048);
    ``prefill_chunk`` prompt tokens are prefilled between two decode steps (None: whole prompts);
    ``max_waiting`` requests may wait for admission, more are refused (:class:`QueueFull`).
    """

    max_batch: int = 8
    block_size: int = 16
    kv_blocks: int | None = None
    max_context: int | None = None
    prefix_cache: bool = True
    prefill_chunk: int | None = 128
    max_waiting: int = 64

    def __post_init__(self):
        check_int("max_batch", self.max_batch, 1, " (the most requests decoded at once)")
        check_int("block_size", self.block_size, 1, " (tokens per KV block)")
        for name in ("kv_blocks", "max_context", "prefill_chunk"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, ", or None for the default")
        check_flag("prefix_cache", self.prefix_cache)
        check_int("max_waiting", self.max_waiting, 0, " (requests that may wait for admission)")

    def resolve(self, model_context: int | None) -> tuple[int, int]:
        """(max_context, kv_blocks) for a model whose position limit is ``model_context``."""
        ctx = self.max_context or min(model_context or 2048, 2048)
        if model_context and ctx > model_context:
            raise ValueError(f"max_context={ctx} is beyond the model's {model_context} positions; give at most "
                             f"{model_context}")
        blocks = self.kv_blocks or max(self.max_batch * blocks_needed(512, self.block_size),
                                       blocks_needed(ctx, self.block_size))
        if blocks < blocks_needed(ctx, self.block_size):
            raise ValueError(f"kv_blocks={blocks} cannot hold one request of max_context={ctx} tokens "
                             f"({blocks_needed(ctx, self.block_size)} blocks of {self.block_size}); give more "
                             "blocks or a smaller max_context")
        return ctx, blocks


@dataclass(frozen=True)
class TokenEvent:
    """One new token of a request (``token`` None when it ended without one); ``finish_reason`` on its last."""

    token: int | None
    finish_reason: str | None = None  # "length", "stop", "abort", "error"


class RequestHandle:
    """A submitted request: its id, and (without a sink of your own) its tokens as they come."""

    def __init__(self, engine: Engine, rid: int, n_prompt: int):
        self.engine, self.rid, self.n_prompt = engine, rid, n_prompt
        self._events: queue.Queue[TokenEvent] = queue.Queue()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Every event of this request, up to its last (blocks; ``timeout`` seconds per event at most)."""
        while True:
            try:
                ev = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.rid}: no token within {timeout} s") from None
            yield ev
            if ev.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> tuple[list[int], str]:
        """(every generated token, the finish reason), once the request is done."""
        toks, reason = [], None
        for ev in self.events(timeout):
            if ev.token is not None:
                toks.append(ev.token)
            reason = ev.finish_reason
        return toks, reason

    def cancel(self) -> None:
        self.engine.cancel(self.rid)


class Engine:
    """Continuous batching over the paged KV cache, in a background thread, on the wall clock.

    ``model``: a Hugging Face Llama-family model (quantized or pruned ones too) or a ScratchLlama;
    ``eos_token_id``: the default stop token. Use as a context manager, or call :meth:`stop`.
    """

    def __init__(self, model, config: EngineConfig | None = None, eos_token_id: int | None = None):
        self.config = config or EngineConfig()
        if not isinstance(self.config, EngineConfig):
            raise ValueError(f"config must be an EngineConfig, got {type(self.config).__name__}")
        self.scratch = model if isinstance(model, ScratchLlama) else ScratchLlama(model)
        self.model = self.scratch.hf_model
        self.max_context, self.kv_blocks = self.config.resolve(
            getattr(self.model.config, "max_position_embeddings", None))
        self.eos_token_id = eos_token_id
        self._lock = threading.Condition()
        self._inbox: list[tuple[Row, Callable[[TokenEvent], None]]] = []
        self._cancels: list[int] = []
        self._sinks: dict[int, Callable[[TokenEvent], None]] = {}
        self._ids = itertools.count()
        self._state = "running"  # -> "draining" -> "stopped"
        self.batch = PagedBatch(self.scratch, self.config.max_batch, self.kv_blocks, self.config.block_size,
                                self.config.prefix_cache, self.config.prefill_chunk, lambda dt: time.perf_counter(),
                                on_token=self._on_token, on_free=self._on_free)
        self.tokens_total = 0
        self.requests_total: dict[str, int] = {}
        self.errors = 0
        self._recent: deque[float] = deque()  # clock of each token in the last few seconds
        self._thread = threading.Thread(target=self._loop, name="course-engine", daemon=True)
        self._thread.start()

    # --- the caller's side (any thread) ------------------------------------------------

    def submit(self, prompt_ids, max_new_tokens: int, *, stop_ids=None, temperature: float = 0.0, seed: int = 0,
               sink: Callable[[TokenEvent], None] | None = None) -> RequestHandle:
        """Queue a request; its tokens go to ``sink`` (called from the engine thread) or to the handle.

        ``stop_ids``: tokens that end the answer (default: the EOS token); ``temperature`` 0 is greedy.
        Raises ValueError for a request that cannot run (bad ids, too long), :class:`QueueFull` when too
        many wait, :class:`EngineStopped` while draining.
        """
        ids = prompt_ids if isinstance(prompt_ids, torch.Tensor) else torch.tensor(list(prompt_ids), dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError("prompt_ids must be a non-empty list of token ids")
        check_token_ids(self.model, ids, "prompt_ids")
        check_int("max_new_tokens", max_new_tokens, 1, " (tokens to generate)")
        check_number("temperature", temperature, ">= 0 and finite (0 is greedy)", lambda v: 0 <= v < math.inf)
        prompt = tuple(ids.tolist())
        if len(prompt) + max_new_tokens > self.max_context:
            raise ValueError(f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context of {self.max_context} tokens; shorten the prompt or ask for fewer tokens")
        stops = frozenset([self.eos_token_id] if stop_ids is None and self.eos_token_id is not None
                          else stop_ids or ())
        gen = torch.Generator(device=self.scratch.device).manual_seed(seed) if temperature > 0 else None
        with self._lock:
            if self._state != "running":
                raise EngineStopped("the engine is shutting down and takes no new requests")
            if self.waiting >= self.config.max_waiting:
                raise QueueFull(f"{self.waiting} requests are already waiting (max_waiting="
                                f"{self.config.max_waiting}); try again shortly")
            rid = next(self._ids)
            handle = RequestHandle(self, rid, len(prompt))
            row = Row(rid, prompt, max_new_tokens, stops, float(temperature), gen, arrival=time.perf_counter())
            self._inbox.append((row, sink or handle._events.put))
            self._lock.notify()
        return handle

    def generate(self, prompt_ids, max_new_tokens: int, **kwargs) -> list[int]:
        """Submit and wait: the generated token ids (the stop token included when one ended the answer)."""
        return self.submit(prompt_ids, max_new_tokens, **kwargs).result()[0]

    def cancel(self, rid: int) -> None:
        """End request ``rid``: its KV blocks go back to the pool at the engine's next iteration."""
        with self._lock:
            self._cancels.append(rid)
            self._lock.notify()

    @property
    def waiting(self) -> int:
        """Requests submitted but not yet admitted to the batch."""
        return len(self._inbox) + len(self.batch.pending)

    @property
    def running(self) -> int:
        return sum(not r.done for r in list(self.batch.rows.values()))

    def stats(self) -> dict:
        """What /metrics shows: requests, KV blocks, prefix-cache hits, tokens/s over the last 10 s."""
        alloc = self.batch.cache.alloc
        now = time.perf_counter()
        recent = [t for t in list(self._recent) if now - t <= 10.0]
        return dict(running=self.running, waiting=self.waiting, kv_blocks_total=alloc.num_blocks,
                    kv_blocks_used=alloc.used, kv_blocks_free=alloc.num_free, prefix_cache_hit_blocks=alloc.hits,
                    tokens_total=self.tokens_total, tokens_per_s=len(recent) / 10.0,
                    requests_total=dict(self.requests_total), engine_errors=self.errors, state=self._state)

    def stop(self, drain: bool = True, timeout: float | None = 60.0) -> None:
        """Take no new requests; ``drain`` lets running and waiting ones finish, else they are aborted."""
        with self._lock:
            if self._state == "stopped":
                return
            self._state = "draining"
            if not drain:
                self._cancels.extend([r.rid for r, _ in self._inbox] + list(self.batch.pending)
                                     + list(self.batch.rows))
            self._lock.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():  # the drain took too long: abort the rest
            with self._lock:
                self._cancels.extend(list(self.batch.pending) + list(self.batch.rows))
                self._lock.notify()
            self._thread.join(10.0)
        self._state = "stopped"

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(drain=False)

    # --- the engine thread -------------------------------------------------------------

    def _on_token(self, row: Row, token: int) -> None:
        self.tokens_total += 1
        now = row.times[-1]
        self._recent.append(now)
        while self._recent and now - self._recent[0] > 10.0:
            self._recent.popleft()
        self._send(row.rid, TokenEvent(token, row.finish_reason))

    def _on_free(self, row: Row) -> None:
        self.requests_total[row.finish_reason] = self.requests_total.get(row.finish_reason, 0) + 1
        # a request cancelled or failed before its last token has not been told it ended
        if row.finish_reason in ("abort", "error"):
            self._send(row.rid, TokenEvent(None, row.finish_reason))
        self._sinks.pop(row.rid, None)

    def _send(self, rid: int, ev: TokenEvent) -> None:
        sink = self._sinks.get(rid)
        if sink is None:
            return
        try:
            sink(ev)
        except Exception:  # a sink of a client that went away must not stop the engine
            log.exception("request %d: its sink failed; cancelling it", rid)
            self.batch.cancel(rid)
        if ev.finish_reason is not None:
            self._sinks.pop(rid, None)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._inbox or self._cancels or self.batch.busy or self._state != "running"):
                        self._lock.wait()
                    inbox, self._inbox = self._inbox, []
                    cancels, self._cancels = self._cancels, []
                    if self._state != "running" and not inbox and not self.batch.busy:
                        break
                for row, sink in inbox:
                    self._sinks[row.rid] = sink
                    self.batch.add(row)
                for rid in cancels:
                    self.batch.cancel(rid)
                try:
                    self.batch.step()
                except Exception:  # never a dead engine: fail the running requests, keep serving
                    self.errors += 1
                    log.exception("a forward pass failed; ending the running requests with an error")
                    for row in self.batch.abort_running("error"):
                        self._send(row.rid, TokenEvent(None, "error"))

"""The course's engine behind an OpenAI-compatible HTTP API: FastAPI + uvicorn + sse-starlette.

The stack is the one llama-cpp-python's own server runs on; the official ``openai`` client and ``curl`` work
against it unchanged. Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream: true``
sends server-sent events in the OpenAI chunk format, ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text).

A server that behaves: a bad request (malformed JSON, unknown model, no messages, ``max_tokens`` <= 0 or
beyond the context, a prompt longer than the context, token ids outside the vocabulary) gets HTTP 400 with
an OpenAI-style error body and the engine keeps serving; a client that disconnects mid-answer has its
request cancelled and its KV blocks freed at the engine's next iteration; requests beyond the engine's
bounded queue get 429 with ``Retry-After``, and 503 while the server drains; it binds 127.0.0.1 unless told
otherwise, and checks ``Authorization: Bearer <key>`` when given an API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineConfig, EngineStopped, QueueFull, TokenEvent

log = logging.getLogger(__name__)

# ChatML, for a tokenizer without a chat template of its own (course-tiny): the layout SmolLM2's template uses
_FALLBACK_CHAT = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
                 "<|im_start|>assistant\n"


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Common):
    prompt: str | list[int]


@dataclass
class _State:
    engine: Engine
    tokenizer: object
    model_name: str
    api_key: str | None
    default_max_tokens: int
    created: int


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The prompt text of a chat: the tokenizer's chat template (ChatML where it has none), answer header last."""
    template = None if getattr(tokenizer, "chat_template", None) else _FALLBACK_CHAT
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, text: str) -> list[int]:
    """Prompt text -> ids, as the course's offline generation encodes it (no extra special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _TextStream:
    """Token ids -> the text they add, whole characters only; cuts at a stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, token: int | None, final: bool = False) -> str:
        if token is not None:
            self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                text, self.stopped, final = text[:at], True, True
        if not final:
            if text.endswith("\ufffd"):
                return ""  # half a character: wait for the token that completes it
            # text that may be the start of a stop string waits until the next token says whether it is
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        if len(text) <= len(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


def _error_from_validation(exc: RequestValidationError) -> APIError:
    err = (exc.errors() or [{}])[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('msg', '')}", code="invalid_json")
    if not loc:
        return APIError(400, "the request body must be a JSON object (send Content-Type: application/json)",
                        code="invalid_json")
    where = ".".join(loc)
    return APIError(400, f"{where}: {err.get('msg', 'invalid value')}", param=loc[0] if loc else None)


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI app serving ``engine`` (which the caller starts and stops) under the name ``model_name``."""
    app = FastAPI(title="course_lib OpenAI-compatible server")
    st = _State(engine, tokenizer, model_name, api_key, default_max_tokens, int(time.time()))
    app.state.course = st

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error_from_validation(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404
                        else "invalid_request_error").response()

    def authorize(request: Request) -> None:
        if st.api_key is not None and request.headers.get("authorization") != f"Bearer {st.api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        s = engine.stats()
        return JSONResponse({"status": "ok" if s["state"] == "running" else s["state"]},
                            status_code=200 if s["state"] == "running" else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created,
                                            "owned_by": "course_lib", "max_model_len": engine.max_context}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        authorize(request)
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise APIError(400, "prompt is empty; give at least one character", param="prompt")
            ids = encode(tokenizer, body.prompt)
        else:
            ids = list(body.prompt)
        return await _generate(request, st, body, ids, chat=False, default_max=16)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        authorize(request)
        msgs = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                for m in body.messages]
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        ids = encode(tokenizer, chat_text(tokenizer, msgs))
        return await _generate(request, st, body, ids, chat=True, default_max=st.default_max_tokens)

    return app


async def _generate(request: Request, st: _State, body: _Common, ids: list[int], chat: bool, default_max: int):
    """Validate, submit to the engine, answer whole or as a stream of server-sent events."""
    engine = st.engine
    if body.model != st.model_name:
        raise APIError(400, f"model {body.model!r} is not served here; this server serves {st.model_name!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")
    if body.n != 1:
        raise APIError(400, f"n={body.n}: this server returns one choice per request; send n=1", param="n")
    if not ids:
        raise APIError(400, "the prompt has no tokens", param="prompt")
    room = engine.max_context - len(ids)
    if room < 1:
        raise APIError(400, f"the prompt has {len(ids)} tokens; the context holds {engine.max_context} (and the "
                       "answer needs at least one): shorten it", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    max_tokens = min(default_max, room) if body.max_tokens is None else body.max_tokens
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    if max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {len(ids)} tokens exceeds the context of "
                       f"{engine.max_context}; ask for at most {room}", param="max_tokens",
                       code="context_length_exceeded")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[TokenEvent] = asyncio.Queue()

    def sink(ev: TokenEvent) -> None:  # called from the engine thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:  # the event loop is gone (server stopped): nobody to tell
            pass

    try:
        handle = engine.submit(ids, max_tokens, temperature=body.temperature or 0.0, seed=body.seed or 0, sink=sink)
    except ValueError as e:
        raise APIError(400, str(e), param="prompt") from None
    except QueueFull as e:
        raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    except EngineStopped as e:
        raise APIError(503, str(e), "server_error", code="shutting_down", headers={"Retry-After": "5"}) from None

    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    text = _TextStream(st.tokenizer, stops)
    eos = engine.eos_token_id

    def piece(ev: TokenEvent) -> tuple[str, str | None]:
        """(new text, finish reason) of one engine event."""
        tok = None if ev.token is None or ev.token == eos else ev.token
        new = text.push(tok, final=ev.finish_reason is not None)
        reason = ev.finish_reason
        if text.stopped:
            reason = "stop"
        return new, reason

    def usage(n: int) -> dict:
        return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

    if not body.stream:
        n, parts, reason = 0, [], None
        try:
            while reason is None:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                n += ev.token is not None
                new, reason = piece(ev)
                parts.append(new)
                if text.stopped and ev.finish_reason is None:
                    handle.cancel()
        except asyncio.CancelledError:
            handle.cancel()
            raise
        if reason in ("error", "abort"):
            raise APIError(503 if reason == "abort" else 500, f"the request ended early ({reason}): the engine "
                           "failed or is shutting down; try again", "server_error", code=reason)
        out = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": reason}
                  if chat else {"index": 0, "text": out, "finish_reason": reason, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": st.model_name, "choices": [choice], "usage": usage(n)}

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(content: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if content is None else {"content": content})
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": content or "", "finish_reason": reason, "logprobs": None}
        obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
               "model": st.model_name, "choices": [choice]}
        if include_usage:
            obj["usage"] = None
        return json.dumps(obj)

    async def stream():
        n, reason = 0, None
        try:
            if chat:
                yield chunk(None, None, role=True)
            while reason is None:
                ev = await events.get()
                n += ev.token is not None
                new, reason = piece(ev)
                if text.stopped and ev.finish_reason is None:
                    handle.cancel()
                if new:
                    yield chunk(new, None)
            if reason in ("error", "abort"):
                yield json.dumps({"error": {"message": f"the request ended early ({reason}): the engine failed or "
                                            "is shutting down; try again", "type": "server_error", "param": None,
                                            "code": reason}})
                return
            yield chunk(None, reason)
            if include_usage:
                yield json.dumps({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                  "created": created, "model": st.model_name, "choices": [], "usage": usage(n)})
            yield "[DONE]"
        finally:  # the client went away (or we are done): a no-op for a finished request
            if reason is None:
                handle.cancel()

    return EventSourceResponse(stream(), ping=15)


def prometheus_text(s: dict) -> str:
    """The engine's figures in the Prometheus text format."""
    lines = []

    def metric(name: str, kind: str, help_: str, value, labels: str = "") -> None:
        if not any(line.startswith(f"# TYPE {name} ") for line in lines):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.append(f"{name}{labels} {value}")

    metric("course_requests_running", "gauge", "Requests in the running batch.", s["running"])
    metric("course_requests_waiting", "gauge", "Requests waiting for admission.", s["waiting"])
    metric("course_kv_blocks_used", "gauge", "KV cache blocks some request holds.", s["kv_blocks_used"])
    metric("course_kv_blocks_free", "gauge", "KV cache blocks on the free list.", s["kv_blocks_free"])
    metric("course_kv_blocks_total", "gauge", "KV cache blocks in the pool.", s["kv_blocks_total"])
    metric("course_prefix_cache_hit_blocks_total", "counter", "KV blocks reused from the prefix cache.",
           s["prefix_cache_hit_blocks"])
    metric("course_generation_tokens_total", "counter", "Tokens generated.", s["tokens_total"])
    metric("course_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           f"{s['tokens_per_s']:.3f}")
    for reason, n in sorted(s["requests_total"].items()):
        metric("course_requests_finished_total", "counter", "Finished requests by finish reason.", n,
               f'{{finish_reason="{reason}"}}')
    metric("course_engine_errors_total", "counter", "Forward passes that failed.", s["engine_errors"])
    return "\n".join(lines) + "\n"


class ServerHandle:
    """A server running in a background thread of this process: ``.url``, ``.engine``, ``.stop()``."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, engine: Engine, url: str, model_name: str):
        self.server, self.thread, self.engine, self.url, self.model_name = server, thread, engine, url, model_name

    @property
    def base_url(self) -> str:
        """The OpenAI client's ``base_url``."""
        return self.url + "/v1"

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Drain the engine (running answers finish), then stop the HTTP server."""
        self.engine.stop(drain=drain, timeout=timeout)
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(drain=False)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port (0 = any free "
                         "port)") from None
    return sock


def _build(model, tokenizer, model_name: str | None, config: EngineConfig | None, api_key: str | None,
           default_max_tokens: int):
    engine = Engine(model, config, eos_token_id=getattr(tokenizer, "eos_token_id", None))
    name = model_name or getattr(model.config, "_name_or_path", None) or "course-model"
    return engine, create_app(engine, tokenizer, name, api_key, default_max_tokens), name


def start_server(model, tokenizer, port: int = 0, host: str = "127.0.0.1", model_name: str | None = None,
                 config: EngineConfig | None = None, api_key: str | None = None,
                 default_max_tokens: int = 256) -> ServerHandle:
    """Serve ``model`` over the OpenAI API from a background thread; returns once it accepts connections.

    ``port=0`` picks a free port (``handle.url`` says which). Stop it with ``handle.stop()``, or use
    ``with start_server(...) as h:``.
    """
    sock = _bind(host, port)
    engine, app, name = _build(model, tokenizer, model_name, config, api_key, default_max_tokens)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), name="course-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            engine.stop(drain=False)
            raise RuntimeError("the HTTP server did not start; see the log above")
        time.sleep(0.02)
    h, p = sock.getsockname()[:2]
    return ServerHandle(server, thread, engine, f"http://{'[' + h + ']' if ':' in h else h}:{p}", name)


def serve_forever(model, tokenizer, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                  config: EngineConfig | None = None, api_key: str | None = None,
                  default_max_tokens: int = 256) -> None:
    """Serve in the foreground until SIGINT / SIGTERM, then drain: running answers finish, new ones get 503."""
    sock = _bind(host, port)
    engine, app, name = _build(model, tokenizer, model_name, config, api_key, default_max_tokens)

    class _Draining(uvicorn.Server):
        def handle_exit(self, sig, frame):  # stop taking requests at once; uvicorn then waits for open ones
            threading.Thread(target=engine.stop, kwargs=dict(drain=True, timeout=30.0), daemon=True).start()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                # drained: exit normally (status 0) instead of uvicorn raising the signal again once it stopped
                getattr(self, "_captured_signals", []).clear()

    server = _Draining(uvicorn.Config(app, log_level="info", lifespan="off", timeout_graceful_shutdown=30))
    h, p = sock.getsockname()[:2]
    log.info("serving %s at http://%s:%d/v1 (Ctrl-C drains and stops)", name, h, p)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop(drain=False, timeout=5.0)
    log.info("drained and stopped")

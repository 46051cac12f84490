"""The OpenAI-compatible server: a real server on 127.0.0.1, the openai client and httpx talking to it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from course_lib.generation import generate_kv_cache  # noqa: E402
from course_lib.serving import EngineConfig, start_server  # noqa: E402
from course_lib.serving.loadgen import LoadConfig, run_load  # noqa: E402
from course_lib.serving.server import chat_text, encode  # noqa: E402

NAME = "course-tiny"
PROMPTS = ["def parse(", "import os\n\n\nclass Reader:\n    def __init__(self, path):\n        self.path", "x = "]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(course_tiny):
    model, tok = course_tiny
    h = start_server(model, tok, port=0, model_name=NAME,
                     config=EngineConfig(max_batch=8, block_size=8, prefill_chunk=32, max_waiting=64))
    try:
        yield h
    finally:
        h.stop(drain=False)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def offline_text(course_tiny, text: str, n: int) -> str:
    model, tok = course_tiny
    toks = generate_kv_cache(model, torch.tensor(encode(tok, text)), n)[0].tolist()
    if tok.eos_token_id in toks:  # offline greedy stops after EOS, as the server does
        toks = toks[:toks.index(tok.eos_token_id) + 1]
    return tok.decode([t for t in toks if t != tok.eos_token_id], skip_special_tokens=True)


def wait_for_idle(server, timeout: float = 30.0) -> dict:
    """The engine's figures once nothing runs or waits (finished requests leave at its next iteration)."""
    deadline = time.monotonic() + timeout
    while True:
        s = server.engine.stats()
        if (s["running"] == 0 and s["waiting"] == 0 and s["kv_blocks_used"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def test_completions_equal_offline_greedy_whole_and_streamed(server, client, course_tiny):
    for text, n in zip(PROMPTS, (30, 12, 20)):
        want = offline_text(course_tiny, text, n)
        got = client.completions.create(model=NAME, prompt=text, max_tokens=n, temperature=0)
        assert got.choices[0].text == want
        assert got.usage.prompt_tokens == len(encode(course_tiny[1], text))
        parts = [c.choices[0].text for c in client.completions.create(model=NAME, prompt=text, max_tokens=n,
                                                                      stream=True)]
        assert "".join(parts) == want and len(parts) > 1


def test_chat_equals_offline_greedy_whole_and_streamed(server, client, course_tiny):
    msgs = [{"role": "system", "content": "You answer in Python."}, {"role": "user", "content": "read a file"}]
    want = offline_text(course_tiny, chat_text(course_tiny[1], msgs), 24)
    got = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=24)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_sse_wire_format_ends_with_done(server):
    body = dict(model=NAME, prompt=[5, 6, 7], max_tokens=3, stream=True)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    assert all(json.loads(d)["object"] == "text_completion" for d in data[:-1])


def test_models_health_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME]
    text = httpx.get(server.url + "/metrics").text
    for name in ("course_requests_running", "course_requests_waiting", "course_kv_blocks_used",
                 "course_kv_blocks_free", "course_prefix_cache_hit_blocks_total",
                 "course_generation_tokens_per_second"):
        assert re.search(rf"^{name} [0-9.]+$", text, re.M), name


BAD = [
    ("/v1/chat/completions", b"{not json", "JSON"),
    ("/v1/chat/completions", dict(model="gpt-5", messages=[{"role": "user", "content": "hi"}]), "not served"),
    ("/v1/chat/completions", dict(model=NAME), "messages"),
    ("/v1/chat/completions", dict(model=NAME, messages=[]), "messages"),
    ("/v1/chat/completions", dict(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=0),
     "max_tokens"),
    ("/v1/completions", dict(model=NAME, prompt="x", max_tokens=-3), "max_tokens"),
    ("/v1/completions", dict(model=NAME, prompt="x", max_tokens=100_000), "exceeds the context"),
    ("/v1/completions", dict(model=NAME, prompt="def f(x):\n    return x\n" * 200, max_tokens=4), "context"),
    ("/v1/completions", dict(model=NAME, prompt=[1, 2, 10**6], max_tokens=4), "vocabulary"),
    ("/v1/completions", dict(model=NAME, prompt=[1, -5], max_tokens=4), "vocabulary"),
    ("/v1/completions", dict(model=NAME, prompt="x", n=2), "n=2"),
]


@pytest.mark.parametrize("path, body, match", BAD, ids=[
    "malformed-json", "unknown-model", "no-messages", "empty-messages", "max-tokens-0", "max-tokens-negative",
    "max-tokens-beyond-context", "prompt-beyond-context", "token-id-too-big", "token-id-negative", "n-2"])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, path, body, match):
    kw = (dict(content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes)
          else dict(json=body))
    r = httpx.post(server.url + path, timeout=60, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert match in err["message"] and err["type"] == "invalid_request_error"
    ok = httpx.post(server.url + "/v1/completions", json=dict(model=NAME, prompt="x = ", max_tokens=2), timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_disconnect_mid_stream_frees_every_block(server):
    body = dict(model=NAME, prompt="def parse(", max_tokens=400, stream=True)
    aborted = server.engine.stats()["requests_total"].get("abort", 0)
    with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/completions", json=body) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data:")
            if got == 5:
                assert server.engine.stats()["kv_blocks_used"] > 0
                break  # leaving the block closes the connection mid-answer
    s = wait_for_idle(server)
    assert s["kv_blocks_used"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]
    assert s["requests_total"].get("abort", 0) == aborted + 1  # cancelled, not run to its 400 tokens


def test_soak_concurrent_streaming_clients(server, course_tiny):
    want = {t: offline_text(course_tiny, t, 16) for t in PROMPTS}

    async def one(c: httpx.AsyncClient, text: str) -> str:
        out = []
        async with c.stream("POST", server.url + "/v1/completions",
                            json=dict(model=NAME, prompt=text, max_tokens=16, stream=True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    out.append(json.loads(line[5:])["choices"][0]["text"])
        return "".join(out)

    async def client_(c, i):
        return [(t, await one(c, t)) for t in (PROMPTS[i % 3], PROMPTS[(i + 1) % 3])]

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None)) as c:
            return await asyncio.gather(*(client_(c, i) for i in range(16)))

    results = [x for per_client in asyncio.run(main()) for x in per_client]
    assert len(results) == 32 and all(got == want[t] for t, got in results)
    s = wait_for_idle(server)
    assert s["kv_blocks_used"] == 0 and s["engine_errors"] == 0


def test_loadgen_measures_the_course_server(server):
    row = run_load(server.url, LoadConfig(requests=6, concurrency=3, max_tokens=8))
    assert row["errors"] == 0 and row["model"] == NAME and len(row["results"]) == 6
    assert row["ttft_p50_ms"] > 0 and row["itl_p90_ms"] >= row["itl_p50_ms"] > 0 and row["throughput_tok_s"] > 0
    assert 0 <= row["met_budget"] <= 6 and row["goodput_req_s"] <= row["throughput_req_s"]


def test_a_full_queue_gets_429_with_retry_after_and_the_api_key_is_checked(course_tiny):
    model, tok = course_tiny
    h = start_server(model, tok, model_name=NAME, api_key="sesame",
                     config=EngineConfig(max_batch=1, block_size=8, max_waiting=1))
    try:
        auth = {"Authorization": "Bearer sesame"}
        assert httpx.get(h.url + "/v1/models").status_code == 401
        assert httpx.get(h.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(h.url + "/v1/models", headers=auth).status_code == 200
        body = dict(model=NAME, prompt="def parse(", max_tokens=300, stream=True)

        async def main():
            async with httpx.AsyncClient(timeout=60, headers=auth) as c:
                streams = [c.stream("POST", h.url + "/v1/completions", json=body) for _ in range(2)]
                held = [await s.__aenter__() for s in streams]  # one runs, one waits: the queue is full
                r = await c.post(h.url + "/v1/completions", json=body)
                for s in streams:
                    await s.__aexit__(None, None, None)
                return [x.status_code for x in held], r

        codes, refused = asyncio.run(main())
        assert codes == [200, 200] and refused.status_code == 429
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
        s = wait_for_idle(h)
        assert s["kv_blocks_used"] == 0
    finally:
        h.stop(drain=False)


@pytest.mark.slow  # a fresh process imports torch and loads the model: ~50 s on a busy 2-core machine
def test_cli_serve_drains_and_stops_on_sigterm():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-m", "course_lib", "serve", "--model", NAME, "--port", "0"],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = p.stderr.readline()
            if not line:
                break
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            url = m and m.group(1)
        assert url, "the server never said where it listens"
        r = httpx.post(url + "/v1/completions", json=dict(model=NAME, prompt="x = ", max_tokens=3), timeout=60)
        assert r.status_code == 200
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        assert "drained and stopped" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()

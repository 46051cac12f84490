"""The serve-real suite's plumbing: two servers, the same load interleaved, rows, the goal, servers always stopped.

Course-tiny servers stand in for both engines (one of them one request at a time, as llama.cpp's Python server
decodes), so this runs in seconds without llama.cpp; the llama.cpp subprocess has a test of its own that skips
where llama-cpp-python is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
psutil = pytest.importorskip("psutil")

from course_lib.bench import serve_real  # noqa: E402
from course_lib.serving import EngineConfig, start_server  # noqa: E402


class Recorder:
    """Server factories over course-tiny that remember every server they started."""

    def __init__(self, model, tok):
        self.model, self.tok, self.handles = model, tok, []

    def factory(self, max_batch: int):
        @contextlib.contextmanager
        def start():
            with start_server(self.model, self.tok, port=0, model_name="course-tiny",
                              config=EngineConfig(max_batch=max_batch, block_size=8, prefill_chunk=32)) as h:
                self.handles.append(h)
                yield h.url
        return start


def stopped(handle) -> bool:
    return handle.engine.stats()["state"] == "stopped" and not handle.thread.is_alive()


def test_the_same_load_runs_against_both_servers_rates_interleaved(course_tiny):
    rec = Recorder(*course_tiny)
    servers = {serve_real.COURSE: rec.factory(8), serve_real.LLAMA: rec.factory(1)}
    out = serve_real.run(quick=True, servers=servers, rates=[4.0, 16.0], requests=4, max_tokens=4, threads=1)
    rows = out["rows"]
    assert [(r["engine"], r["rate_req_s"]) for r in rows] == [
        (serve_real.COURSE, 4.0), (serve_real.LLAMA, 4.0), (serve_real.COURSE, 16.0), (serve_real.LLAMA, 16.0)]
    for r in rows:
        assert set(r) == set(serve_real.COLUMNS)
        assert r["suite"] == "serve-real" and r["requests"] == 4 and r["errors"] == 0 and r["threads"] == 1
        assert r["ttft_p50_ms"] <= r["ttft_p90_ms"] <= r["ttft_p99_ms"]
        assert 0 <= r["goodput_req_s"] <= r["throughput_req_s"]
        assert r["meets_budget"] == (r["met_budget"] >= serve_real.MEETS_SHARE * r["requests"])
    g = out["machine"]["serve_real_goal"]
    assert g["goal"] == serve_real.GOAL_RATIO and g["budget"] == "customer service"
    assert set(out["machine"]["serve_real_serial_s"]) == set(servers)
    assert len(out["machine"]["serve_real_verdicts"]) == 2
    assert len(rec.handles) == 2 and all(stopped(h) for h in rec.handles)


def test_the_thread_count_is_restored(course_tiny):
    before = torch.get_num_threads()
    rec = Recorder(*course_tiny)
    serve_real.run(quick=True, servers={serve_real.COURSE: rec.factory(2)}, rates=[8.0], requests=2,
                   max_tokens=2, threads=1)
    assert torch.get_num_threads() == before


def test_a_server_that_fails_to_start_gets_an_error_row_and_the_other_still_runs(course_tiny):
    rec = Recorder(*course_tiny)

    @contextlib.contextmanager
    def broken():
        raise RuntimeError("no such server")
        yield  # pragma: no cover

    out = serve_real.run(quick=True, servers={serve_real.COURSE: rec.factory(4), serve_real.LLAMA: broken},
                         rates=[8.0], requests=2, max_tokens=2, threads=1)
    failed = [r for r in out["rows"] if r["engine"] == serve_real.LLAMA]
    assert len(failed) == 1 and "no such server" in failed[0]["error"]
    ran = [r for r in out["rows"] if r["engine"] == serve_real.COURSE]
    assert len(ran) == 1 and ran[0]["errors"] == 0
    assert out["machine"]["serve_real_goal"]["met"] is None  # no llama.cpp row: not measured, not "failed"
    assert all(stopped(h) for h in rec.handles)


def test_every_server_is_stopped_when_the_run_fails(course_tiny):
    rec = Recorder(*course_tiny)

    @contextlib.contextmanager
    def nobody_there():
        yield f"http://127.0.0.1:{serve_real.free_port()}"  # nothing listens: loading it fails

    with pytest.raises(ValueError, match="cannot list the models"):
        serve_real.run(quick=True, servers={serve_real.COURSE: rec.factory(4), "nobody": nobody_there},
                       rates=[8.0], requests=2, max_tokens=2, threads=1)
    assert len(rec.handles) == 1 and stopped(rec.handles[0])


def row(engine, rate, met, requests=10, goodput=None):
    return dict(engine=engine, rate_req_s=rate, requests=requests, met_budget=met, error=None,
                meets_budget=met >= serve_real.MEETS_SHARE * requests,
                goodput_req_s=goodput if goodput is not None else met * rate / requests)


def test_the_goal_compares_goodput_at_each_engines_highest_rate_within_the_budget():
    c, llama = serve_real.COURSE, serve_real.LLAMA
    rows = [row(c, 0.5, 10), row(llama, 0.5, 9), row(c, 1.0, 10), row(llama, 1.0, 4),
            row(c, 2.0, 9), row(llama, 2.0, 1), row(c, 4.0, 3), row(llama, 4.0, 0)]
    g = serve_real.goal(rows)
    assert g[llama]["highest_rate_met"] == 0.5 and g[c]["highest_rate_met"] == 2.0
    assert g["ratio"] == pytest.approx(1.8 / 0.45) and g["met"] is True
    assert "why" not in g
    # the course still within the budget at the top rate: the ratio is a lower bound, and says so
    g = serve_real.goal(rows[:6])
    assert g["met"] is True and "lower bound" in g["why"]
    # llama.cpp never within the budget: nothing to compare against
    assert serve_real.goal([row(c, 1.0, 10), row(llama, 1.0, 2)])["met"] is None
    # the course never within it: the goal is missed, not unmeasured
    g = serve_real.goal([row(c, 1.0, 2), row(llama, 1.0, 10)])
    assert g["met"] is False and g["ratio"] == 0.0


def test_verdicts_name_each_engine_per_rate():
    rows = [dict(row(serve_real.COURSE, 1.0, 10), ttft_p90_ms=120.0),
            dict(row(serve_real.LLAMA, 1.0, 2), ttft_p90_ms=3400.0)]
    (line,) = serve_real.verdicts(rows)
    assert line.startswith("1 req/s:") and "course_lib meets" in line and "llama.cpp misses" in line
    assert "3400 ms" in line


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python[server]")
def test_a_llama_server_that_cannot_load_its_model_raises_with_its_log_and_leaves_no_process(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(RuntimeError, match="exited with code"):
        with serve_real.llama_server(bad, threads=1, start_timeout_s=60):
            pass
    left = {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE} - before
    assert not left


def test_llama_server_refuses_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        with serve_real.llama_server(tmp_path / "missing.gguf", threads=1):
            pass

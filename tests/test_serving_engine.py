"""The serving engine: the simulation's scheduler on the wall clock, answers equal to offline greedy decoding."""

from __future__ import annotations

import threading

import pytest
import torch

from course_lib.generation import generate_kv_cache
from course_lib.serving import Engine, EngineConfig, EngineStopped, QueueFull, Scheduler, schedule_step

from .conftest import make_tiny

PROMPTS = ["def parse(", "import os\n\n\nclass Reader:\n    def __init__(self, path):\n        self.path", "x = ",
           "    for i in range(10):\n        if i % 2 == 0:\n            print("]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def offline(model, tok, text: str, n: int) -> list[int]:
    toks = generate_kv_cache(model, torch.tensor(tok(text, add_special_tokens=False)["input_ids"]), n)[0].tolist()
    if tok.eos_token_id in toks:  # the engine stops after EOS
        toks = toks[:toks.index(tok.eos_token_id) + 1]
    return toks


def test_concurrent_requests_joining_mid_decode_equal_offline_greedy(course_tiny):
    model, tok = course_tiny
    cfg = EngineConfig(max_batch=3, block_size=8, prefill_chunk=16)  # 4 requests, 3 rows: one waits for a slot
    with Engine(model, cfg, eos_token_id=tok.eos_token_id) as eng:
        events: list[list] = [[] for _ in PROMPTS]
        started = [threading.Event() for _ in PROMPTS]
        ended = [threading.Event() for _ in PROMPTS]

        def sink(i):
            def put(ev):
                events[i].append(ev)
                started[i].set()
                if ev.finish_reason:
                    ended[i].set()
            return put

        for i, text in enumerate(PROMPTS):
            eng.submit(tok(text, add_special_tokens=False)["input_ids"], 24 + 4 * i, sink=sink(i))
            assert started[i].wait(60)  # the next one arrives while this one decodes
        for i, text in enumerate(PROMPTS):
            assert ended[i].wait(120)
            assert [e.token for e in events[i]] == offline(model, tok, text, 24 + 4 * i), \
                f"prompt {i} differs from offline greedy"
            assert events[i][-1].finish_reason in ("length", "stop")
        assert eng.batch.trace and max(n for _, n in eng.batch.trace) >= 2  # they really shared decode steps
        eng.batch.step()  # finished requests leave at the next iteration
        assert eng.stats()["kv_blocks_used"] == 0 and eng.stats()["running"] == 0


def test_tiny_model_many_threads_same_tokens():
    m = make_tiny("llama", vocab=128)
    prompts = [tuple(range(1 + i, 4 + 3 * i)) for i in range(6)]
    with Engine(m, EngineConfig(max_batch=4, block_size=4, prefill_chunk=5)) as eng:
        out: dict[int, list[int]] = {}

        def client(i):
            out[i] = eng.generate(prompts[i], 5 + i)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for i, p in enumerate(prompts):
        assert out[i] == generate_kv_cache(m, torch.tensor(p), 5 + i)[0].tolist()


def test_bad_requests_are_refused_and_the_engine_keeps_serving():
    m = make_tiny("llama", vocab=128)  # max_position_embeddings 256
    with Engine(m, EngineConfig(max_batch=2, block_size=4, max_waiting=1)) as eng:
        for ids, n, match in (([], 3, "non-empty"), ([1, 128], 3, "outside this model's vocabulary"),
                              ([1, -1], 3, "outside"), ([1, 2], 0, "max_new_tokens"),
                              ([1] * 250, 10, "exceeds the context")):
            with pytest.raises(ValueError, match=match):
                eng.submit(ids, n)
        assert eng.generate([1, 2, 3], 4) == generate_kv_cache(m, torch.tensor([1, 2, 3]), 4)[0].tolist()
    with pytest.raises(EngineStopped):
        eng.submit([1, 2], 2)


def test_a_full_queue_refuses_and_cancel_frees_every_block():
    m = make_tiny("llama", vocab=128)
    eng = Engine(m, EngineConfig(max_batch=1, block_size=4, max_waiting=1))
    try:
        first = eng.submit([1, 2, 3], 200)
        next(first.events(timeout=60))  # running
        second = eng.submit([4, 5], 200)  # waits: one row only
        with pytest.raises(QueueFull):
            eng.submit([6], 2)
        second.cancel()
        first.cancel()
        assert first.result(timeout=60)[1] == "abort" and second.result(timeout=60)[1] == "abort"
        assert eng.stats()["kv_blocks_used"] == 0
    finally:
        eng.stop(drain=False)


def test_scheduler_decides_with_schedule_step():
    s = Scheduler(max_batch=2, num_blocks=5)
    for rid, need in ((0, 3), (1, 3), (2, 1)):
        s.submit(rid, need, wanted=2)
    assert s.step() == ([0], [])  # 1 needs 3 of the 2 free: it waits, and 2 may not overtake it
    assert s.free == 2 and [r for r, _ in s.waiting] == [1, 2]
    s.progress(0, 2)
    assert s.step() == ([1, 2], [0])  # 0 is done: its blocks come back, both join
    assert schedule_step([(0, 2, 2, 3)], [(1, 3), (2, 1)], 2, 2) == ([1, 2], [], 1)
    with pytest.raises(ValueError, match="needs 9 KV blocks"):
        s.submit(9, 9, 1)


@pytest.mark.parametrize("kwargs, match", [(dict(max_batch=0), "max_batch"), (dict(block_size=True), "block_size"),
                                           (dict(prefill_chunk=0), "prefill_chunk"),
                                           (dict(max_waiting=-1), "max_waiting")])
def test_bad_engine_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)

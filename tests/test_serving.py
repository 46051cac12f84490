"""The serving simulation: same greedy tokens under any policy, honest bookkeeping, bad input."""

from __future__ import annotations

import pytest
import torch

from course_lib.generation import generate_kv_cache
from course_lib.serving import (
    POLICIES,
    Request,
    ServeConfig,
    batch_sweep,
    interleaved_runs,
    poisson_requests,
    serve,
    simulation,
)

from .conftest import make_tiny


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", vocab=128)


@pytest.fixture(scope="module")
def requests_():
    return poisson_requests(10, rate_per_s=100.0, vocab=128, prompt_len=(2, 9), new_tokens=(1, 10), seed=3)


@pytest.mark.parametrize("policy", POLICIES)
def test_tokens_match_serving_each_request_alone(model, requests_, policy):
    report = serve(model, requests_, ServeConfig(policy, max_batch=3))
    assert [f.rid for f in report.finished] == [r.rid for r in requests_]
    for f, r in zip(report.finished, requests_):
        alone = generate_kv_cache(model, torch.tensor(r.prompt_ids), r.max_new_tokens)[0].tolist()
        assert list(f.tokens) == alone, f"request {r.rid} differs under {policy} batching"


def test_qwen2_biases_and_cache_compaction():
    # Long answers in a small cache force compaction; Qwen2 adds q/k/v biases.
    m = make_tiny("qwen2", vocab=96)
    reqs = [Request(i, 0.001 * i, tuple(range(1 + i, 5 + 2 * i)), 6 + 3 * i) for i in range(5)]
    report = serve(m, reqs, ServeConfig("continuous", max_batch=2))
    for f, r in zip(report.finished, reqs):
        assert list(f.tokens) == generate_kv_cache(m, torch.tensor(r.prompt_ids), r.max_new_tokens)[0].tolist()


def test_bookkeeping(model, requests_):
    static = serve(model, requests_, ServeConfig("static", max_batch=4))
    cont = serve(model, requests_, ServeConfig("continuous", max_batch=4))
    for rep in (static, cont):
        assert rep.tokens == sum(r.max_new_tokens for r in requests_)
        assert max(n for _, n in rep.batch_trace) <= 4
        for f in rep.finished:
            assert f.arrival_s <= f.start_s < f.first_token_s <= f.finish_s
            assert f.ttft_s > 0 and f.latency_s >= f.ttft_s
        s = rep.summary()
        assert s["requests"] == len(requests_) and s["throughput_tok_s"] > 0
    # Continuous batching never computes a row that has nothing left to produce.
    assert cont.wasted_frac == 0.0
    assert cont.busy_rows == cont.computed_rows
    assert static.computed_rows >= static.busy_rows
    # Static batching keeps finished rows until the batch ends: with varied lengths it wastes some. The Poisson
    # arrivals above depend on wall time (on a fast machine every batch may hold one request), so the waste is
    # checked on a burst that arrives all at once.
    burst = [Request(i, 0.0, (1 + i, 2, 3), n) for i, n in enumerate((2, 9, 4, 7))]
    wasteful = serve(model, burst, ServeConfig("static", max_batch=4))
    # Decode steps only (each first token comes from prefill): 8 steps x 4 rows, of which 1 + 8 + 3 + 6 needed one.
    assert wasteful.computed_rows == 4 * 8 and wasteful.busy_rows == 18
    assert wasteful.wasted_frac == pytest.approx(1 - 18 / 32)
    assert serve(model, burst, ServeConfig("continuous", max_batch=4)).wasted_frac == 0.0


def test_single_request_and_one_token(model):
    rep = serve(model, [Request(0, 0.5, (1, 2, 3), 1)], ServeConfig("static", 2))
    (f,) = rep.finished
    assert len(f.tokens) == 1 and f.finish_s == f.first_token_s and rep.steps == 0


def test_interleaved_runs_warm_each_config_up_then_serve_round_after_round(model, requests_, monkeypatch):
    real, seen = simulation.serve, []

    def recording(m, reqs, cfg, progress=False):
        seen.append((cfg.policy, len(reqs)))
        return real(m, reqs, cfg, progress)

    monkeypatch.setattr(simulation, "serve", recording)
    configs = {p: ServeConfig(p, max_batch=2) for p in POLICIES}
    runs = interleaved_runs(model, requests_[:4], configs, rounds=2)
    assert seen == [(p, 2) for p in POLICIES] + [(p, 4) for p in POLICIES] * 2  # warm-up: the first two requests
    assert list(runs) == list(POLICIES) and all(len(reports) == 2 for reports in runs.values())
    assert all([f.rid for f in rep.finished] == [0, 1, 2, 3] for reports in runs.values() for rep in reports)


def test_batch_sweep_times_every_batch_size(model):
    sweep = batch_sweep(model, [1, 2], context=8, warmup=1, repeat=3)
    assert [r["batch"] for r in sweep] == [1, 2]
    assert all(r["result"].count == 3 and r["p10_ms"] <= r["step_ms"] <= r["p90_ms"] for r in sweep)  # medians
    assert all(r["throughput_tok_s"] > 0 and r["step_ms"] > 0 for r in sweep)


def test_poisson_requests_are_seeded_and_ordered():
    a = poisson_requests(6, 2.0, vocab=50, seed=7)
    assert a == poisson_requests(6, 2.0, vocab=50, seed=7)
    assert a != poisson_requests(6, 2.0, vocab=50, seed=8)
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:]))
    assert all(max(r.prompt_ids) < 50 and 4 <= r.max_new_tokens <= 32 for r in a)


@pytest.mark.parametrize("kwargs, match", [
    (dict(policy="dynamic"), "policy must be one of"),
    (dict(max_batch=0), "max_batch"),
    (dict(max_batch=True), "max_batch"),  # bool is an int to Python: this was a batch of 1
    (dict(max_batch=2.5), "max_batch"),
    (dict(max_batch=8.0), "max_batch"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServeConfig(**kwargs)


def test_bad_requests(model):
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        Request(0, 0.0, (), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request(0, 0.0, (1,), 0)
    with pytest.raises(ValueError, match="requests is empty"):
        serve(model, [], ServeConfig())
    with pytest.raises(ValueError, match="unique"):
        serve(model, [Request(0, 0.0, (1,), 2), Request(0, 0.1, (2,), 2)], ServeConfig())
    with pytest.raises(ValueError, match="rate_per_s"):
        poisson_requests(3, 0.0, vocab=10)
    with pytest.raises(ValueError, match="batch_sizes"):
        batch_sweep(model, [0])


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("args, match", [
    ((0, 0.0, (1,), True), "max_new_tokens"), ((0, 0.0, (1,), 2.5), "max_new_tokens"),
    ((0, NAN, (1,), 3), "arrival_s"), ((0, INF, (1,), 3), "arrival_s"), ((0, -1.0, (1,), 3), "arrival_s"),
])
def test_bad_request_fields(args, match):
    with pytest.raises(ValueError, match=match):
        Request(*args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=True), "n must"), (dict(n=2.5), "n must"), (dict(n=0), "n must"),
    (dict(rate_per_s=NAN), "rate_per_s"), (dict(rate_per_s=INF), "rate_per_s"), (dict(rate_per_s=True), "rate_per_s"),
    (dict(vocab=0), "vocab"), (dict(vocab=True), "vocab"), (dict(vocab=128.0), "vocab"),
    (dict(prompt_len=(2.5, 8)), "prompt_len"), (dict(prompt_len=(True, 8)), "prompt_len"),
    (dict(prompt_len=8), "prompt_len"), (dict(new_tokens=(4, 2)), "new_tokens"),
    (dict(new_tokens=(0, 2)), "new_tokens"),
])
def test_poisson_requests_checks_its_arguments(kwargs, match):
    args = {**dict(n=3, rate_per_s=10.0, vocab=128), **kwargs}
    with pytest.raises(ValueError, match=match):
        poisson_requests(**args)


def test_batch_sweep_refuses_a_bool_batch(model):
    with pytest.raises(ValueError, match="batch_sizes"):
        batch_sweep(model, [1, True])


def test_serve_bench_suite_rows(monkeypatch):
    """The suite's row shape, on a tiny stand-in model so the test stays fast."""
    from course_lib.bench import serve as suite
    from course_lib.models import load_model

    tiny = dict(vocab=128, hidden=128, num_heads=2, num_kv_heads=1)  # head_dim 64, as SmolLM2's (int4 groups of 32)
    monkeypatch.setattr(suite, "speed_lab_model", lambda name, num_layers=None: (
        make_tiny("llama", **tiny), make_tiny("llama", **tiny).config))
    monkeypatch.setattr(suite, "load_model", lambda name: load_model("course-tiny"))  # the real model's stand-in
    out = suite.run(quick=True)
    methods = [r["method"] for r in out["rows"]]
    kv = ["kv-fp32", "kv-bf16", "kv-int8", "kv-int4-g32"]
    assert methods == ["batch-1", "batch-2", "batch-4", "batch-8", "static-b8", "continuous-b8", "paged-b8",
                       "prefix-off", "prefix-on", "chunk-none", "chunk-32", *kv, "paged-kv-fp32-budget",
                       "paged-kv-int8-budget"]
    assert all(r["suite"] == "serve" and r["throughput_tok_s"] > 0 for r in out["rows"] if r["method"] not in kv)
    rows = {r["method"]: r for r in out["rows"]}
    # the KV-cache formats: fewer bytes, a bigger batch in the same memory, quality read through the cache
    assert [rows[m]["kv_bytes_per_token"] for m in kv] == sorted((rows[m]["kv_bytes_per_token"] for m in kv),
                                                                 reverse=True)
    assert rows["kv-int8"]["batch_vs_bf16"] >= 1.8 and out["machine"]["kv_quant_goals"]["met_batch"]
    assert all(rows[m]["step_ms"] > 0 and rows[m]["step_p10_ms"] <= rows[m]["step_p90_ms"]
               for m in ("kv-fp32", "kv-int8", "kv-int4-g32"))
    assert rows["kv-fp32"]["ppl_vs_fp32"] == 0 and rows["kv-int8"]["prose_ppl"] != rows["kv-fp32"]["prose_ppl"]
    assert 0 <= rows["kv-int4-g32"]["agree_prefix"] <= 1 and "prose_ppl" not in rows["kv-bf16"]
    assert rows["paged-kv-int8-budget"]["kv_blocks"] > 3 * rows["paged-kv-fp32-budget"]["kv_blocks"]
    assert rows["paged-kv-int8-budget"]["mean_batch"] > rows["paged-kv-fp32-budget"]["mean_batch"]
    assert rows["paged-b8"]["kv_paged_peak_mb"] < rows["paged-b8"]["kv_contiguous_peak_mb"]
    assert rows["prefix-off"]["prefill_tokens_skipped"] == 0 < rows["prefix-on"]["prefill_tokens_skipped"]
    assert all(rows[m]["rounds"] >= 3 for m in ("prefix-on", "chunk-none", "chunk-32"))  # medians, not one sample
    assert rows["chunk-32"]["others_tpot_p10_ms"] <= rows["chunk-32"]["others_tpot_ms"]
    assert all("decode_tok_s" not in r for r in out["rows"])  # batch throughput is not batch-1 speed


@pytest.mark.parametrize("change", ["int8", "pruned"])
def test_quantized_and_pruned_models_serve_the_same_tokens(requests_, change):
    """The server runs the model's own modules: packed int8 layers and pruned shapes serve like any model."""
    from course_lib.pruning import PruneConfig, prune_
    from course_lib.quantization import QuantConfig, quantize_

    m = make_tiny("llama", vocab=128)
    if change == "int8":
        quantize_(m, QuantConfig(bits=8))
    else:
        prune_(m, PruneConfig(ratio=0.5))
    report = serve(m, requests_, ServeConfig("continuous", max_batch=3))
    for f, r in zip(report.finished, requests_):
        assert list(f.tokens) == generate_kv_cache(m, torch.tensor(r.prompt_ids), r.max_new_tokens)[0].tolist()


# --- paged KV cache, prefix caching, chunked prefill ------------------------------------

PAGED = [dict(), dict(prefix_cache=True), dict(prefill_chunk=3), dict(prefix_cache=True, prefill_chunk=5)]


@pytest.mark.parametrize("extra", PAGED, ids=["paged", "prefix", "chunked", "prefix+chunked"])
def test_paged_server_serves_the_same_tokens(model, extra):
    reqs = poisson_requests(8, rate_per_s=100.0, vocab=128, prompt_len=(2, 9), new_tokens=(1, 10), seed=3,
                            shared_prefix=11)
    report = serve(model, reqs, ServeConfig("continuous", max_batch=3, kv="paged", block_size=4, **extra))
    for f, r in zip(report.finished, reqs):
        assert list(f.tokens) == generate_kv_cache(model, torch.tensor(r.prompt_ids), r.max_new_tokens)[0].tolist()
        assert len(f.token_times) == len(f.tokens) and f.first_token_s == f.token_times[0]
    s = report.summary()
    assert s["blocks_in_use_at_end"] == 0  # every block went back to the free list: no leak
    assert s["tokens"] == sum(r.max_new_tokens for r in reqs) and s["wasted_frac"] == 0.0


def test_paged_memory_against_a_contiguous_cache_at_mixed_lengths(model):
    reqs = [Request(i, 0.0, tuple(range(1, 2 + p)), n) for i, (p, n) in enumerate(((3, 40), (20, 2), (5, 6), (9, 3)))]
    s = serve(model, reqs, ServeConfig(max_batch=4, kv="paged", block_size=4)).summary()
    # a contiguous cache reserves the longest length (41 + 40 tokens) for each of the 4 rows; blocks hold what
    # is stored, rounded up to whole blocks (at most block_size - 1 empty slots per request)
    assert s["kv_paged_peak_mb"] < s["kv_contiguous_peak_mb"] / 2
    assert s["kv_stored_peak_mb"] <= s["kv_paged_peak_mb"]


def test_prefix_cache_reuses_the_system_prompt_blocks(model):
    system = tuple(range(30, 50))  # 20 tokens = 5 blocks of 4
    # one at a time, each with its own tail after the shared 20 tokens
    reqs = [Request(i, 100.0 * i, system + tuple(60 + 10 * i + j for j in range(3 + i)), 3) for i in range(5)]
    base = serve(model, reqs, ServeConfig(kv="paged", block_size=4)).summary()
    hit = serve(model, reqs, ServeConfig(kv="paged", block_size=4, prefix_cache=True))
    s = hit.summary()
    assert base["prefix_hit_blocks"] == 0 and base["prefill_tokens_skipped"] == 0
    assert s["prefix_hit_blocks"] == 4 * 5  # every request after the first finds the 5 system-prompt blocks
    assert s["prefill_tokens_skipped"] == 4 * 20
    assert s["prefill_tokens_computed"] == base["prefill_tokens_computed"] - 80
    assert [f.prefill_skipped for f in hit.finished] == [0, 20, 20, 20, 20]
    assert s["blocks_in_use_at_end"] == 0


def test_chunked_prefill_interleaves_decode_steps(model):
    short = [Request(i, 0.0, (1 + i, 2, 3), 30) for i in range(3)]
    long = Request(9, 1e-9, tuple(range(1, 41)), 2)  # arrives once the others are decoding
    reqs = short + [long]
    for chunk, interleaved in ((None, False), (8, True)):
        rep = serve(model, reqs, ServeConfig(max_batch=4, kv="paged", block_size=4, prefill_chunk=chunk))
        lf = next(f for f in rep.finished if f.rid == 9)
        during = [t for f in rep.finished if f.rid != 9 for t in f.token_times if lf.start_s < t < lf.first_token_s]
        # whole: the others wait for the whole prompt; chunked: they get tokens between its chunks
        assert bool(during) == interleaved
        for f, r in zip(rep.finished, sorted(reqs, key=lambda r: r.rid)):
            assert list(f.tokens) == generate_kv_cache(model, torch.tensor(r.prompt_ids),
                                                       r.max_new_tokens)[0].tolist()


def test_too_few_blocks_is_refused_and_a_small_pool_still_serves(model):
    reqs = [Request(i, 0.0, tuple(range(1, 9)), 8) for i in range(4)]  # 16 tokens = 4 blocks each
    with pytest.raises(ValueError, match="kv_blocks"):
        serve(model, reqs, ServeConfig(kv="paged", block_size=4, kv_blocks=3))
    rep = serve(model, reqs, ServeConfig(kv="paged", block_size=4, kv_blocks=8))  # two requests at a time
    assert max(n for _, n in rep.batch_trace) <= 2 and rep.summary()["blocks_in_use_at_end"] == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(kv="virtual"), "kv must be one of"), (dict(prefix_cache=True), "paged KV"),
    (dict(prefill_chunk=8), "paged KV"), (dict(kv="paged", policy="static"), "continuous"),
    (dict(kv="paged", block_size=0), "block_size"), (dict(kv="paged", prefill_chunk=0), "prefill_chunk"),
    (dict(kv="paged", prefix_cache="yes"), "prefix_cache"), (dict(kv="paged", kv_blocks=2.5), "kv_blocks"),
])
def test_bad_paged_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServeConfig(**kwargs)

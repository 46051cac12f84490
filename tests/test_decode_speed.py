"""Decode-speed experiments: TTFT / TPOT of a streamed answer, models timed interleaved, one decode step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from course_lib import timing
from course_lib.decode_speed import (
    decode_speed,
    measure_decode_step,
    measure_step_overhead,
    overhead_model,
    time_generation,
)
from course_lib.models import speed_lab_config
from tests.conftest import make_tiny, requires_cuda


class _Tok:
    eos_token_id = None

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return {"input_ids": torch.tensor([[min(ord(c), 127) for c in text]])}

    def decode(self, ids):
        return "x" * len(ids)


def test_time_generation_fields_are_sane():
    model = make_tiny("llama")
    t = time_generation(model, _Tok(), "hello", max_new_tokens=6, warmup=1, repeat=2)
    assert t.new_tokens == 6 and len(t.token_times) == 6 and t.prompt_tokens == 5
    assert 0 < t.ttft_s <= t.total_s
    assert t.tpot_s > 0 and t.tokens_per_s == pytest.approx(1 / t.tpot_s)
    assert list(t.token_times) == sorted(t.token_times)
    with pytest.raises(ValueError, match="max_new_tokens"):
        time_generation(model, _Tok(), "hello", max_new_tokens=1)


def _failing_after(model, forwards: int, calls: list):
    """Record each forward pass of ``model`` under its tag; from forward number ``forwards`` on, raise."""
    seen = []

    def hook(module, args, kwargs):
        calls.append(module.tag)
        seen.append(1)
        if len(seen) > forwards:
            raise RuntimeError("kernel exploded")

    model.register_forward_pre_hook(hook, with_kwargs=True)


def _dedup(calls: list) -> list:
    return [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]


def test_decode_speed_is_round_robin_and_can_keep_going_past_a_failure():
    models = {name: make_tiny("llama", seed=i) for i, name in enumerate(("a", "b", "c"))}
    calls: list[str] = []
    for name, m in models.items():
        m.tag = name
        _failing_after(m, 2 if name == "b" else 10**6, calls)  # b warms up (2 tokens), then fails when timed
    prompt = torch.randint(0, 128, (8,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="exploded"):  # by default a failure is a failure
        decode_speed(models, prompt, new_tokens=3, rounds=2)
    for m in models.values():  # fresh hooks: b warms up fine again
        m._forward_pre_hooks.clear()
    calls.clear()
    for name, m in models.items():
        _failing_after(m, 2 if name == "b" else 10**6, calls)
    errors: dict = {}
    out = decode_speed(models, prompt, new_tokens=3, rounds=2, errors=errors)
    # Warm-up each, then round after round each model in turn; b drops out after failing.
    assert _dedup(calls) == ["a", "b", "c", "a", "b", "c", "a", "c"]
    assert errors == {"b": "RuntimeError: kernel exploded"} and set(out) == {"a", "c"}
    assert all(tok_s > 0 and prefill_ms > 0 for tok_s, prefill_ms in out.values())
    assert set(models) == {"a", "b", "c"}  # the caller's dict is left alone


def test_decode_speed_compiled_loop_times_the_compiled_decoder(monkeypatch):
    """compiled=True: one decoder per model, warmed up (= compiled) once, then 1 and N tokens per round."""
    calls = []

    class FakeDecoder:
        def __init__(self, model):
            if model.tag == "broken":
                raise RuntimeError("torch.compile on CPU needs a C++ compiler (gcc or clang) on PATH")
            self.tag = model.tag

        def __call__(self, prompt_ids, n, max_len=None):
            calls.append((self.tag, n, max_len))
            return prompt_ids[:, :n]

    def fake_benchmark(fn, warmup=0, repeat=1, **kw):  # a clock that says 2 ms per token, prefill included
        fn()
        return SimpleNamespace(median=0.002 * calls[-1][1])

    monkeypatch.setattr(timing, "benchmark", fake_benchmark)  # what time_tokens, in timing, calls
    models = {k: torch.nn.Linear(1, 1) for k in ("a", "broken", "b")}
    for k, m in models.items():
        m.tag = k
    prompt = torch.arange(6)
    errors = {}
    out = decode_speed(models, prompt, new_tokens=5, rounds=2, errors=errors, compiled=True,
                       make_decoder=FakeDecoder)
    assert errors == {"broken": "RuntimeError: torch.compile on CPU needs a C++ compiler (gcc or clang) on PATH"}
    # Warm-up (compile) each once, then per round each model: first token alone, then all five; one cache size.
    assert calls == [("a", 2, 11), ("b", 2, 11)] + [("a", 1, 11), ("a", 5, 11), ("b", 1, 11), ("b", 5, 11)] * 2
    # Decode rate from the difference: 4 more tokens in 10 - 2 ms; prefill is the first call.
    assert out == {"a": pytest.approx((500.0, 2.0)), "b": pytest.approx((500.0, 2.0))}
    with pytest.raises(ValueError, match=">= 2"):
        decode_speed(models, prompt, new_tokens=1)


def test_decode_speed_compiled_by_default_runs_the_real_compiled_decoder():
    """The default decoder is course_lib's CompiledDecoder (a graph-only compile here: seconds, not minutes)."""
    from course_lib.generation import CompiledDecoder

    built = []

    def eager_graph(m):
        built.append(m)
        return CompiledDecoder(m, backend="eager")

    model = make_tiny()
    prompt = torch.randint(0, 128, (6,), generator=torch.Generator().manual_seed(0))
    out = decode_speed({"tiny": model}, prompt, new_tokens=3, rounds=1, compiled=True, make_decoder=eager_graph)
    assert built == [model] and out["tiny"][0] > 0 and out["tiny"][1] > 0


def test_decode_speed_checks_its_counts():
    model = make_tiny()
    with pytest.raises(ValueError, match="repeat"):
        time_generation(model, None, torch.tensor([[1, 2]]), max_new_tokens=4, repeat=0)
    with pytest.raises(ValueError, match="rounds"):
        decode_speed({"m": model}, torch.tensor([1, 2]), rounds=0)
    for call, match in ((lambda: measure_decode_step(None, context=0), "context"),
                        (lambda: measure_decode_step(None, batch=1.5), "batch")):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_decode_speed_times_a_gpu_model_from_a_cpu_prompt(compiled):
    """The prompt goes to the model's device, and every timing there synchronizes."""
    model = make_tiny().cuda()
    prompt = torch.randint(0, 128, (8,), generator=torch.Generator().manual_seed(0))  # on the CPU
    speed = decode_speed({"tiny": model}, prompt, new_tokens=4, rounds=1, compiled=compiled)
    tok_s, prefill_ms = speed["tiny"]
    assert tok_s > 0 and prefill_ms > 0


def test_overhead_model_and_decode_step():
    cfg = speed_lab_config("smollm2-135m", num_layers=2)
    thin = overhead_model(cfg)
    assert thin.config.num_hidden_layers == 2 and thin.config.num_attention_heads == 9
    assert sum(p.numel() for p in thin.parameters()) < 100_000  # vs 135 million in the real model
    res = measure_decode_step(thin, context=16, warmup=1, repeat=3)
    assert res.count == 3 and res.median > 0
    assert measure_step_overhead(cfg, context=8, repeat=2) > 0

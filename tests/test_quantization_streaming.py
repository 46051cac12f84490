"""Tests for course_lib.quantization.streaming (the compiled decode kernels) and cold kernel timing.

Correctness only, never a timing: each kernel against the dequantized reference at several row counts and odd
widths, the layers that run them against their own reference, the int4 layout round trip, greedy tokens of a
compiled step equal to the eager loop. Compiling is slow on 2 cores: only the tests named ``compiled`` do it,
on small shapes (one graph for one row, one for more, per kernel).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from course_lib.device import compile_supported
from course_lib.generation import CompiledDecoder, generate_kv_cache
from course_lib.quantization import (
    STREAM,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    QuantConfig,
    StreamingLinear,
    kernel_choice,
    native,
    pack_int4,
    quantize,
    quantize_,
    stream_,
    streaming,
)
from tests.conftest import make_tiny

needs_compiler = pytest.mark.skipif(not compile_supported("cpu")[0], reason="torch.compile needs a C++ compiler")


@pytest.fixture(autouse=True)
def fresh_kernel_choices():
    kernel_choice.clear_kernel_choices()
    yield
    kernel_choice.clear_kernel_choices()


def _stream_wins(monkeypatch):
    """The clock says the streaming kernel is fastest (the layers' use of it is under test, not its speed)."""
    def fake(cands, in_features, device, rounds=kernel_choice.ROUNDS):
        return {c.name: 1.0 if c.kernel == STREAM else 2.0 for c in cands}
    monkeypatch.setattr(kernel_choice, "time_candidates", fake)


def _int4_parts(w: torch.Tensor, g: int):
    q4 = quantize(w, 4, symmetric=False, granularity="per_group", group_size=g)
    s = q4.scale.squeeze(-1)
    zero = (8 - q4.zero_point.squeeze(-1)) * s
    n, k = w.shape
    dq = ((q4.q.float().reshape(n, -1, g) - 8) * s[..., None] + zero[..., None]).reshape(n, k)
    return q4.q, torch.stack([s, zero], -1).transpose(0, 1), dq


@pytest.mark.parametrize("rows", kernel_choice.PROBE_ROWS)
def test_each_kernel_matches_the_dequantized_reference(rows):
    torch.manual_seed(0)
    x = torch.randn(rows, 75)  # an odd width: no vector-width assumption
    w = torch.randn(37, 75)
    torch.testing.assert_close(streaming.float_gemv(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(streaming.float_gemv(x.bfloat16(), w.bfloat16()),
                               x.bfloat16().float() @ w.bfloat16().float().T, rtol=1e-4, atol=1e-3)
    q8 = quantize(w, 8, symmetric=True, granularity="per_channel")
    s8 = q8.scale.reshape(-1)
    torch.testing.assert_close(streaming.int8_gemv(x, q8.q, s8), x @ (q8.q.float() * s8[:, None]).T,
                               rtol=1e-4, atol=1e-4)
    x4, w4 = torch.randn(rows, 96), torch.randn(37, 96)
    q4, sz, dq = _int4_parts(w4, 32)
    got = streaming.int4_gemv(x4, streaming.pack_int4_halves(q4, 32), sz, 32)
    torch.testing.assert_close(got, x4 @ dq.T, rtol=1e-4, atol=1e-4)


def test_the_int4_halves_layout_round_trips_and_refuses_a_group_that_does_not_divide():
    q = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = streaming.pack_int4_halves(q, 32)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(streaming.unpack_int4_halves(packed, 32), q)
    assert torch.equal(packed[:, :16] & 15, q[:, :16]) and torch.equal(packed[:, :16] >> 4, q[:, 16:32])
    with pytest.raises(ValueError, match="group_size"):
        streaming.pack_int4_halves(q, 48)


def test_cold_timing_is_recorded_and_flushes_a_buffer_the_size_of_the_cache(monkeypatch):
    monkeypatch.setattr(kernel_choice, "last_level_cache_bytes", lambda device=None: 1 << 20)  # a cheap flush
    w = torch.randn(16, 32)
    cands = [kernel_choice.Candidate("a", "a", torch.float32, lambda x: x @ w.T),
             kernel_choice.Candidate("b", "b", torch.float32, lambda x: torch.nn.functional.linear(x, w))]
    ref = lambda x: x @ w.T  # noqa: E731
    assert kernel_choice.timing() == "hot"
    with kernel_choice.timed_cold():
        assert kernel_choice.timing() == "cold"
        cold = kernel_choice.choose("cold-key", cands, ref, 32, torch.device("cpu"))
        with kernel_choice.timed_cold(False):
            hot = kernel_choice.choose("hot-key", cands, ref, 32, torch.device("cpu"))
    assert kernel_choice.timing() == "hot"
    assert cold.timing == "cold" and hot.timing == "hot" and cold.as_row()["timing"] == "cold"
    assert set(cold.times_us) <= {"a", "b"} and all(t > 0 for t in cold.times_us.values())
    with pytest.raises(ValueError, match="cold must be True or False"):
        with kernel_choice.timed_cold("yes"):
            pass


def test_the_last_level_cache_size_is_read_from_the_machine():
    real = kernel_choice.last_level_cache_bytes()
    assert real >= 1 << 20 and real % 1024 == 0


def test_quantize_times_cold_only_a_model_bigger_than_the_cache(monkeypatch):
    seen = []
    real = kernel_choice.choose
    monkeypatch.setattr(kernel_choice, "choose", lambda *a, **k: seen.append(kernel_choice.timing()) or real(*a, **k))
    monkeypatch.setattr(kernel_choice, "time_cold", lambda cands, *a, **k: {c.name: 1.0 for c in cands})
    quantize_(make_tiny(), QuantConfig(bits=8))
    assert seen and set(seen) == {"hot"}  # a few thousand parameters: decoded from the cache
    seen.clear()
    kernel_choice.clear_kernel_choices()
    monkeypatch.setattr(kernel_choice, "last_level_cache_bytes", lambda device=None: 1024)
    quantize_(make_tiny(), QuantConfig(bits=8))
    assert seen and set(seen) == {"cold"}


def test_stream_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="no plain nn.Linear"):
        stream_(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="cold must be True, False or None"):
        stream_(nn.Sequential(nn.Linear(4, 4)), cold="yes")


def test_streaming_linear_hands_the_kernel_a_plain_tensor_not_its_parameter(monkeypatch):
    # dynamo compiles a Parameter's shape statically: one graph per layer shape, and a model has more than its
    # recompile limit of them (SmolLM2's bf16-stream failed to build so)
    seen = []
    monkeypatch.setattr(streaming, "run", lambda kind, *args: seen.append(args) or streaming.KERNELS[kind](*args))
    monkeypatch.setattr(streaming, "available", lambda device: (True, ""))
    StreamingLinear.from_linear(nn.Linear(32, 16))
    assert seen and all(not isinstance(a, nn.Parameter) for args in seen for a in args)


def test_without_a_compiler_no_streaming_kernel_is_offered(monkeypatch):
    monkeypatch.setattr(streaming, "compile_supported", lambda device: (False, "no compiler here"))
    monkeypatch.setattr(native, "_STATE", [(False, "no compiler here")])  # nor native kernels built before
    lin = nn.Linear(64, 32)
    layer = Int8WeightOnlyLinear.from_linear(lin, kernel="stream")
    assert layer.kernel != STREAM and not any(STREAM in n for n in layer.choice.times_us)
    assert stream_(nn.Sequential(lin)) == {"0": "F.linear"}


# --- compiled: the kernels through torch.compile, and the layers that run them --------------------------------


@needs_compiler
def test_compiled_layers_that_choose_the_streaming_kernel_compute_their_weights(monkeypatch):
    _stream_wins(monkeypatch)
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    i8 = Int8WeightOnlyLinear.from_linear(lin, compute_dtype="auto", kernel="stream")
    i4 = Int4WeightOnlyLinear.from_linear(lin, 32, kernel="stream")
    fl = StreamingLinear.from_linear(lin)
    assert i8.kernel == i4.kernel == fl.kernel == STREAM  # passed the checks at 1, 2, 7, 16 and 33 rows
    assert fl.weight is lin.weight
    for rows in (1, 2, 5):  # one row and two stream; five take the layer's other path
        x = torch.randn(rows, 96)
        with torch.no_grad():  # the grad mode the choice compiled in: no new graph
            torch.testing.assert_close(i8(x), x @ i8.dequantized_weight().T + lin.bias, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(i4(x), x @ i4.dequantized_weight().T + lin.bias, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fl(x), lin(x), rtol=1e-4, atol=1e-4)
    # the state dict holds the portable int4 bytes, whatever layout the kernel reads; a new layer loads them
    q = quantize(lin.weight, 4, symmetric=False, granularity="per_group", group_size=32).q
    assert torch.equal(i4.state_dict()["weight_packed"], pack_int4(q))
    again = Int4WeightOnlyLinear.from_linear(nn.Linear(96, 40), 32, kernel="stream")
    again.load_state_dict(i4.state_dict())
    x = torch.randn(1, 96)
    with torch.no_grad():
        torch.testing.assert_close(again(x), i4(x))
        # the compiled kernels themselves at more rows than the layers stream (the graph for several rows)
        x7 = torch.randn(7, 96)
        torch.testing.assert_close(streaming.run("int4", x7, i4.weight_packed, i4.scales_and_zeros, 32),
                                   x7 @ i4.dequantized_weight().T, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(streaming.run("int8", x7, i8.weight_int8, i8.scales),
                                   x7 @ i8.dequantized_weight().T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
def test_greedy_tokens_of_a_compiled_streaming_step_equal_the_eager_loop(monkeypatch, fmt):
    """fp32: the decode step traced whole (backend="eager": the graph, not inductor's kernels) with the streaming
    kernels inside it, token for token against the eager loop that calls them layer by layer (here uncompiled:
    the compiled kernels are the test above's; this one checks the layers' plumbing inside a traced step)."""
    _stream_wins(monkeypatch)
    monkeypatch.setattr(streaming, "run", lambda kind, *args: streaming.KERNELS[kind](*args))
    monkeypatch.setattr(streaming, "available", lambda device: (True, ""))
    model = make_tiny(hidden=64, intermediate=128, vocab=96)
    if fmt == "float":
        kinds = set(stream_(model).values())
    else:
        quantize_(model, QuantConfig(bits=8, kernel="stream") if fmt == "int8"
                  else QuantConfig(bits=4, group_size=32, kernel="stream"))
        kinds = {m.kernel for m in model.modules() if isinstance(m, Int4WeightOnlyLinear | Int8WeightOnlyLinear)}
    assert kinds == {STREAM}
    ids = torch.tensor([[3, 17, 5, 42, 8]])
    eager = generate_kv_cache(model, ids, 6)
    assert torch.equal(CompiledDecoder(model, backend="eager")(ids, 6), eager)

"""Decode loops: the from-scratch KV cache against transformers, greedy agreement, batching, streaming."""

from __future__ import annotations

import pytest
import torch

from course_lib.generation import (
    attention_cost,
    batched_generate,
    compile_supported,
    encode_prompt,
    generate,
    generate_hf,
    generate_kv_cache,
    generate_no_cache,
    hf_forward,
    sample_next,
    stream_generate,
)
from course_lib.kv_cache import KVCache, LlamaShape
from course_lib.scratch_llama import ScratchLlama, apply_rope, naive_attention, rms_norm, rope_tables, sdpa_attention
from tests.conftest import make_tiny


def _prompt(n=7, vocab=128, batch=1, seed=1):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


class _ByteTokenizer:
    """A tiny character-level tokenizer (ids 1..127), enough for batching and streaming tests."""

    pad_token_id = 0
    eos_token_id = None

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [min(ord(c), 127) or 1 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids):
        return "".join(chr(max(i, 32)) for i in ids)


# --- the from-scratch forward pass matches transformers -------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_scratch_logits_match_transformers(family, attention):
    model = make_tiny(family)
    scratch = ScratchLlama(model, attention)
    ids = _prompt(12, batch=2)
    with torch.inference_mode():
        ref = model(ids).logits
        torch.testing.assert_close(scratch(ids), ref, atol=1e-4, rtol=1e-4)
        # prefill 8 tokens into the cache, then feed the rest one at a time
        cache = scratch.new_cache(2, 16)
        parts = [scratch(ids[:, :8], cache)] + [scratch(ids[:, i:i + 1], cache) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), ref, atol=1e-4, rtol=1e-4)
    assert cache.length == 12


def test_scratch_matches_course_tiny(course_tiny):
    model, tok = course_tiny
    ids = tok("def main():\n    return", return_tensors="pt")["input_ids"]
    scratch = ScratchLlama(model)
    with torch.inference_mode():
        ref = model(ids).logits
        cache = scratch.new_cache(1, ids.shape[1])
        a = scratch(ids[:, :-1], cache)
        b = scratch(ids[:, -1:], cache)
    torch.testing.assert_close(torch.cat([a, b], 1), ref, atol=1e-4, rtol=1e-4)


def test_static_decode_step_matches_dynamic_cache():
    model = make_tiny("llama")
    scratch = ScratchLlama(model)
    ids = _prompt(10)
    with torch.inference_mode():
        ref = model(ids).logits[:, -1]
        cache = scratch.new_cache(1, 32)  # bigger than needed: the empty slots must be masked
        scratch(ids[:, :9], cache)
        out = scratch.decode_static(ids[:, 9:], torch.tensor(9), cache)
        cos, sin = rope_tables(torch.arange(32)[None], scratch.shape.head_dim, scratch.shape.rope_theta, scratch.dtype)
        assert torch.equal(cache.rope[0], cos) and torch.equal(cache.rope[1], sin)  # every slot's, made once
        cache.rope = None  # a cache without them: the step computes its own
        again = scratch.decode_static(ids[:, 9:], torch.tensor(9), cache)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, out, atol=1e-6, rtol=1e-6)


def test_static_decode_step_reads_the_filled_slots_natively_where_built(monkeypatch):
    from course_lib.quantization import native
    if not native.available()[0]:
        pytest.skip("native kernels not built here")
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(a[3].item()) or real(*a))
    model = make_tiny("llama")
    scratch = ScratchLlama(model)
    ids = _prompt(10)
    with torch.inference_mode():
        cache = scratch.new_cache(1, 32)
        scratch(ids[:, :9], cache)
        out = scratch.decode_static(ids[:, 9:], torch.tensor(9), cache)
        monkeypatch.setattr(ScratchLlama, "_native_attention", lambda *a: False)  # the masked SDPA path instead
        ref = scratch.decode_static(ids[:, 9:], torch.tensor(9), cache)
    assert calls == [9] * model.config.num_hidden_layers
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_hf_forward_computes_only_the_last_positions_logits(course_tiny):
    # a prefill keeps one row of logits; computing all of them held B x T x vocabulary floats for nothing
    model, _ = course_tiny
    ids = _prompt(40, vocab=model.config.vocab_size, batch=3)
    rows_seen = []
    hook = model.lm_head.register_forward_hook(lambda _m, args, _out: rows_seen.append(args[0].shape[1]))
    try:
        with torch.inference_mode():
            last, cache = hf_forward(model, ids)
            full = model(ids).logits
    finally:
        hook.remove()
    assert rows_seen[0] == 1
    torch.testing.assert_close(last, full[:, -1], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 40


def test_building_blocks():
    x = torch.randn(2, 5, 16)
    w = torch.rand(16)
    want = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w
    torch.testing.assert_close(rms_norm(x, w, 1e-6), want)
    # RoPE is a rotation: it keeps each head vector's length
    q = torch.randn(1, 2, 5, 8)

    cos, sin = rope_tables(torch.arange(5)[None], 8, 10000.0, torch.float32)
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(naive_attention(q, k, v, mask), sdpa_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_cache_refuses_overflow_and_bad_sizes():
    shape = LlamaShape(64, 2, 4, 2, 16, 128, 1e-6, 10000.0)
    cache = KVCache(shape, 1, 4, torch.float32)
    assert cache.nbytes() == 2 * 2 * 1 * 2 * 4 * 16 * 4  # layers x (k, v) x batch x heads x slots x dim x bytes
    with pytest.raises(ValueError, match="full"):
        cache.write(0, torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16))
    with pytest.raises(ValueError, match="max_len"):
        KVCache(shape, 1, 0, torch.float32)
    for batch, max_len, match in ((True, 4, "batch"), (2.5, 4, "batch"), (1, 4.0, "max_len"), (1, True, "max_len")):
        with pytest.raises(ValueError, match=match):  # True was a batch (or a cache) of one
            KVCache(shape, batch, max_len, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        LlamaShape(64, 2, 4, 3, 16, 128, 1e-6, 10000.0)
    with pytest.raises(ValueError, match="attention"):
        ScratchLlama(make_tiny("llama"), attention="flash9")


# --- the four greedy loops agree --------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_loops_agree_with_hf_generate(family):
    model = make_tiny(family)
    ids = _prompt(7)
    ref = generate_hf(model, ids, 16)
    assert ref.shape == (1, 16)
    assert torch.equal(generate_kv_cache(model, ids, 16), ref)
    assert torch.equal(generate_no_cache(model, ids, 16), ref)
    assert torch.equal(generate_no_cache(ScratchLlama(model), ids, 16), ref)
    assert torch.equal(generate_kv_cache(model, ids, 16, attention="naive"), ref)


def test_stream_generate_matches_hf_and_is_deterministic():
    model, tok = make_tiny("llama"), _ByteTokenizer()
    steps = list(stream_generate(model, tok, "hello", max_new_tokens=9, stop_at_eos=False))
    assert [s.index for s in steps] == list(range(9))
    ids = encode_prompt(tok, "hello", torch.device("cpu"))
    assert [s.token_id for s in steps] == generate_hf(model, ids, 9)[0].tolist()
    again = [s.token_id for s in stream_generate(model, tok, "hello", max_new_tokens=9, stop_at_eos=False)]
    assert again == [s.token_id for s in steps]
    times = [s.time_s for s in steps]
    assert all(t > 0 for t in times) and times == sorted(times)  # timestamps: positive, in order
    assert generate(model, tok, "hello", max_new_tokens=9).startswith("hello")


def test_sampling_is_seeded():
    model, tok = make_tiny("llama"), _ByteTokenizer()
    a = [s.token_id for s in stream_generate(model, tok, "abc", 12, temperature=1.0, seed=3, stop_at_eos=False)]
    b = [s.token_id for s in stream_generate(model, tok, "abc", 12, temperature=1.0, seed=3, stop_at_eos=False)]
    c = [s.token_id for s in stream_generate(model, tok, "abc", 12, temperature=1.0, seed=4, stop_at_eos=False)]
    assert a == b and a != c
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert sample_next(logits).item() == 1
    assert sample_next(logits, temperature=1.0, top_k=1).item() == 1


@pytest.mark.parametrize("bad", [0, -3, 2.5, None, True])
def test_bad_token_counts_raise(bad):
    model, tok = make_tiny("llama"), _ByteTokenizer()
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(stream_generate(model, tok, "hi", max_new_tokens=bad))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_kv_cache(model, _prompt(), bad)


def test_empty_prompts_raise():
    model, tok = make_tiny("llama"), _ByteTokenizer()
    with pytest.raises(ValueError, match="empty"):
        list(stream_generate(model, tok, "", 4))
    with pytest.raises(ValueError, match="no tokens"):
        generate_no_cache(model, torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 3), temperature=-1)
    with pytest.raises(ValueError, match="prompts"):
        batched_generate(model, tok, ["ok", ""], 4)


def test_a_text_prompt_without_its_tokenizer_names_the_fix():
    model = make_tiny("llama")
    for call in (lambda: list(stream_generate(model, None, "def ", 4)), lambda: generate(model, None, "def ", 4),
                 lambda: encode_prompt(None, "def ", torch.device("cpu")),
                 lambda: batched_generate(model, None, ["def "], 4)):
        with pytest.raises(ValueError, match="tokenizer"):  # not "'NoneType' object is not callable"
            call()
    ids = _prompt()  # token ids need no tokenizer
    assert [s.token_id for s in stream_generate(model, None, ids, 3, stop_at_eos=False)] == \
        generate_kv_cache(model, ids, 3)[0].tolist()
    with pytest.raises(ValueError, match="text prompt"):
        generate(model, _ByteTokenizer(), ids, 3)  # generate is text -> text; ids go to stream_generate


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=True), "temperature"), (dict(temperature=-1), "temperature"),
    (dict(temperature=1.0, top_k=0), "top_k"), (dict(temperature=1.0, top_k=2.5), "top_k"),
    (dict(temperature=1.0, top_k=True), "top_k"), (dict(temperature=1.0, top_k=4), "vocabulary size"),
])
def test_bad_sampling_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_next(torch.zeros(1, 3), **kwargs)
    if match != "vocabulary size":
        with pytest.raises(ValueError, match=match):
            list(stream_generate(make_tiny("llama"), _ByteTokenizer(), "hi", 2, **kwargs))


def test_batched_left_padding_matches_one_by_one():
    model, tok = make_tiny("llama"), _ByteTokenizer()
    prompts = ["a much longer prompt", "hi", "medium one"]
    batch = batched_generate(model, tok, prompts, max_new_tokens=8)
    for p, got in zip(prompts, batch):
        ids = encode_prompt(tok, p, torch.device("cpu"))
        assert got == tok.decode(generate_hf(model, ids, 8)[0].tolist())


def test_attention_cost_rows():
    rows = attention_cost([16, 64], heads=2, head_dim=8, repeat=1)
    assert [(r["method"], r["seq_len"]) for r in rows] == [("naive", 16), ("sdpa", 16), ("naive", 64), ("sdpa", 64)]
    naive64 = rows[2]
    assert naive64["ms"] > 0 and naive64["scores_mb"] == 2 * 64 * 64 * 4 / 2**20
    # the naive version materialises at least the score matrix
    assert naive64["alloc_mb"] >= naive64["scores_mb"]


@pytest.mark.slow
def test_compiled_decoder_matches_eager():
    ok, why = compile_supported("cpu")
    if not ok:
        pytest.skip(why)
    from course_lib.generation import CompiledDecoder

    model = make_tiny("llama")
    ids = _prompt(6)
    assert torch.equal(CompiledDecoder(model)(ids, 8), generate_kv_cache(model, ids, 8))


# --- one forward pass that calls the model's own modules ---------------------------------

def _with_random_biases(model):
    """HF initialises biases to zero, which would hide a forward that drops them: make them count."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.5)
    return model


def _scratch_model(name, request):
    if name == "course-tiny":
        import copy

        return copy.deepcopy(request.getfixturevalue("course_tiny")[0])  # pruning changes it in place
    if name == "gqa-llama":
        return make_tiny("llama", num_heads=8, num_kv_heads=2)
    return _with_random_biases(make_tiny("qwen2", num_heads=8, num_kv_heads=4))  # q/k/v biases


@pytest.mark.parametrize("pruned", ["dense", "structured", "structured-hidden"])
@pytest.mark.parametrize("name", ["course-tiny", "gqa-llama", "qwen2-bias"])
def test_scratch_logits_match_transformers_dense_and_pruned(name, pruned, request):
    from course_lib.pruning import PruneConfig, prune_

    model = _scratch_model(name, request)
    if pruned != "dense":  # fewer MLP channels and KV groups (and a narrower residual stream)
        prune_(model, PruneConfig(ratio=0.5, hidden_ratio=0.25 if pruned == "structured-hidden" else 0.0))
    scratch = ScratchLlama(model)
    assert scratch.shape.n_heads == model.model.layers[0].self_attn.q_proj.out_features // scratch.shape.head_dim
    ids = _prompt(11, vocab=model.config.vocab_size, batch=2)
    with torch.inference_mode():
        ref = model(ids).logits
        torch.testing.assert_close(scratch(ids), ref, atol=1e-4, rtol=1e-4)
        cache = scratch.new_cache(2, 16)
        parts = [scratch(ids[:, :7], cache)] + [scratch(ids[:, i:i + 1], cache) for i in range(7, 11)]
        torch.testing.assert_close(torch.cat(parts, 1), ref, atol=1e-4, rtol=1e-4)
        static = scratch.new_cache(2, 16)
        scratch(ids[:, :10], static)
        torch.testing.assert_close(scratch.decode_static(ids[:, 10:], torch.tensor(10), static), ref[:, -1],
                                   atol=1e-4, rtol=1e-4)


def test_scratch_runs_whatever_replaced_a_linear():
    """A module that is not an nn.Linear (here: one that counts its calls) is called, not bypassed."""
    model = make_tiny("llama")
    calls = []
    layer = model.model.layers[1].mlp
    layer.up_proj.register_forward_hook(lambda *_: calls.append(1))
    ScratchLlama(model)(_prompt(5))
    assert calls == [1]


@pytest.mark.parametrize("family,bits", [("llama", 8), ("qwen2", 8), ("llama", 4)])
def test_quantized_model_runs_under_the_kv_cache_loop(family, bits):
    from course_lib.quantization import QuantConfig, quantize_

    model = make_tiny(family)
    quantize_(model, QuantConfig(bits=8) if bits == 8 else QuantConfig(bits=4, group_size=32))
    ids = _prompt(7)
    with torch.inference_mode():
        ref = model(ids).logits  # transformers running the same int8 modules
        torch.testing.assert_close(ScratchLlama(model)(ids), ref, atol=1e-3, rtol=1e-3)
    assert torch.equal(generate_kv_cache(model, ids, 12), generate_hf(model, ids, 12))


@pytest.mark.slow
def test_compiled_decoder_runs_a_quantized_int8_model():
    ok, why = compile_supported("cpu")
    if not ok:
        pytest.skip(why)
    from course_lib.generation import CompiledDecoder
    from course_lib.quantization import QuantConfig, quantize_

    model = make_tiny("llama")
    quantize_(model, QuantConfig(bits=8))
    ids = _prompt(6)
    assert torch.equal(CompiledDecoder(model)(ids, 8), generate_kv_cache(model, ids, 8))


@pytest.mark.parametrize("change", ["quantized", "a weight replaced", "a weight written in place"])
def test_compiled_decoder_follows_the_model_when_it_changes(change):
    # the step's guards on the model are dropped (ten thousand checks a token on the real model); the decoder
    # checks the model once per call instead and compiles anew when it changed
    from course_lib.generation import CompiledDecoder
    from course_lib.quantization import QuantConfig, quantize_

    torch.manual_seed(0)
    model = make_tiny("llama")
    ids = _prompt(6)
    dec = CompiledDecoder(model, backend="eager")
    before = dec(ids, 8)
    assert torch.equal(before, generate_kv_cache(model, ids, 8))
    down = model.model.layers[-1].mlp.down_proj
    if change == "quantized":
        quantize_(model, QuantConfig(bits=4, group_size=32))
    elif change == "a weight replaced":
        down.weight = torch.nn.Parameter(torch.randn_like(down.weight) * 3)
    else:
        with torch.no_grad():
            down.weight.mul_(-40)
    want = generate_kv_cache(model, ids, 8)
    assert torch.equal(dec(ids, 8), want)
    if change != "quantized":
        assert not torch.equal(want, before)  # the change mattered


def test_both_compiled_functions_of_a_decoder_filter_their_guards(monkeypatch):
    # torch.compile pops guard_filter_fn from the options it is given: each compile needs a dict of its own
    import course_lib.generation as generation

    seen = []
    real = generation._keep_argument_guards
    monkeypatch.setattr(generation, "_keep_argument_guards", lambda entries: seen.append(len(entries)) or
                        real(entries))
    model = make_tiny("llama")
    dec = generation.CompiledDecoder(model, backend="eager")
    with torch.inference_mode():
        dec(_prompt(6), 3)  # next_token
        cache = dec.scratch.new_cache(1, 16)
        dec.scratch(_prompt(6), cache)
        dec.step(_prompt(1), torch.tensor(6), cache)  # step
    assert len(seen) == 2 and all(seen)


def test_compiled_steps_keep_only_their_arguments_guards():
    from types import SimpleNamespace

    from course_lib.generation import _keep_argument_guards

    names = ["self", "self.scratch.layers[0].weight", "self[0]._modules['q_proj']", "cache.k[3]", "tok", "slot",
             "G['torch'].nn", "selfish"]
    assert _keep_argument_guards([SimpleNamespace(name=n) for n in names]) == [False, False, False, True, True,
                                                                                True, True, True]


def test_scratch_uses_each_norms_own_epsilon():
    model = make_tiny("llama")
    for mod in model.modules():
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = 0.3  # large enough to change the logits; the config still says 1e-6
    ids = _prompt(6)
    with torch.inference_mode():
        torch.testing.assert_close(ScratchLlama(model)(ids), model(ids).logits, atol=1e-4, rtol=1e-4)


def test_compiled_decoder_uses_cuda_graphs_only_on_cuda():
    from course_lib.generation import CompiledDecoder, compile_supported

    model = make_tiny()
    if not compile_supported(torch.device("cpu"))[0]:
        pytest.skip("torch.compile cannot build kernels here")
    dec = CompiledDecoder(model)  # torch.compile is lazy: nothing is compiled until the first call
    assert dec.mode == "default" and not dec.cuda_graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_decoder_with_cuda_graphs_matches_the_eager_loop():
    from course_lib.generation import CompiledDecoder

    model = make_tiny().cuda()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0)).cuda()
    want = generate_kv_cache(model, ids, 8)
    dec = CompiledDecoder(model)
    assert dec.mode == "reduce-overhead" and dec.cuda_graphs
    assert torch.equal(dec(ids, 8, max_len=24), want)
    assert torch.equal(dec(ids, 8, max_len=24), want)  # the reused, static cache: the replay is still right
    other = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1)).cuda()
    assert torch.equal(dec(other, 8, max_len=24), generate_kv_cache(model, other, 8))  # stale slots are masked
    plain = CompiledDecoder(model, mode="default")
    assert not plain.cuda_graphs and torch.equal(plain(ids, 8), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 0.15)])
def test_scratch_cache_on_cuda_matches_transformers(dtype, tol):
    model = make_tiny().to("cuda", dtype)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        ref = model(ids).logits.float()
        s = ScratchLlama(model)
        cache = s.new_cache(2, 16)
        mine = torch.cat([s(ids[:, :9], cache)] + [s(ids[:, i:i + 1], cache) for i in range(9, 12)], 1).float()
    assert (mine - ref).abs().max().item() < tol * ref.abs().max().item()
    assert torch.equal(generate_kv_cache(model, ids[:1], 8), generate_hf(model, ids[:1], 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_attention_cost_measures_gpu_memory():
    from course_lib.generation import attention_cost

    rows = attention_cost([256, 1024], heads=4, head_dim=32, dtype=torch.bfloat16, device="cuda", repeat=2)
    assert rows and all(r["ms"] > 0 and r["alloc_mb"] >= 0 for r in rows), rows


# --- q/k/v and gate/up as one matmul each ----------------------------------------------------------------

def _both_ways(model, ids):
    """Logits of the fused and the unfused forward: the whole prompt, then prefill + one-token decode steps."""
    out = {}
    for fuse in (True, False):
        s = ScratchLlama(model, fuse=fuse)
        with torch.inference_mode():
            cache = s.new_cache(ids.shape[0], ids.shape[1])
            steps = [s(ids[:, :-3], cache)] + [s(ids[:, i:i + 1], cache) for i in range(ids.shape[1] - 3, ids.shape[1])]
            out[fuse] = (s, s(ids), torch.cat(steps, 1))
    return out


@pytest.mark.parametrize("name", ["gqa-llama", "qwen2-bias", "pruned", "pruned-hidden", "bf16"])
def test_fused_projections_give_the_unfused_logits(name):
    from course_lib.pruning import PruneConfig, prune_

    if name == "qwen2-bias":
        model = _with_random_biases(make_tiny("qwen2", num_heads=8, num_kv_heads=4))  # biases on q/k/v only
    else:
        model = make_tiny("llama", num_heads=8, num_kv_heads=2)
    if name.startswith("pruned"):  # fewer heads and MLP channels: still plain Linear layers, still fused
        prune_(model, PruneConfig(ratio=0.5, hidden_ratio=0.25 if name == "pruned-hidden" else 0.0))
    if name == "bf16":
        model = model.to(torch.bfloat16)
    ids = _prompt(9, batch=2)
    out = _both_ways(model, ids)
    fused, unfused = out[True], out[False]
    n = model.config.num_hidden_layers
    assert fused[0].fused_layers == (n, n) and unfused[0].fused_layers == (0, 0)
    tol = dict(atol=2e-2, rtol=2e-2) if name == "bf16" else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], unfused[1], **tol)
    torch.testing.assert_close(fused[2], unfused[2], **tol)
    if name != "bf16":
        with torch.inference_mode():
            torch.testing.assert_close(fused[1], model(ids).logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(generate_kv_cache(fused[0], ids[:1], 8), generate_kv_cache(unfused[0], ids[:1], 8))


def test_a_quantized_or_hooked_projection_is_called_on_its_own():
    """Only plain float nn.Linear groups fuse: one int8 k_proj keeps that layer's q/k/v apart, the rest fuse."""
    from course_lib.quantization import Int8WeightOnlyLinear
    from course_lib.scratch_llama import fusable

    model = make_tiny("llama", layers=3)
    attn0 = model.model.layers[0].self_attn
    attn0.k_proj = Int8WeightOnlyLinear.from_linear(attn0.k_proj, compute_dtype=torch.float32)
    calls = []
    model.model.layers[2].mlp.up_proj.register_forward_hook(lambda *_: calls.append(1))
    s = ScratchLlama(model)
    assert s.qkv[0] is None and s.qkv[1] is not None and s.qkv[2] is not None
    assert s.gate_up[2] is None and s.gate_up[0] is not None and s.fused_layers == (2, 2)
    ids = _prompt(6)
    with torch.inference_mode():
        mine = s(ids)
        assert calls == [1]  # the hooked up_proj was called, not bypassed by a fused copy
        torch.testing.assert_close(mine, model(ids).logits, atol=1e-4, rtol=1e-4)
    lin = torch.nn.Linear(4, 3)
    assert fusable((lin, torch.nn.Linear(4, 5)))
    assert not fusable((lin, torch.nn.Linear(4, 5, bias=False)))  # a bias on one only
    assert not fusable((lin, torch.nn.Linear(6, 5)))  # another input width
    assert not fusable((lin, torch.nn.Linear(4, 5).to(torch.bfloat16)))  # another dtype
    with pytest.raises(ValueError, match="fuse"):
        ScratchLlama(model, fuse="yes")


def test_fused_weights_follow_the_models_weights():
    """Weights written after the ScratchLlama was built (training, load_state_dict) are used, not a stale copy."""
    model = make_tiny("llama")
    s = ScratchLlama(model)
    fused = s.qkv[0]
    ids = _prompt(6)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(3.0)  # in place
        model.model.layers[1].mlp.up_proj.weight.add_(0.5)
    with torch.inference_mode():
        torch.testing.assert_close(s(ids), model(ids).logits, atol=1e-4, rtol=1e-4)
    assert s.qkv[0] is fused  # refreshed in place: a compiled graph holding it stays valid
    other = make_tiny("llama", seed=7)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(s(ids), other(ids).logits, atol=1e-4, rtol=1e-4)
    model.model.layers[1].self_attn.v_proj = torch.nn.Linear(64, 32, bias=True)  # a new module, now with a bias
    with torch.inference_mode():
        torch.testing.assert_close(s(ids), model(ids).logits, atol=1e-4, rtol=1e-4)
    assert s.qkv[1] is None and s.qkv[0] is not None  # q/k have no bias: that layer runs unfused now


def test_compiled_graph_of_the_fused_forward_matches_eager():
    """The static-cache step traced by torch.compile (graph only: seconds) with fused projections, refreshed."""
    from course_lib.generation import CompiledDecoder

    model = make_tiny("llama")
    ids = _prompt(6)
    dec = CompiledDecoder(model, backend="eager")
    assert dec.scratch.fused_layers == (2, 2)
    assert torch.equal(dec(ids, 8), generate_kv_cache(ScratchLlama(model, fuse=False), ids, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)  # a different model: the same decoder must now give its tokens
    assert torch.equal(dec(ids, 8), generate_hf(model, ids, 8))


# --- bad input is refused before any work, naming the argument and the fix ------------------------

def _every_id_loop(model):
    """Each entry point that takes prompt ids, as a call of (ids, max_new_tokens)."""
    from course_lib.generation import CompiledDecoder

    compiled = CompiledDecoder(model, backend="eager")
    return {"stream_generate": lambda ids, n: list(stream_generate(model, None, ids, n)),
            "generate_no_cache": lambda ids, n: generate_no_cache(model, ids, n),
            "generate_kv_cache": lambda ids, n: generate_kv_cache(model, ids, n),
            "generate_hf": lambda ids, n: generate_hf(model, ids, n),
            "CompiledDecoder": lambda ids, n: compiled(ids, n)}


def test_ids_outside_the_vocabulary_or_not_integers_are_refused_by_every_loop():
    model = make_tiny("llama", vocab=128)
    for run in _every_id_loop(model).values():
        for bad, match in ((torch.tensor([[5, 128]]), "token id 128.*vocabulary of 128"),
                           (torch.tensor([[5, -1]]), "token id -1"),
                           (torch.tensor([[5.0, 6.0]]), "integer token ids")):
            with pytest.raises(ValueError, match=match):  # was IndexError / "Expected ... Long, Int" deep inside
                run(bad, 2)
        with pytest.raises(ValueError, match="prompt_ids must be a tensor|prompt must be a str"):
            run([5, 6], 2)


def test_prompt_plus_new_tokens_beyond_the_context_is_refused():
    model = make_tiny("llama")  # max_position_embeddings=256
    for run in _every_id_loop(model).values():
        # was a 256 GB allocation (static cache of 10**9 slots) or a silent run past the trained positions
        with pytest.raises(ValueError, match=r"max_new_tokens \(1000000000\) \+ prompt length .*context of 256"):
            run(_prompt(7), 10**9)
        with pytest.raises(ValueError, match="context of 256.*shorten the prompt"):
            run(_prompt(300), 2)
        run(_prompt(250), 6)  # exactly the context: allowed
    with pytest.raises(ValueError, match="longest prompt.*context of 256"):
        batched_generate(model, _ByteTokenizer(), ["x" * 300, "y"], 2)


def test_a_too_long_prompt_is_truncated_from_the_left_when_asked():
    model = make_tiny("llama")
    long = _prompt(300)
    with pytest.raises(ValueError, match="truncate=True"):
        list(stream_generate(model, None, long, 4))
    with pytest.warns(UserWarning, match="kept the last 252 tokens"):
        steps = list(stream_generate(model, None, long, 4, stop_at_eos=False, truncate=True))
    assert steps[0].prompt_tokens == 252
    assert [s.token_id for s in steps] == generate_kv_cache(model, long[:, -252:], 4)[0].tolist()
    with pytest.raises(ValueError, match="max_new_tokens <= 255"):  # no prompt is short enough for 300 new tokens
        list(stream_generate(model, None, _prompt(3), 300, truncate=True))
    with pytest.raises(ValueError, match="truncate"):
        list(stream_generate(model, None, long, 4, truncate="yes"))
    with pytest.warns(UserWarning, match="context of 256"):
        assert generate(model, _ByteTokenizer(), "a" * 300, 2, truncate=True).startswith("a" * 300)


def test_a_lone_surrogate_in_a_prompt_names_the_argument():
    model, tok = make_tiny("llama"), _ByteTokenizer()
    for call, name in ((lambda: list(stream_generate(model, tok, "def \ud800 f", 2)), "prompt"),
                       (lambda: generate(model, tok, "x\udc80", 2), "prompt"),
                       (lambda: batched_generate(model, tok, ["ok", "a\ud83d"], 2), r"prompts\[1\]")):
        with pytest.raises(ValueError, match=name + ".*lone surrogate"):  # was a TypeError from the tokenizer
            call()


def test_the_llama_only_loops_name_the_architectures_they_take():
    from transformers import GPT2Config, GPT2LMHeadModel

    from course_lib.generation import CompiledDecoder

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()
    for call in (lambda: generate_kv_cache(gpt2, _prompt(5), 2), lambda: CompiledDecoder(gpt2, backend="eager"),
                 lambda: batched_generate(gpt2, _ByteTokenizer(), ["hi"], 2), lambda: ScratchLlama(gpt2)):
        with pytest.raises(ValueError, match=r"\['llama', 'mistral', 'qwen2'\]\), got 'gpt2'.*stream_generate"):
            call()  # was AttributeError: 'GPT2LMHeadModel' object has no attribute 'model'
    # the loops that call the model's own forward take it, as the message says
    assert generate_no_cache(gpt2, _prompt(5), 3).tolist() == generate_hf(gpt2, _prompt(5), 3).tolist()
    assert len(list(stream_generate(gpt2, None, _prompt(5), 3, stop_at_eos=False))) == 3


def test_each_decoder_compiles_code_of_its_own():
    # dynamo's recompile limit (8 graphs) is per code object: shared by every decoder, a process that builds
    # many (the whole test suite did) hit it and failed hard under fullgraph=True
    from course_lib.generation import CompiledDecoder

    model = make_tiny(hidden=32, intermediate=64, vocab=64)
    a, b = CompiledDecoder(model, backend="eager"), CompiledDecoder(model, backend="eager")
    codes = {d.next_token._torchdynamo_orig_callable.__code__ for d in (a, b)}
    codes |= {d.step._torchdynamo_orig_callable.__code__ for d in (a, b)}
    assert len(codes) == 4
    ids = torch.tensor([[3, 17, 5]])
    assert torch.equal(a(ids, 4), b(ids, 4))


def test_compiled_decoder_stops_at_eos_for_one_sequence_and_refuses_a_batch():
    from course_lib.generation import CompiledDecoder

    model = make_tiny("llama")
    ids = _prompt(6)
    dec = CompiledDecoder(model, backend="eager")
    free = dec(ids, 10)[0].tolist()
    eos = free[3]
    stopped = dec(ids, 10, eos=eos)[0].tolist()
    assert stopped == free[:free.index(eos) + 1]  # up to and with the first eos, as plain generation stops
    with pytest.raises(ValueError, match="batch of 1"):
        dec(torch.cat([ids, ids]), 10, eos=eos)

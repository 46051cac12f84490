"""KV memory of attention variants: the published configs' bytes by hand, and against measured caches."""

from __future__ import annotations

import pytest
import torch

from course_lib.generation import hf_forward
from course_lib.kv_memory import (
    PUBLISHED,
    KVLayout,
    attention_table,
    cache_nbytes,
    kv_layout,
    published_config,
    transformers_cache_bytes,
)
from course_lib.models import count_parameters, load_model, speed_lab_config, speed_lab_model
from course_lib.scratch_llama import ScratchLlama


def test_bytes_per_token_by_hand_for_mha_gqa_mqa_and_mla():
    bf16 = 2
    assert kv_layout(PUBLISHED["Llama-2-7B"].config).bytes_per_token() == 32 * 2 * 32 * 128 * bf16  # 512 KiB
    assert kv_layout(PUBLISHED["Llama-3-8B"].config).bytes_per_token() == 32 * 2 * 8 * 128 * bf16
    assert kv_layout(PUBLISHED["Falcon-7B"].config).bytes_per_token() == 32 * 2 * 1 * 64 * bf16
    # MLA: one latent of kv_lora_rank values plus the rope key, per layer, for all 128 heads
    assert kv_layout(PUBLISHED["DeepSeek-V3"].config).bytes_per_token() == 61 * (512 + 64) * bf16
    kinds = {name: kv_layout(p.config).kind for name, p in PUBLISHED.items()}
    assert (kinds["Llama-2-7B"], kinds["Qwen2.5-7B"], kinds["Falcon-7B"], kinds["DeepSeek-V2"]) == \
        ("MHA", "GQA", "MQA", "MLA")


def test_the_context_where_the_cache_outweighs_the_weights_by_hand():
    rows = {r["model"]: r for r in attention_table(batch=1)}
    # Llama-2-7B: 6.74e9 parameters x 2 bytes over 524,288 bytes per token
    assert rows["Llama-2-7B"]["cache_outweighs_weights_at"] == 13_480_000_000 // 524_288 + 1 == 25_712
    # Mistral-7B keeps a window of 4096 tokens in every layer: its cache stops at 512 MiB and never catches up
    mistral = kv_layout(PUBLISHED["Mistral-7B-v0.1"].config)
    assert mistral.bytes(100_000) == mistral.bytes(4096) == 32 * 2 * 8 * 128 * 2 * 4096
    assert rows["Mistral-7B-v0.1"]["cache_outweighs_weights_at"] is None
    # ... but 32 sequences' full windows do: 14.48 GB / (32 x 131,072 bytes per token)
    assert mistral.context_to_outweigh(14.48e9, batch=32) == 14_480_000_000 // (32 * 131_072) + 1
    # Gemma-2-9B: past the window only the 21 global layers grow
    gemma = kv_layout(PUBLISHED["Gemma-2-9B"].config)
    assert (gemma.sliding_layers, gemma.window) == (21, 4096)
    per_layer = 2 * 8 * 256 * 2
    assert gemma.bytes(10_000) == 21 * per_layer * 10_000 + 21 * per_layer * 4096
    t = rows["Gemma-2-9B"]["cache_outweighs_weights_at"]
    assert gemma.bytes(t) > 9.24e9 * 2 >= gemma.bytes(t - 1)


def test_published_configs_have_their_published_parameter_counts():
    from transformers import AutoModelForCausalLM

    for name, pub in PUBLISHED.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(published_config(name))
        assert count_parameters(model) / 1e9 == pytest.approx(pub.params_b, rel=0.005), name


@pytest.mark.parametrize("name", ["Llama-2-7B", "Falcon-7B", "Gemma-2-9B", "DeepSeek-V3"])
def test_transformers_allocates_the_cache_the_table_counts(name):
    """transformers' own classes, run on the meta device, hold what the arithmetic says (MLA: the latent)."""
    cfg = {**PUBLISHED[name].config, "num_hidden_layers": 4}  # every layer alike (DeepSeek-V3: 3 dense, 1 MoE)
    assert transformers_cache_bytes(cfg, 40, batch=2) == kv_layout(cfg).bytes(40, batch=2)


def test_a_sliding_window_cache_stops_growing_in_transformers_too():
    cfg = PUBLISHED["Mistral-7B-v0.1"].config
    lay = kv_layout(cfg)
    got = transformers_cache_bytes(cfg, 5000)
    # transformers keeps W - 1 tokens (what the next token attends to besides itself), the paper's buffer W
    assert got == lay.bytes(5000) - lay.layers * lay.values_per_layer * 2


def test_the_course_models_measured_caches_match_the_table():
    model, tok = load_model("course-tiny")
    lay = kv_layout(model.config)
    assert lay.kind == "GQA"
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    scratch = ScratchLlama(model)
    assert cache_nbytes(scratch.new_cache(2, 24)) == lay.bytes(24, batch=2, kv_bits=32)  # fp32 cache
    with torch.inference_mode():
        _, hf = hf_forward(model, ids)
    assert cache_nbytes(hf) == lay.bytes(24, batch=2, kv_bits=32)
    # SmolLM2-135M (the real model's shapes), two of its 30 layers, bf16: the table's row per layer
    speed, cfg = speed_lab_model("smollm2-135m", dtype="bf16", num_layers=2, device="cpu")
    with torch.inference_mode():
        _, hf = hf_forward(speed, ids)
    row = kv_layout(PUBLISHED["SmolLM2-135M"].config)
    assert cache_nbytes(hf) == row.bytes(24, batch=2) * 2 / 30
    assert kv_layout(speed_lab_config("smollm2-135m")) == row


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="window"):
        KVLayout("GQA", layers=4, values_per_layer=8, sliding_layers=2, window=0)
    with pytest.raises(ValueError, match="kind"):
        KVLayout("MoE", layers=4, values_per_layer=8)
    with pytest.raises(ValueError, match="unknown published model"):
        published_config("GPT-5")
    with pytest.raises(ValueError, match="model_type"):
        kv_layout({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="kv_bits"):
        kv_layout(PUBLISHED["Llama-3-8B"].config).bytes(10, kv_bits=0)

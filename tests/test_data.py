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

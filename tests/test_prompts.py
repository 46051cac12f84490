"""The fixed agreement prompts and the prose corpus they are judged beside."""

from __future__ import annotations

import pytest
import torch

from course_lib import data
from course_lib.metrics import answer_agreement, greedy_answers
from course_lib.prompts import KINDS, prompts


def test_fifty_fixed_prompts_in_three_kinds():
    allp = prompts()
    assert len(allp) == 50 and {k for k, _ in allp} == set(KINDS)
    assert len({p for _, p in allp}) == 50  # no duplicates
    assert len(prompts(2)) == 6
    assert [p for _, p in prompts(2)][:2] == [p for k, p in allp if k == KINDS[0]][:2]
    with pytest.raises(ValueError, match="per_kind"):
        prompts(0)
    with pytest.raises(ValueError, match="choose from"):
        prompts(kinds=("poems",))


def test_prose_splits_are_disjoint_and_the_eval_slice_is_fixed(course_tiny):
    _, tok = course_tiny
    held = {d.path for d in data.prose_documents("heldout")}
    train = {d.path for d in data.prose_documents("train")}
    assert held and train and not held & train
    ids = data.encode_prose(tok)
    assert ids.shape == (data.PROSE_EVAL_TOKENS,) and torch.equal(ids, data.encode_prose(tok))
    assert torch.equal(data.encode_prose(tok, max_tokens=100), ids[:100])
    with pytest.raises(ValueError, match="split"):
        data.prose_documents("test")
    calib = data.prose_calibration_batches(tok, n=2, seq_len=16)
    assert calib.shape == (2, 16) and calib.dtype == torch.long


def test_agreement_on_plain_text_prompts(course_tiny):
    """A model without a chat template reads the prompts as text; against itself it agrees fully."""
    model, tok = course_tiny
    few = [("code", "def add(a, b):"), ("code", "import os\n")]
    ref = greedy_answers(model, tok, few, n_tokens=5)
    assert ref.shape == (2, 5)
    same = answer_agreement(model, tok, ref, few, n_tokens=5)
    assert same.exact == 1.0 and same.rows[0]["matched_tokens"] == 5
    with pytest.raises(ValueError, match="shape"):
        answer_agreement(model, tok, ref[:1], few, n_tokens=5)

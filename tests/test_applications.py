"""Latency budgets: the arithmetic of streaming, the presets, roofline timings."""

from __future__ import annotations

import pytest

from course_lib.applications import BUDGETS, LatencyBudget, budget_table, check_budget, e2e_seconds, roofline_timing
from course_lib.models import speed_lab_config
from course_lib.roofline import VENDOR_PRESETS


def test_e2e_is_ttft_plus_gaps():
    assert e2e_seconds(0.5, 0.1, 1) == 0.5
    assert e2e_seconds(0.5, 0.1, 11) == pytest.approx(1.5)


def test_check_budget_flags_each_target():
    b = LatencyBudget("t", ttft_s=1.0, tpot_s=0.1, answer_tokens=11, e2e_s=2.0)
    row = check_budget(b, ttft_s=0.5, tpot_s=0.1)
    assert row["meets_all"] and row["e2e_s"] == pytest.approx(1.5) and row["headroom"] == pytest.approx(1.0)
    slow_first = check_budget(b, ttft_s=1.5, tpot_s=0.01)
    assert not slow_first["meets_ttft"] and slow_first["meets_tpot"] and not slow_first["meets_all"]
    slow_stream = check_budget(b, ttft_s=0.1, tpot_s=0.5)
    assert slow_stream["meets_ttft"] and not slow_stream["meets_tpot"] and not slow_stream["meets_e2e"]
    assert slow_stream["headroom"] < 1


def test_presets_are_ordered_by_strictness():
    assert BUDGETS["voice assistant"].ttft_s < BUDGETS["customer service"].ttft_s < BUDGETS["text generation"].ttft_s
    rows = budget_table(0.3, 0.05)
    assert [r["application"] for r in rows] == list(BUDGETS)
    assert all(r["meets_all"] for r in rows)
    assert check_budget("voice assistant", 0.3, 0.05)["meets_all"]


def test_roofline_timing_faster_on_bigger_hardware_and_fewer_bits():
    cfg = speed_lab_config("qwen2.5-0.5b")
    h200, l4 = VENDOR_PRESETS["NVIDIA H200 SXM (vendor spec)"], VENDOR_PRESETS["NVIDIA L4 (vendor spec)"]
    ttft_h, tpot_h = roofline_timing(cfg, h200)
    ttft_l, tpot_l = roofline_timing(cfg, l4)
    assert ttft_h < ttft_l and tpot_h < tpot_l
    _, tpot_int4 = roofline_timing(cfg, l4, weight_bits=4)
    assert tpot_int4 < tpot_l  # decode is memory-bound: fewer bytes, shorter step
    _, tpot_t4 = roofline_timing(cfg, VENDOR_PRESETS["NVIDIA T4 (vendor spec)"])  # no bf16 figure: fp16
    assert tpot_t4 > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(ttft_s=0), "ttft_s"), (dict(tpot_s=-1), "tpot_s"), (dict(answer_tokens=0), "answer_tokens"),
    (dict(ttft_s=float("nan")), "ttft_s"), (dict(e2e_s=float("nan")), "e2e_s"), (dict(tpot_s=float("inf")), "tpot_s"),
    (dict(answer_tokens=True), "answer_tokens"), (dict(answer_tokens=10.5), "answer_tokens"),
    (dict(ttft_s="1"), "ttft_s"),
])
def test_bad_budget(kwargs, match):
    base = dict(name="x", ttft_s=1.0, tpot_s=0.1, answer_tokens=10, e2e_s=5.0)
    with pytest.raises(ValueError, match=match):
        LatencyBudget(**{**base, **kwargs})


def test_unknown_budget_name():
    with pytest.raises(ValueError, match="customer service"):
        check_budget("chatbot", 0.1, 0.1)


@pytest.mark.parametrize("ttft, tpot, match", [
    (float("nan"), 0.1, "ttft_s"), (0.5, float("nan"), "tpot_s"), (-0.5, 0.1, "ttft_s"), (0.5, float("inf"), "tpot_s"),
])
def test_a_bad_measurement_is_refused_not_judged(ttft, tpot, match):
    # NaN compares False with every target: it was reported as missing all of them (or, as headroom, NaN)
    with pytest.raises(ValueError, match=match):
        check_budget("voice assistant", ttft, tpot)
    with pytest.raises(ValueError, match=match):
        e2e_seconds(ttft, tpot, 10)


def test_a_one_token_answer_has_no_gap_and_infinite_tpot_headroom():
    # Finished.tpot_s is 0.0 for a one-token answer; that was a ZeroDivisionError
    row = check_budget("voice assistant", 0.2, 0.0)
    assert row["meets_all"] and row["headroom"] == pytest.approx(0.5 / 0.2)
    with pytest.raises(ValueError, match="answer_tokens"):
        e2e_seconds(0.5, 0.1, 2.5)


def test_budget_targets_are_the_presets():
    from course_lib.applications import budget_targets

    t = budget_targets()
    assert list(t) == list(BUDGETS)
    voice = BUDGETS["voice assistant"]
    assert t["voice assistant"] == (voice.ttft_s * 1e3, voice.min_tokens_per_s)


def test_interleaved_generation_reports_medians_and_spreads():
    import torch

    from course_lib.applications import interleaved_generation
    from tests.conftest import make_tiny

    models = {"a": make_tiny(), "b": make_tiny(layers=1)}
    out = interleaved_generation(models, torch.tensor([[1, 2, 3]]), new_tokens=4, rounds=3)
    for r in out.values():
        assert r["ttft"].count == 3 and r["tpot"].count == 3 and r["ttft"].p10 <= r["ttft"].median <= r["ttft"].p90
        assert r["timing"].new_tokens == 4
    with pytest.raises(ValueError, match="rounds"):
        interleaved_generation(models, torch.tensor([[1]]), 4, rounds=0)

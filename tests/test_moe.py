"""Mixture-of-experts speed lab: published shapes, active parameters, routing, the decode sweep."""

from __future__ import annotations

import pytest
import torch

from course_lib.generation import hf_forward
from course_lib.models import MOE_PUBLISHED_PARAMS, SPEED_LAB_MOE_CONFIGS, count_parameters, speed_lab_model
from course_lib.moe import count_active_parameters, decode_sweep, distinct_experts, routed_experts
from course_lib.roofline import MoEDims
from tests.conftest import make_tiny


@pytest.mark.parametrize("name", sorted(SPEED_LAB_MOE_CONFIGS))
def test_moe_shapes_have_their_published_total_and_active_parameters(name):
    model, cfg = speed_lab_model(name, device="meta", dtype="bf16")  # shapes only: no memory
    pub = MOE_PUBLISHED_PARAMS[name]
    total, active = count_parameters(model), count_active_parameters(model)
    # the published figures are rounded to 2-3 digits ("3.3B" for 3.35B)
    assert total / 1e9 == pytest.approx(pub["total_b"], rel=0.01), total
    assert active / 1e9 == pytest.approx(pub["active_b"], rel=0.02), active
    # the roofline's count of one token's weights is the same, less the embedding table it does not read
    dims = MoEDims.from_config(cfg)
    assert dims.active_decode_params == pytest.approx(active - cfg.vocab_size * cfg.hidden_size, rel=1e-3)


def test_cutting_layers_keeps_every_other_dimension():
    full = speed_lab_model("qwen3-30b-a3b", device="meta")[1]
    cut = speed_lab_model("qwen3-30b-a3b", device="meta", num_layers=2)[1]
    keep = ("hidden_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "head_dim", "vocab_size")
    assert cut.num_hidden_layers == 2 and all(getattr(cut, k) == getattr(full, k) for k in keep)


def tiny_moe(experts: int = 16, top_k: int = 2):
    torch.manual_seed(0)
    return make_tiny("olmoe", num_heads=4, num_kv_heads=4, hidden=64, intermediate=32, layers=2,
                     num_experts=experts, num_experts_per_tok=top_k)


def test_count_active_parameters_by_hand_and_refuses_a_dense_model():
    model = tiny_moe()
    expert = 3 * 64 * 32
    assert count_active_parameters(model) == count_parameters(model) - 2 * (16 - 2) * expert
    with pytest.raises(ValueError, match="count_parameters"):
        count_active_parameters(make_tiny("llama"))


def test_routed_experts_are_the_router_s_top_k_and_leave_the_cache_as_it_was():
    model = tiny_moe()
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _, past = hf_forward(model, ids)
    step = torch.randint(0, 128, (3, 1), generator=torch.Generator().manual_seed(2))
    routed = routed_experts(model, step, past)
    assert past.get_seq_length() == 5  # the routing pass was cropped off again
    assert len(routed) == 2 and all(r.shape == (3, 2) for r in routed)
    # the same experts the layer's own router picks, read from a hook on it
    seen = []
    hook = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, i, o: seen.append(o[2]))
    with torch.inference_mode():
        model(input_ids=step, cache=past, use_cache=True)
    hook.remove()
    assert torch.equal(routed[0].sort(-1).values, seen[0].sort(-1).values)
    assert distinct_experts(torch.tensor([[0, 3], [3, 5], [5, 0]])) == 3


def test_decode_sweep_counts_more_experts_for_bigger_batches():
    model = tiny_moe()
    rows = decode_sweep(model, batches=(1, 16), context=4, warmup=0, repeat=1, bandwidth_gbs=10.0)
    one, many = rows
    assert one["experts_measured"] == 2 and one["experts_expected"] == pytest.approx(2)
    assert 2 < many["experts_measured"] <= 16 and many["step_MB"] > one["step_MB"]
    assert one["roofline_ms"] == pytest.approx(one["step_MB"] / 10.0)  # MB at 10 GB/s, in ms
    assert {"ms", "p10_ms", "p90_ms", "achieved_GBs"} <= set(one)
    with pytest.raises(ValueError, match="batch"):
        decode_sweep(model, batches=(0,))

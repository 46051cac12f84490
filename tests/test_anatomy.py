"""Tests for course_lib.anatomy's step profile: which events count as weight matmuls, and what one step costs."""

from __future__ import annotations

import pytest
import torch

from course_lib.anatomy import is_matrix_kernel, profile_step


def test_weight_matmuls_are_told_from_the_rest_of_a_step():
    for name in ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
                 "course_lib.streaming int4", "graph_0_cpp_fused__to_copy_mul_sum_3"):
        assert is_matrix_kernel(name), name
    for name in ("aten::add", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "graph_0_cpp_fused__to_copy_add_mean_mul_pow_rsqrt_0", "graph_1_cpp_fused__softmax_amax_exp_sum_2",
                 "graph_0_cpp_fused_argmax_7"):
        assert not is_matrix_kernel(name), name


def test_profile_step_counts_aten_calls_and_the_matmul_share():
    w = torch.randn(256, 256)
    x = torch.randn(1, 256)
    out = profile_step(lambda: torch.relu(x @ w.T) + 1, steps=2)
    assert out["aten_calls"] >= 3  # matmul, relu, add (and what they call)
    assert 0 < out["matrix_ms"] <= out["step_ms"] and 0 < out["matrix_share"] <= 1
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        profile_step(lambda: None, steps=0)

"""Tools side by side: every row measured or honestly marked, and the same logits as eager."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from course_lib.tools import TOOLS, export_onnx, installed, side_by_side, tool_table

from .conftest import make_tiny

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None


def test_tool_table_lists_every_tool_with_install_state():
    rows = tool_table()
    assert [r["tool"] for r in rows] == [t.name for t in TOOLS]
    by_name = {r["tool"]: r for r in rows}
    assert by_name["torch.compile"]["installed_here"] is True  # torch is always here
    for t in TOOLS:
        assert by_name[t.name]["installed_here"] == installed(t)
    assert {"vLLM", "TensorRT-LLM", "llama.cpp", "ONNX Runtime", "torchao", "bitsandbytes", "Optimum"} <= set(by_name)


def test_side_by_side_rows_are_measured_or_explained():
    m = make_tiny("llama", vocab=64, hidden=32, intermediate=64)
    rows = side_by_side(m, seq_lens=(1, 4), warmup=0, repeat=1)
    assert {r["seq_len"] for r in rows} == {1, 4}
    for r in rows:
        if r["status"] == "measured here":
            assert 0 < r["p10_ms"] <= r["ms"] <= r["p90_ms"] and r["tokens_per_s"] > 0
            assert r["tool"] in r["verdict"] and "pytorch eager fp32" in r["verdict"]  # measured, vs the baseline
            # every tool must compute (nearly) the same logits as PyTorch fp32
            tol = 1e-4 if "fp32" in r["tool"] else 0.5
            assert r["max_abs_diff"] < tol, r
        else:
            assert r["ms"] is None and r["status"]
    base = [r for r in rows if r["tool"] == "pytorch eager fp32"]
    assert all(r["speedup"] == 1.0 and r["max_abs_diff"] == 0.0 for r in base)
    ort_rows = [r for r in rows if r["tool"] == "onnxruntime fp32"]
    assert all((r["status"] == "measured here") == HAS_ORT for r in ort_rows)


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnxscript not installed")
def test_export_onnx_refuses_to_overwrite(tmp_path):
    from course_lib.tools import OrtModel

    m = make_tiny("llama", vocab=64, hidden=32, intermediate=64)
    path = export_onnx(m, tmp_path / "m.onnx")
    ids = torch.randint(0, 64, (1, 7))
    with torch.inference_mode():
        ref = m(input_ids=ids, use_cache=False).logits
    assert torch.allclose(OrtModel(path)(ids), ref, atol=1e-4)  # dynamic length: 7 was never seen at export
    with pytest.raises(ValueError, match="overwrite=True"):
        export_onnx(m, path)


@pytest.mark.parametrize("seq_lens", [(0,), (True,), (2.5,), 128, (), None])
def test_bad_seq_lens(seq_lens):
    with pytest.raises(ValueError, match="seq_lens"):
        side_by_side(make_tiny("llama"), seq_lens=seq_lens)

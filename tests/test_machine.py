"""Measuring the machine: bandwidth, the compute peak of a compute-bound matmul, what a GEMV achieves."""

from __future__ import annotations

import pytest
import torch

from course_lib import machine
from course_lib.machine import measure_bandwidth, measure_gemv_bandwidth, measure_machine, measure_matmul_flops
from course_lib.models import speed_lab_config
from course_lib.roofline import decode_cost, predict

NAN = float("nan")

def test_measurements_refuse_bad_sizes_before_any_work():
    for call, match in ((lambda: machine.measure_bandwidth(size_mb=True), "size_mb"),
                        (lambda: machine.measure_bandwidth(size_mb=2.5), "size_mb"),
                        (lambda: machine.measure_bandwidth(size_mb=4, repeat=0), "repeat"),
                        (lambda: machine.measure_matmul_flops(n=0), "n must"),
                        (lambda: machine.measure_peak_flops(max_n=256.0), "max_n"),
                        (lambda: machine.measure_peak_flops(min_seconds=NAN), "min_seconds"),
                        (lambda: machine.measure_gemv_bandwidth(rows=True), "rows")):
        with pytest.raises(ValueError, match=match):
            call()


def test_machine_measurements_are_positive_and_finite():
    for kind in ("copy", "triad"):
        bw = measure_bandwidth(size_mb=32, repeat=2, kind=kind)
        assert 0.1 < bw < 10_000
    assert measure_matmul_flops(128, torch.float32, repeat=2) > 0.01
    assert measure_gemv_bandwidth(256, 256, torch.float32, repeat=2) > 0.01
    with pytest.raises(ValueError, match="kind"):
        measure_bandwidth(kind="scale")


def test_measure_machine_returns_the_roofs_and_the_gemv_rate():
    hw = measure_machine("cpu", matmul_n=128, stream_mb=4, gemv_shape=(256, 256), repeat=1)
    assert hw.bandwidth_gbs > 0 and "fp32" in hw.gflops
    for k in hw.gflops:
        assert hw.gflops[k] > 0 and hw.gemv_gbs[k] > 0 and hw.matmul_gflops[k] == hw.gflops[k]
        assert hw.matmul_n[k] <= 128 and hw.ridge(k) > 0 and hw.gemv_gflops(k) > 0
    assert measure_bandwidth(size_mb=4, repeat=1, kind="read") > 0


def test_peak_is_a_compute_bound_matmul_never_a_gemv(monkeypatch):
    """A square matmul only reaches the peak when it is large; a GEMV's FLOP rate must never stand in for it.

    Fake machine: the matmul rate grows with n up to 300 GFLOP/s; a bf16 GEMV streams 40 GB/s (= 40 GFLOP/s).
    The old measure_machine took max(matmul at one small n, GEMV FLOP rate) as the peak, which made bf16 decode
    of SmolLM2 look compute-bound.
    """
    monkeypatch.setattr(machine, "supported_dtypes", lambda device="cpu": {"fp32": True, "bf16": True, "fp16": False})
    monkeypatch.setattr(machine, "measure_matmul_flops",
                        lambda n, dtype=None, repeat=5, device="cpu": min(300.0, 0.05 * n))
    monkeypatch.setattr(machine, "measure_gemv_bandwidth", lambda *a, **k: 40.0)
    monkeypatch.setattr(machine, "measure_bandwidth", lambda *a, **k: 20.0)
    hw = machine.measure_machine("cpu", quick=True)
    p = predict(decode_cost(speed_lab_config("smollm2-135m"), batch=1, context=512), hw, "bf16")
    assert p.bound == "memory" and p.memory_s > p.compute_s
    gemv_flops = 2 * hw.gemv_gbs["bf16"] / 2  # 2 FLOPs per 2-byte weight streamed
    assert hw.gflops["bf16"] > gemv_flops == 40.0
    assert hw.gflops["bf16"] == 0.05 * hw.matmul_n["bf16"] and hw.matmul_n["bf16"] >= 2048  # grown until compute-bound
    assert hw.gemv_gflops("bf16") == gemv_flops


def test_measure_peak_flops_stops_growing_once_compute_bound(monkeypatch):
    seen = []

    def fake(n, dtype=None, repeat=5, device="cpu"):
        seen.append(n)
        return 1.0  # 1 GFLOP/s: a 512^3 product already takes 0.27 s
    monkeypatch.setattr(machine, "measure_matmul_flops", fake)
    assert machine.measure_peak_flops(torch.float32, max_n=8192) == (1.0, 256)
    assert seen == [256, 512]
    with pytest.raises(ValueError, match="max_n"):
        machine.measure_peak_flops(max_n=0)

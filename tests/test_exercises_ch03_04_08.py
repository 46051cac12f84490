"""Exercise checks of notebooks 03, 04 and 08: each passes the reference solution and names the mistake otherwise."""

from __future__ import annotations

import statistics
import time

from course_lib.exercises import ch03, ch04, ch08
from course_lib.kv_cache import repeat_kv
from course_lib.models import speed_lab_config


def test_ch03_kv_bytes():
    cfg = speed_lab_config("smollm2-135m")  # 30 layers, 3 KV heads of 64, 9 query heads
    right = 30 * 2 * 3 * 64 * 2
    assert ch03.check_kv_bytes_per_token(right, cfg)
    assert "query" in ch03.check_kv_bytes_per_token(right * 3, cfg).message
    assert "K *and* V" in ch03.check_kv_bytes_per_token(right / 2, cfg).message
    assert not ch03.check_kv_bytes_per_token(12345, cfg)


def test_ch03_repeat_kv():
    assert ch03.check_repeat_kv(repeat_kv)
    assert "0,0,0,1,1,1" in ch03.check_repeat_kv(lambda x, n: x.repeat(1, n, 1, 1)).message
    assert "raised" in ch03.check_repeat_kv(lambda x, n: 1 / 0).message
    assert "shape" in ch03.check_repeat_kv(lambda x, n: x).message


def test_ch03_speedup():
    assert ch03.check_cache_speedup(10.0, 80.0)
    assert not ch03.check_cache_speedup(10.0, 5.0)
    assert not ch03.check_cache_speedup(0.0, 5.0)


def _reference_timer(fn):
    fn()  # warm-up
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _single_shot(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_ch04_timer():
    assert ch04.check_timer(_reference_timer)
    assert "only 1 time" in ch04.check_timer(_single_shot).message

    def mean_no_warmup(fn):
        t = [_single_shot(fn) for _ in range(6)]
        return sum(t) / len(t)

    assert "median" in ch04.check_timer(mean_no_warmup).message


def test_ch04_bandwidth():
    assert ch04.check_bandwidth_estimate(2 * 1e9 / 0.1 / 1e9, 10**9, 0.1)
    assert "reads" in ch04.check_bandwidth_estimate(1e9 / 0.1 / 1e9, 10**9, 0.1).message
    assert not ch04.check_bandwidth_estimate(3.0, 10**9, 0.1)


def test_ch08_checks():
    assert ch08.check_decode_weight_bytes(135e6 * 2, 135e6, 16)
    assert "bits" in ch08.check_decode_weight_bytes(135e6 * 16, 135e6, 16).message
    assert ch08.check_bound("memory", 0.02, 0.001)
    assert not ch08.check_bound("compute", 0.02, 0.001)
    assert not ch08.check_bound("fast", 0.02, 0.001)
    assert ch08.check_article_ratio(1 / 16)
    assert "printed" in ch08.check_article_ratio(0.25).message
    assert "claim" in ch08.check_article_ratio(5).message

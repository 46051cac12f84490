"""Exercise checks pass on the reference and give specific hints on typical mistakes."""

from course_lib.anatomy import weight_bytes
from course_lib.exercises import ch01, ch02


def test_ch01_decode_speed():
    assert ch01.check_decode_tokens_per_second(ch01.decode_tokens_per_second)
    wrong = ch01.check_decode_tokens_per_second(lambda t: len(t) / t[-1])
    assert not wrong and "prefill" in wrong.message
    inverted = ch01.check_decode_tokens_per_second(lambda t: (t[-1] - t[0]) / (len(t) - 1))
    assert not inverted and "invert" in inverted.message
    assert not ch01.check_decode_tokens_per_second(lambda t: 1 / 0)


def test_ch01_prefill_prediction_follows_the_measurement():
    assert ch01.check_prefill_prediction("faster", prefill_s=0.05, decode_step_s=0.01, n_tokens=64)
    assert not ch01.check_prefill_prediction("slower", prefill_s=0.05, decode_step_s=0.01, n_tokens=64)
    assert ch01.check_prefill_prediction("slower", prefill_s=1.0, decode_step_s=0.01, n_tokens=64)
    assert not ch01.check_prefill_prediction("maybe", 1, 1, 1)


def test_ch02_weight_bytes():
    assert ch02.check_weight_bytes(weight_bytes)
    fb = ch02.check_weight_bytes(lambda n, f: n * {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 1}[f])
    assert not fb and "two weights" in fb.message
    assert "bits" in ch02.check_weight_bytes(lambda n, f: weight_bytes(n, f) * 8).message


def test_ch02_linear_flops():
    assert ch02.check_linear_flops(lambda i, o, t: 2 * i * o * t)
    assert "2 FLOPs" in ch02.check_linear_flops(lambda i, o, t: i * o * t).message
    assert "tokens" in ch02.check_linear_flops(lambda i, o, t: 2 * i * o).message


def test_attempt_turns_a_stub_into_not_done_and_a_crash_into_feedback():
    from course_lib.exercises import attempt, checked, ok, require

    @checked
    def check(fn):
        return ok(f"got {attempt(fn, 2)}")

    def stub(x):
        raise NotImplementedError

    fb = check(stub)
    assert not fb.passed and not fb.done and "Not done yet" in fb.message and "`stub`" in fb.message
    fb = check(lambda x: 1 / 0)
    assert not fb.passed and fb.done and "ZeroDivisionError" in fb.message
    assert check(lambda x: x * 2).passed and require(check(lambda x: x)).passed
    import pytest
    with pytest.raises(AssertionError, match="reference solution failed"):
        require(check(stub))

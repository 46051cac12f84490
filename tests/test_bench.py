"""``run_bench`` and every suite's ``run``: bad arguments are refused before any loading or timing."""

from __future__ import annotations

import importlib

import pytest

from course_lib import bench


@pytest.mark.parametrize("suite", bench.SUITES)
@pytest.mark.parametrize("quick", ["no", "False", None, 2, 0.5])
def test_every_suite_refuses_a_quick_that_is_not_a_bool(suite, quick):
    # quick="no" is truthy: it ran the quick suite without a word
    with pytest.raises(ValueError, match="quick must be True or False"):
        importlib.import_module(bench.suite_module(suite)).run(quick=quick)


def test_run_bench_checks_quick_and_takes_one_suite_name(monkeypatch):
    class Started(Exception):
        pass

    def started():
        raise Started

    monkeypatch.setattr(bench, "machine_info", started)  # the suites would start right after it
    with pytest.raises(ValueError, match="quick"):
        bench.run_bench(suites=["decode"], quick="yes")
    with pytest.raises(Started):  # "decode" is the decode suite, not the unknown suites d, e, c, o, ...
        bench.run_bench(suites="decode")
    with pytest.raises(ValueError, match="unknown suite"):
        bench.run_bench(suites="decod")

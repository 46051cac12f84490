"""The package's top-level API: every name in __all__ resolves, the one-call APIs are the modules' own."""

from __future__ import annotations

import subprocess
import sys

import pytest

import course_lib
from course_lib import distillation, pruning, quantization, speculative


def test_all_names_resolve():
    for name in course_lib.__all__:
        assert getattr(course_lib, name) is not None, name


def test_one_call_apis_are_the_modules_own():
    assert course_lib.quantize_ is quantization.quantize_ and course_lib.QuantConfig is quantization.QuantConfig
    assert course_lib.prune_ is pruning.prune_ and course_lib.PruneConfig is pruning.PruneConfig
    assert course_lib.distill is distillation.distill
    assert course_lib.speculative_generate is speculative.speculative_generate


def test_dir_lists_lazy_names():
    assert {"quantize_", "PruneConfig", "distill", "speculative_generate"} <= set(dir(course_lib))


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'quantise_'"):
        course_lib.quantise_  # noqa: B018


def test_import_does_not_pull_in_torch_pruning():
    code = "import sys, course_lib; print('torch_pruning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

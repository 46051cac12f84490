"""The package metadata: what ``pip install -e .`` reads from pyproject.toml."""

from __future__ import annotations

import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_installs_without_setuptools_warnings():
    """No deprecation wall at install: setuptools >= 77 wants ``license`` as an SPDX string, not a table.

    The table form printed ~50 lines of ``SetuptoolsDeprecationWarning`` three times per ``make install``.
    """
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    noisy = [f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught
             if "setuptools" in w.category.__module__.lower() or "Setuptools" in w.category.__name__]
    assert not noisy, f"pyproject.toml makes setuptools warn at every install: {noisy}"
    assert dist.metadata.license_expression == "MIT"


def test_the_native_kernels_sources_and_headers_ship_in_the_package():
    """A wheel without a header of ``csrc/`` builds nothing: every file there must match a package-data pattern."""
    from fnmatch import fnmatch

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    patterns = apply_configuration(Distribution(), ROOT / "pyproject.toml").package_data["course_lib"]
    csrc = ROOT / "course_lib" / "quantization" / "csrc"
    files = [p.relative_to(ROOT / "course_lib").as_posix() for p in csrc.iterdir() if p.is_file()]
    assert {"quantization/csrc/gemv.cpp", "quantization/csrc/load16.h"} <= set(files)
    assert all(any(fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)

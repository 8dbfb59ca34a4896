"""Shared test setup: Hypothesis profiles and the ``gpu`` marker.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default; derandomized, a few dozen examples per property),
``dev`` (random, more examples) and ``nightly`` (2000+ examples).  Tests marked ``@pytest.mark.gpu``
are skipped where CuPy cannot be imported or no CUDA device exists.
"""

from __future__ import annotations

import functools
import os

import pytest
from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", derandomize=True, max_examples=60, print_blob=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.register_profile("nightly", max_examples=2500, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@functools.lru_cache(maxsize=1)
def gpu_unavailable() -> str | None:
    """Why GPU tests cannot run here, or None when they can."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CUDA library that fails to load
        return f"cupy not importable ({type(e).__name__})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as e:
        return f"no CUDA device ({type(e).__name__})"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = gpu_unavailable()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in gpu_items:
        item.add_marker(skip)

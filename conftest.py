"""Test configuration (tests and doctests): 8 virtual CPU devices, float64 on request.

The CPU device count must be fixed before the first JAX operation, so this runs at import
time of the test session (before any test module imports jax.numpy work).
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Experiments run in-process or in subprocesses cache their compiles here, not in ~/.cache.
os.environ.setdefault("OPTLAB_CACHE_DIR", tempfile.mkdtemp(prefix="optlab-test-jax-cache-"))
# The suite compiles well over a thousand tiny programs, where LLVM's optimisations cost more
# than they save: at backend optimisation level 0 the suite takes about a third less CPU.
# Tests check results, never speed (benchmarks run with the default flags, outside pytest).
# Appended, not setdefault: an XLA_FLAGS already set must keep its own flags.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, explicitly seeded NumPy generator (never the global state)."""
    return np.random.default_rng(0)


@pytest.fixture
def x64():
    """Enable float64 for one test and restore the previous setting after it."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Groups for ``--dist loadgroup`` (pytest-xdist): a test file's tests run together in one
    worker (its module fixtures and compiled functions are shared), except the ``slow`` ones
    (a whole smoke experiment, a notebook, a subprocess run), which are scheduled one by one
    so that the two workers stay balanced."""
    del config
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            slow = item.get_closest_marker("slow") is not None
            group = item.nodeid if slow else item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(group))

"""Test configuration: 8 virtual CPU devices, float64 available on request.

The CPU device count must be fixed before the first JAX operation, so this runs at import
time of the test session (before any test module imports jax.numpy work).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax

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

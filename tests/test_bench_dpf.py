"""The DPF bench entries: the byte models match the arrays an update reads and writes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import entries_dpf
from experiments.bench.trees import model_like_tree
from experiments.models import param_count


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree) if x.shape)


def test_byte_models_count_grads_updates_and_the_refreshed_mask():
    """Ordinary: grads in, updates out. Refresh: also params in and the new mask out (one
    bool per prunable parameter). Shapes only (no compile)."""
    params = model_like_tree(2000, np.random.default_rng(0))
    n = param_count(params)
    for entry, refresh in ((entries_dpf.DPF_ORDINARY, False), (entries_dpf.DPF_REFRESH, True)):
        tx = entry.make()
        state = jax.eval_shape(tx.init, params)
        updates, new_state = jax.eval_shape(tx.update, params, state, params)
        total = _nbytes(params) + _nbytes(updates)  # grads in, updates out
        if refresh:
            total += _nbytes(params) + _nbytes(new_state.mask)
        prunable = sum(math.prod(p.shape) for p in jax.tree.leaves(params) if p.ndim >= 2)
        assert prunable / n > 0.95  # the models count the mask for every parameter
        assert new_state.mask == jax.tree.map(
            lambda p: jax.ShapeDtypeStruct(p.shape if p.ndim >= 2 else (), jnp.bool_), params
        )
        assert abs(total / n - entry.bytes_per_param) < 0.1, (entry.name, total / n)

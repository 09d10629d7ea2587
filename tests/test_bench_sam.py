"""The SAM-family bench entries: same method as their counterpart, byte models match arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.bench import entries_sam, get_entry
from experiments.bench.trees import model_like_tree, tree_nbytes
from experiments.bench.updates import quadratic_grad_fn
from experiments.models import param_count


def test_optlab_sam_follows_the_same_trajectory_as_optax_contrib_sam():
    params = model_like_tree(3000, np.random.default_rng(0), scale=0.05)
    grad_fn = quadratic_grad_fn(model_like_tree(3000, np.random.default_rng(1), scale=0.05))
    trajectories = []
    for name in (entries_sam.OPTAX_SAM.name, entries_sam.SAM.name):
        tx = get_entry(name).make()
        p, state = params, tx.init(params)
        update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, grad_fn=grad_fn))
        for _ in range(5):
            updates, state = update(grad_fn(p), state, p)
            p = optax.apply_updates(p, updates)
        trajectories.append(p)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), trajectories[1], params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the comparison is not vacuous
    for a, b in zip(*map(jax.tree.leaves, trajectories), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_contrib_sam_adapter_requires_grad_fn():
    tx = entries_sam.optax_contrib_sam()
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="needs grad_fn"):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize(
    "entry",
    [
        entries_sam.OPTAX_SAM,
        entries_sam.SAM,
        entries_sam.ASAM,
        entries_sam.EXTRAP_SGD,
        entries_sam.EXTRAP_PAST,
        entries_sam.SA_SAM,
    ],
    ids=lambda e: e.name,
)
def test_byte_model_counts_each_array_once(entry):
    """grads in, updates out, the per-parameter state in and out, params when the update
    reads them (all but the past variant under SGD), and grad_fn's target."""
    params = model_like_tree(2000, np.random.default_rng(0))
    tx = entry.make()
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    state = jax.jit(tx.init)(params)
    extra = {"grad_fn": quadratic_grad_fn(params)} if entry.needs_grad_fn else {}
    updates, new_state = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))(grads, state, params)

    def arrays(tree):
        return [leaf for leaf in jax.tree.leaves(tree) if np.ndim(leaf) > 0]

    total = tree_nbytes(arrays(grads) + arrays(updates) + arrays(state) + arrays(new_state))
    reads_params = entry is not entries_sam.EXTRAP_PAST
    total += tree_nbytes(params) * (int(reads_params) + int(entry.needs_grad_fn))
    assert total == entry.bytes_per_param * param_count(params)

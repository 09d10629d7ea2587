"""Composition checks shared by the gradient-adding regularizers (spectral, Wasserstein,
L2 Init): a ``flax.nnx`` MLP and ONE jitted functional step per transform, reused for the
reference trajectory, the Orbax resume and the ``nnx.Optimizer`` comparison (the SAM-family
checks compile a step per check; these transforms need no ``grad_fn``, so one suffices).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests.sam_family_checks import (
    assert_trees_close,
    assert_trees_equal,
    mlp_data,
    orbax_round_trip,
)

PyTree = Any


def check_composition(tx: optax.GradientTransformation, directory, *, steps: int = 4) -> PyTree:
    """``tx`` on a 3-4-2 ``nnx`` MLP (kernels and biases), ``steps`` steps:

    * an Orbax save after ``steps // 2`` steps, restored against an abstract target, resumes
      bitwise to the uninterrupted run (the state comes back as its own NamedTuples);
    * a jitted step donating params and state (from ``tx.init`` on the very params it
      donates: no state leaf may alias a params buffer) follows the same run;
    * ``flax.nnx.Optimizer`` follows the same run.

    Returns the final state of the functional run.
    """
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 4, rngs=rngs)
            self.out = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    xs, ys = mlp_data(steps)
    model = Model(nnx.Rngs(0))
    graphdef = nnx.graphdef(model)

    def fresh_params() -> PyTree:
        return jax.tree.map(jnp.copy, nnx.as_pure(nnx.state(model, nnx.Param)))

    def loss(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    def step(params, state, x, y):
        grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p), x, y))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    plain = jax.jit(step)
    params = fresh_params()
    state = tx.init(params)
    path = []
    for t in range(steps):
        params, state = plain(params, state, xs[t], ys[t])
        path.append((params, state))

    split = steps // 2
    restored = orbax_round_trip(directory, *path[split - 1], tx)
    assert type(restored[1]) is type(state)
    assert_trees_equal(restored, path[split - 1])
    for t in range(split, steps):
        restored = plain(*restored, xs[t], ys[t])
    assert_trees_equal(restored, path[-1])

    donating = jax.jit(step, donate_argnums=(0, 1))
    p = fresh_params()
    s = tx.init(p)
    buffers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves((p, s))]
    assert len(set(buffers)) == len(buffers), "a state leaf aliases params or another leaf"
    for t in range(steps):
        p, s = donating(p, s, xs[t], ys[t])
    assert_trees_close((p, s), path[-1], rtol=1e-6, atol=1e-7)

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        optimizer.update(model, nnx.grad(loss)(model, x, y))

    for t in range(steps):
        nnx_step(model, optimizer, xs[t], ys[t])
    assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)), params, rtol=1e-5, atol=1e-7)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    return state

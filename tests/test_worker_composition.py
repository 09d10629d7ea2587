"""The worker-axis optimizers composed the way users compose them: ``optax.MultiSteps`` and
``flax.nnx.Optimizer`` under ``nnx.vmap(axis_name=...)``.

Each transform's own equations are checked against float64 loops in its own test file; here
the reference is the same transform used plainly (fed the mean of each pair of micro-batch
gradients, or driven functionally on a params pytree), so a composition that drops, doubles
or reorders a communication or a state update shows up as a difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from worker_axis_checks import AXIS, init_workers, worker_problem

import optlab

WORKERS = 4

FACTORIES = {
    "local_sgd": lambda: optlab.local_sgd(optax.sgd(0.1, momentum=0.5), 2, AXIS),
    "diloco": lambda: optlab.diloco(
        optax.adam(0.05), optax.sgd(0.7, momentum=0.9, nesterov=True), 2, AXIS
    ),
    "palsgd": lambda: optlab.palsgd(
        optax.sgd(0.1), None, 4, AXIS, learning_rate=0.1, prob=0.5, seed=3
    ),
    "dsgd": lambda: optlab.dsgd(optax.sgd(0.1), "ring", AXIS),
    "mean_gradients": lambda: optax.chain(optlab.mean_gradients(AXIS), optax.sgd(0.1)),
    "fedavg": lambda: optlab.fedavg(optax.sgd(0.1), optax.sgd(1.0, momentum=0.5), 3, AXIS),
    "fedaware": lambda: optlab.fedaware(optax.sgd(0.1), optax.sgd(1.0), 2, AXIS),
}


def _jitted_step(tx):
    """``(params, state, grads [W, DIM]) -> (params, state)``: vmap over workers, jitted."""

    def step(params, state, g):
        updates, state = tx.update({"w": g}, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(jax.vmap(step, axis_name=AXIS))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_multisteps_equals_the_transform_fed_the_mean_of_each_pair(name):
    a, data, x0 = worker_problem(np.random.default_rng(1), WORKERS, 14)
    a = jnp.asarray(a, jnp.float32)
    data = jnp.asarray(data, jnp.float32)

    def grads(params, d):
        return jax.vmap(lambda w, di: a @ w - di)(params["w"], d)

    tx = FACTORIES[name]()
    multi = optax.MultiSteps(FACTORIES[name](), every_k_schedule=2)
    step, multi_step = _jitted_step(tx), _jitted_step(multi)

    params, state = init_workers(tx, x0, WORKERS, jnp.float32)
    m_params, m_state = init_workers(multi, x0, WORKERS, jnp.float32)
    for t in range(0, len(data), 2):
        # The reference: one update with the mean of the two micro-batches' gradients (both
        # taken at the same params, as MultiSteps leaves the params alone in between).
        mean = (grads(params, data[t]) + grads(params, data[t + 1])) / 2
        params, state = step(params, state, mean)
        for u in (t, t + 1):
            before = m_params
            m_params, m_state = multi_step(m_params, m_state, grads(m_params, data[u]))
            if u == t:
                jax.tree.map(np.testing.assert_array_equal, m_params, before)
        np.testing.assert_allclose(m_params["w"], params["w"], rtol=2e-5, atol=2e-6)
    if name != "mean_gradients":
        assert np.ptp(np.asarray(params["w"]), axis=0).max() > 0  # the workers did drift


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_nnx_optimizer_under_nnx_vmap_equals_the_functional_run(name):
    xs = np.random.default_rng(2).normal(size=(5, WORKERS, 2, 3)).astype(np.float32)

    @nnx.vmap(in_axes=0, out_axes=0)
    def create(seed):
        del seed
        return nnx.Linear(3, 2, rngs=nnx.Rngs(0))  # the same init on every worker

    model = create(jnp.arange(WORKERS))
    optimizer = nnx.vmap(lambda m: nnx.Optimizer(m, FACTORIES[name](), wrt=nnx.Param))(model)
    params0 = {"kernel": model.kernel[...], "bias": model.bias[...]}

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["kernel"] + p["bias"]) ** 2)

    @nnx.jit
    @nnx.vmap(in_axes=(0, 0, 0), axis_name=AXIS)
    def nnx_step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.sum(jnp.tanh(m(x)) ** 2))(model)
        optimizer.update(model, grads)

    tx = FACTORIES[name]()

    def step(params, state, x):
        updates, state = tx.update(jax.grad(loss)(params, x), state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(jax.vmap(step, axis_name=AXIS), donate_argnums=(0, 1))
    params, state = params0, jax.vmap(tx.init)(params0)
    for x in xs:
        nnx_step(model, optimizer, jnp.asarray(x))
        params, state = step(params, state, jnp.asarray(x))
    np.testing.assert_allclose(model.kernel[...], params["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bias[...], params["bias"], rtol=1e-5, atol=1e-6)

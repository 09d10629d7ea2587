"""optlab.mean_gradients: synchronous data parallelism as a transform over a worker axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optlab

W = 4


def _worker_grads(rng):
    return {"w": jnp.asarray(rng.normal(size=(W, 3, 2))), "b": jnp.asarray(rng.normal(size=(W, 2)))}


def _run(tx, grads, params=None, steps=1):
    """``steps`` updates per worker under vmap; returns the stacked updates of the last."""

    def worker(g, p):
        state = tx.init(p)
        for _ in range(steps):
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return updates

    params = params if params is not None else jax.tree.map(jnp.zeros_like, grads)
    return jax.vmap(worker, axis_name="workers")(grads, params)


@pytest.mark.usefixtures("x64")
def test_equals_the_mean_over_workers_then_sgd(rng):
    grads = _worker_grads(rng)
    got = _run(optax.chain(optlab.mean_gradients("workers"), optax.sgd(0.1)), grads)
    for key in grads:
        mean = np.asarray(grads[key]).mean(0)
        for w in range(W):
            np.testing.assert_allclose(np.asarray(got[key][w]), -0.1 * mean, rtol=1e-12)


def test_none_is_the_identity(rng):
    grads = jax.tree.map(lambda a: a[0], _worker_grads(rng))
    tx = optlab.mean_gradients(None)
    updates, _ = tx.update(grads, tx.init(grads))
    jax.tree.map(np.testing.assert_array_equal, updates, grads)


def test_shard_map_equals_vmap(rng):
    grads = _worker_grads(rng)
    tx = optax.chain(optlab.mean_gradients("workers"), optax.sgd(0.1, momentum=0.9))
    simulated = _run(tx, grads, steps=3)
    mesh = jax.make_mesh((W,), ("workers",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:W])  # fmt: skip

    def body(g):
        g = jax.tree.map(lambda a: a[0], g)
        p = jax.tree.map(jnp.zeros_like, g)
        state = tx.init(p)
        for _ in range(3):
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return jax.tree.map(lambda a: a[None], updates)

    sharded = jax.shard_map(body, mesh=mesh, in_specs=P("workers"), out_specs=P("workers"))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
        simulated,
        sharded(grads),
    )


def test_composes_with_multi_steps_inject_and_a_donating_jit(rng):
    grads = _worker_grads(rng)
    mean = jax.tree.map(lambda a: np.asarray(a).mean(0), grads)
    # MultiSteps over 2 micro-steps of the same gradient: the mean, applied every 2nd call.
    multi = optax.MultiSteps(
        optax.chain(optlab.mean_gradients("workers"), optax.sgd(0.1)), every_k_schedule=2
    )
    got = _run(multi, grads, steps=2)
    np.testing.assert_allclose(np.asarray(got["w"][1]), -0.1 * mean["w"], rtol=1e-5)
    # inject_hyperparams with a traced learning rate next to it.
    injected = optax.chain(
        optlab.mean_gradients("workers"), optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    )
    got = _run(injected, grads)
    np.testing.assert_allclose(np.asarray(got["b"][2]), -0.1 * mean["b"], rtol=1e-5)
    # A jitted step that donates params and state.
    tx = optax.chain(optlab.mean_gradients("workers"), optax.sgd(0.1, momentum=0.9))

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    jitted = jax.jit(jax.vmap(step, axis_name="workers"), donate_argnums=(0, 1))
    params = jax.tree.map(jnp.zeros_like, grads)
    state = jax.vmap(tx.init)(params)
    params, state = jitted(params, state, grads)
    np.testing.assert_allclose(np.asarray(params["w"][3]), -0.1 * mean["w"], rtol=1e-5)


def test_behind_nnx_optimizer_without_workers():
    from flax import nnx

    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, optax.chain(optlab.mean_gradients(None), optax.sgd(0.1)), wrt=nnx.Param
    )
    before = np.asarray(model.kernel[...]).copy()
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
    optimizer.update(model, grads)
    np.testing.assert_allclose(np.asarray(model.kernel[...]), before - 0.1, rtol=1e-6)


@pytest.mark.parametrize("bad", [3, ["workers"], ("workers", 1)])
def test_bad_axis_name_raises_at_construction(bad):
    with pytest.raises(ValueError, match="axis_name must be a string"):
        optlab.mean_gradients(bad)

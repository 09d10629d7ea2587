"""optlab.wasserstein_regularization and optlab.l2_init_regularization: gradients against
jax.grad of the written-out penalties (float64) and a NumPy rank loop, invariance to
permutations, composition (chain, MultiSteps, inject_hyperparams, nnx.Optimizer, a donating
jit, Orbax) and argument checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optlab
from tests.regularizer_checks import check_composition
from tests.sam_family_checks import (
    assert_trees_close,
    assert_trees_equal,
    mlp_data,
    mlp_grad,
    mlp_params,
)


def test_gradients_match_the_written_out_penalties_and_a_rank_loop(x64):
    lam = 0.3
    rng = np.random.default_rng(0)
    init = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.asarray(rng.normal(size=3))}
    params = {k: v + 0.5 * jnp.asarray(rng.normal(size=v.shape)) for k, v in init.items()}
    grads = {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in init.items()}
    wass = optlab.wasserstein_regularization(lam)
    l2 = optlab.l2_init_regularization(lam, mask={"w": True, "b": False})

    @jax.jit
    def run(params):
        def w2(p):  # sum_j (theta_(j) - theta0_(j))^2 per tensor: sorted matching
            return lam * sum(
                jnp.sum((jnp.sort(p[k].ravel()) - jnp.sort(init[k].ravel())) ** 2) for k in p
            )

        def l2_init(p):
            return lam * jnp.sum((p["w"] - init["w"]) ** 2)

        return (
            wass.update(grads, wass.init(init), params)[0],
            jax.tree.map(jnp.add, grads, jax.grad(w2)(params)),
            l2.update(grads, l2.init(init), params)[0],
            {"w": grads["w"] + jax.grad(l2_init)(params)["w"], "b": grads["b"]},
        )

    got_w2, want_w2, got_l2, want_l2 = run(params)
    assert_trees_close(got_w2, want_w2, rtol=1e-12, atol=1e-12)
    assert_trees_close(got_l2, want_l2, rtol=1e-12, atol=1e-12)
    for k in params:  # the rank rule, element by element
        theta, theta0 = np.asarray(params[k]).ravel(), np.sort(np.asarray(init[k]).ravel())
        ranks = np.argsort(np.argsort(theta, kind="stable"), kind="stable")
        expected = np.asarray(grads[k]).ravel() + 2 * lam * (theta - theta0[ranks])
        np.testing.assert_allclose(np.asarray(got_w2[k]).ravel(), expected, rtol=1e-12)


def test_permuted_initial_weights_cost_nothing_and_the_state_is_a_snapshot():
    init = {"w": jnp.arange(6.0).reshape(2, 3)}
    tx = optlab.wasserstein_regularization(1.0)
    state = tx.init(init)
    np.testing.assert_array_equal(state.sorted_init["w"], np.arange(6.0))
    shuffled = {"w": jnp.array([[5.0, 0.0, 3.0], [1.0, 4.0, 2.0]])}
    out, state_after = jax.jit(tx.update)({"w": jnp.zeros((2, 3))}, state, shuffled)
    np.testing.assert_array_equal(out["w"], 0.0)
    assert_trees_equal(state_after, state)  # the snapshot never changes


@pytest.mark.parametrize(
    "factory", [optlab.wasserstein_regularization, optlab.l2_init_regularization]
)
def test_composition(factory):
    """chain before sgd with inject_hyperparams (strength traced, changed without a
    retrace), MultiSteps(2) = one update on the mean gradient, the snapshot taken at init."""
    injected = optax.chain(optax.inject_hyperparams(factory)(0.2), optax.sgd(0.1))
    plain = optax.chain(factory(0.5), optax.sgd(0.1))
    multi = optax.MultiSteps(plain, every_k_schedule=2)
    xs, ys = mlp_data(2)

    @jax.jit
    def run(params, strength):
        state = injected.init(params)
        state[0].hyperparams["strength"] = strength
        u, _ = injected.update(mlp_grad(params, xs[0], ys[0]), state, params)
        v, _ = plain.update(mlp_grad(params, xs[0], ys[0]), plain.init(params), params)
        m_state = multi.init(params)
        for t in range(2):
            m, m_state = multi.update(mlp_grad(params, xs[t], ys[t]), m_state, params)
        mean = jax.tree.map(
            lambda a, b: (a + b) / 2, mlp_grad(params, xs[0], ys[0]), mlp_grad(params, xs[1], ys[1])
        )
        w, _ = plain.update(mean, plain.init(params), params)
        return (u, v), (m, w)

    # A start away from the snapshot: the snapshot is taken at init, then the params move.
    params = mlp_params()
    moved = jax.tree.map(lambda p: p + 0.1, params)

    @jax.jit
    def from_init(params, moved, strength):
        state = injected.init(params)
        state[0].hyperparams["strength"] = strength
        u, _ = injected.update(jax.tree.map(jnp.zeros_like, params), state, moved)
        return u

    (u, v), (m, w) = run(params, jnp.asarray(0.5))
    assert_trees_close(u, v, rtol=1e-6)
    assert_trees_close(m, w, rtol=1e-6, atol=1e-8)
    pulled = from_init(params, moved, jnp.asarray(0.5))
    # Every weight 0.1 above its initial value (a shift keeps the ranks, so the Wasserstein
    # target is the weight's own initial value too): -lr * 2 * lam * 0.1 = -0.01 everywhere.
    assert_trees_close(pulled, jax.tree.map(lambda p: jnp.full_like(p, -0.01), params))


def test_nnx_optimizer_donation_and_orbax_resume_of_both_in_one_chain(tmp_path):
    """One chain holds both transforms (one compile set for the two): nnx.Optimizer, a
    donating jit (the snapshots must not alias the donated params) and an Orbax resume."""
    tx = optax.chain(
        optlab.wasserstein_regularization(0.2),
        optlab.l2_init_regularization(0.3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
        optax.sgd(0.1, momentum=0.9),
    )
    state = check_composition(tx, tmp_path / "ckpt")
    assert isinstance(state[0], optlab.WassersteinRegularizationState)
    assert isinstance(state[1], optlab.L2InitRegularizationState)
    assert state[0].sorted_init["hidden"]["kernel"].shape == (12,)
    assert state[1].init_params["hidden"]["bias"] is None


@pytest.mark.parametrize(
    "factory", [optlab.wasserstein_regularization, optlab.l2_init_regularization]
)
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"strength": -0.1}, "strength"),
        ({"strength": float("inf")}, "strength"),
        ({"strength": "0.1"}, "strength"),
        ({"strength": lambda count: 0.1}, "strength"),
        ({"strength": 0.1, "mask": False}, "mask"),
    ],
)
def test_bad_arguments_raise_at_construction(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_needs_params():
    for factory in (optlab.wasserstein_regularization, optlab.l2_init_regularization):
        tx = factory(0.1)
        params = {"w": jnp.ones(2)}
        with pytest.raises(ValueError, match="needs params"):
            tx.update(params, tx.init(params))

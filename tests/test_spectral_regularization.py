"""optlab.spectral_regularization: power iteration vs SVD, the closed-form gradient vs
jax.grad of the written-out penalty (float64), a float64 NumPy loop of the whole chain,
zero matrices, composition (MultiSteps, inject_hyperparams, nnx.Optimizer, a donating jit,
Orbax) and argument checks."""

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
    mlp_data,
    mlp_grad,
    mlp_params,
    trace_counter,
)

LR = 0.05


def _matrices(dtype) -> dict[str, jax.Array]:
    """A dense kernel, a conv kernel (2, 2, 3, 4) and a bias, with spread singular values."""
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(5, 4)) * np.array([2.0, 1.0, 0.5, 0.3])
    conv = rng.normal(size=(2, 2, 3, 4)) * np.array([0.4, 1.5, 0.6, 0.2])
    return {
        "dense": jnp.asarray(dense, dtype),
        "conv": jnp.asarray(conv, dtype),
        "bias": jnp.asarray(rng.normal(size=4), dtype),
    }


def test_sigma_and_gradient_match_svd_and_the_written_out_penalty(x64):
    """After warm-up on fixed params: sigma = svd's top singular value (within 1e-3), and the
    added gradient = jax.grad of the penalty written with the exact top singular vectors."""
    lam, lam_b, k = 0.1, 0.05, 3.0
    params = _matrices(jnp.float64)
    tx = optlab.spectral_regularization(lam, power=k, bias_strength=lam_b)
    zeros = optax.tree.zeros_like(params)

    @jax.jit
    def warm_up(state):  # 60 power iterations on the fixed params
        def body(_, carry):
            return tx.update(zeros, carry[1], params)

        return jax.lax.fori_loop(0, 60, body, tx.update(zeros, state, params))

    out, state = warm_up(tx.init(params))
    exact = {}
    for name in ("dense", "conv"):
        w = np.asarray(params[name]).reshape(-1, params[name].shape[-1])
        u, s, vt = np.linalg.svd(w)
        exact[name] = (u[:, 0], vt[0])
        np.testing.assert_allclose(state.sigma[name], s[0], rtol=1e-3)
    assert state.sigma["bias"] is None
    assert state.u["bias"] is None

    @jax.jit
    def references(p):
        def penalty(p, exact_vectors: bool):
            total = lam_b * jnp.sum(p["bias"] ** 2) ** k
            for name, (u1, v1) in exact.items():
                w = p[name].reshape(-1, p[name].shape[-1])
                # sigma = u1^T W v1 with the exact (constant) vectors, or the
                # differentiable top singular value of jnp.linalg.svd
                svd = jnp.linalg.svd(w, compute_uv=False)[0]
                sigma = u1 @ w @ v1 if exact_vectors else svd
                total += lam * (sigma**k - 1.0) ** 2
            return total

        return (
            jax.grad(penalty)(p, True),
            jax.grad(penalty)(p, False),
            optlab.spectral_norms(p),
        )

    with_vectors, with_svd, norms = references(params)
    assert_trees_close(out, with_vectors, rtol=1e-7, atol=1e-12)
    assert_trees_close(out, with_svd, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(norms["dense"], np.linalg.svd(params["dense"])[1][0])
    assert norms["bias"] is None


def _numpy_chain(params, u0, xs, ys, lams, k):
    """chain(spectral_regularization(lams[t], power=k), sgd(LR)) as a float64 NumPy loop:
    one power iteration per step from the state's initial u, written from the equations."""
    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    u = {n: np.asarray(u0[n], np.float64) for n in ("w1", "w2")}
    sigmas = []
    for t in range(len(xs)):
        lam = lams[t]
        g = {n: np.asarray(v, np.float64) for n, v in _grad64(p, xs[t], ys[t]).items()}
        step_sigma = {}
        for n in ("w1", "w2"):
            w = p[n]
            v = w.T @ u[n]
            v = v / np.linalg.norm(v)
            wv = w @ v
            sigma = np.linalg.norm(wv)
            u[n] = wv / sigma
            g[n] = g[n] + 2 * lam * k * (sigma**k - 1) * sigma ** (k - 1) * np.outer(u[n], v)
            step_sigma[n] = sigma
        p = {n: p[n] - LR * g[n] for n in p}
        sigmas.append(step_sigma)
    return p, sigmas


_grad64 = jax.jit(mlp_grad)


def test_chain_with_sgd_matches_a_numpy_loop_under_one_jit(x64):
    """inject_hyperparams(spectral_regularization) then sgd, strength changed mid-run
    through the traced hyperparameter: a float64 NumPy loop, one trace."""
    k, steps = 2.0, 6
    lams = [0.2] * 3 + [0.5] * 3
    params = mlp_params(jnp.float64)
    xs, ys = mlp_data(steps, dtype=jnp.float64)
    reg = optax.inject_hyperparams(optlab.spectral_regularization)(lams[0], power=k)
    tx = optax.chain(reg, optax.sgd(LR))
    state = tx.init(params)
    assert {"strength", "power", "bias_strength"} <= set(state[0].hyperparams)
    ref, ref_sigmas = _numpy_chain(params, state[0].inner_state.u, xs, ys, lams, k)

    def step(params, state, x, y):
        updates, state = tx.update(_grad64(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    step, traces = trace_counter(step)
    for t in range(steps):
        state[0].hyperparams["strength"] = jnp.asarray(lams[t], jnp.float64)
        params, state = step(params, state, xs[t], ys[t])
        for n in ("w1", "w2"):
            np.testing.assert_allclose(state[0].inner_state.sigma[n], ref_sigmas[t][n], rtol=1e-10)
    assert len(traces) == 1  # no recompilation after the first step
    assert_trees_close(params, ref, rtol=1e-10, atol=1e-12)
    assert state[0].inner_state.sigma["b1"] is None


@pytest.mark.parametrize(("power", "dtype"), [(1.0, jnp.float32), (2.0, jnp.bfloat16)])
def test_zero_matrix_stays_finite_and_recovers(power, dtype):
    """Zero kernel and bias: finite updates, unit vectors kept; bf16 params keep their dtype
    (the power iteration runs in float32 in the state)."""
    tx = optlab.spectral_regularization(1.0, power=power, bias_strength=1.0)
    params = {"w": jnp.zeros((3, 2), dtype), "b": jnp.zeros(2, dtype)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    out, state = update(optax.tree.zeros_like(params), state, params)
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves((out, state)))
    assert out["w"].dtype == dtype
    assert state.u["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(state.u["w"]), 1.0, rtol=1e-6)
    assert float(state.sigma["w"]) == 0.0
    np.testing.assert_array_equal(np.asarray(out["b"], np.float32), 0.0)
    # sigma = 0: the k = 1 penalty (sigma - 1)^2 pulls W along u v^T; for k = 2 the slope is 0
    norm = np.linalg.norm(np.asarray(out["w"], np.float32))
    np.testing.assert_allclose(norm, 0.0 if power == 2.0 else 2.0, atol=1e-5)
    params = {"w": jnp.array([[0.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype), "b": jnp.zeros(2, dtype)}
    for _ in range(3):
        out, state = update(optax.tree.zeros_like(params), state, params)
    np.testing.assert_allclose(state.sigma["w"], 2.0, rtol=1e-6)


def test_inside_multi_steps_equals_one_update_on_the_mean_gradient():
    """Params do not move within an accumulation, so MultiSteps(2) = the transform applied
    once to the mean of the 2 gradients (an independent accumulation)."""
    inner = optax.chain(optlab.spectral_regularization(0.3), optax.sgd(LR))
    tx = optax.MultiSteps(inner, every_k_schedule=2)
    xs, ys = mlp_data(2)

    @jax.jit
    def both(params):
        state, moved = tx.init(params), []
        for t in range(2):
            u, state = tx.update(mlp_grad(params, xs[t], ys[t]), state, params)
            moved.append(optax.apply_updates(params, u))
        mean = jax.tree.map(
            lambda a, b: (a + b) / 2, *(mlp_grad(params, xs[t], ys[t]) for t in range(2))
        )
        u, _ = inner.update(mean, inner.init(params), params)
        return moved, optax.apply_updates(params, u)

    params = mlp_params()
    (first, second), expected = both(params)
    assert_trees_close(first, params)  # mid-accumulation: no move
    assert_trees_close(second, expected, rtol=1e-6, atol=1e-7)


def test_nnx_optimizer_donation_and_orbax_resume(tmp_path):
    tx = optax.chain(optlab.spectral_regularization(0.3), optax.sgd(LR, momentum=0.9))
    state = check_composition(tx, tmp_path / "ckpt")
    assert isinstance(state[0], optlab.SpectralRegularizationState)
    assert state[0].u["hidden"]["kernel"].shape == (3,)
    assert state[0].u["hidden"]["bias"] is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"strength": -0.1}, "strength"),
        ({"strength": float("nan")}, "strength"),
        ({"strength": lambda count: 0.1}, "strength"),
        ({"strength": 0.1, "power": 0.5}, "power"),
        ({"strength": 0.1, "bias_strength": -1.0}, "bias_strength"),
        ({"strength": 0.1, "seed": 1.5}, "seed"),
        ({"strength": 0.1, "seed": -1}, "seed"),
        ({"strength": 0.1, "mask": True}, "mask"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        optlab.spectral_regularization(**kwargs)


def test_needs_params_and_a_matrix_mask():
    tx = optlab.spectral_regularization(0.1)
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
    bad = optlab.spectral_regularization(0.1, mask={"w": True, "b": True})
    with pytest.raises(ValueError, match="ndim >= 2"):
        bad.init({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})

"""optlab.fedaware and optlab.min_norm_weights: Frank-Wolfe against closed forms, scipy and
the official solver restated in NumPy; the transform against a float64 loop over clients
(warm-up, stale momenta, projection), vmap vs shard_map, the compiled off-round step,
inject_hyperparams, Orbax mid-round and validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from federated_checks import (
    federated_state,
    np_min_norm_fw,
    random_masks,
    reference_rounds,
    shard_map_run_and_check,
    with_extras,
)
from worker_axis_checks import (
    AXIS,
    NumpySGD,
    assert_orbax_resume_is_bitwise,
    run_vmap,
    worker_problem,
)

import optlab

WORKERS = 4
H = 2


def test_min_norm_weights(rng, x64):
    # One compile per shape: the iteration cap is traced.
    jitted = jax.jit(lambda gram, cap: optlab.min_norm_weights(gram, max_iters=cap))
    solve = lambda gram, cap=1000: jitted(gram, cap)
    # Two vectors (no iterations, eager): the closed form c = <v2, v2 - v1> / |v1 - v2|^2.
    v = rng.normal(size=(2, 6))
    c = v[1] @ (v[1] - v[0]) / np.sum((v[0] - v[1]) ** 2)
    np.testing.assert_allclose(optlab.min_norm_weights(v @ v.T), [c, 1 - c], rtol=1e-12)
    np.testing.assert_array_equal(optlab.min_norm_weights(jnp.ones((1, 1))), [1.0])
    # Three vectors, with the least-norm point inside an edge or the interior of the
    # hull: against a direct solution of the simplex-constrained QP.
    for vecs in (rng.normal(size=(3, 2)) + np.array([0.3, 0.0]), rng.normal(size=(3, 5))):
        gram = vecs @ vecs.T
        lam = np.asarray(solve(gram))
        assert lam.min() >= 0
        assert abs(lam.sum() - 1) < 1e-12
        direct = scipy.optimize.minimize(
            lambda x: x @ gram @ x,
            np.full(3, 1 / 3),
            method="SLSQP",
            bounds=[(0, 1)] * 3,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
            options={"ftol": 1e-14},
        )
        assert lam @ gram @ lam <= direct.fun + 1e-6
    # Seven unit vectors (FedAWARE's case): the official solver, to the iterate, also
    # stopped after 3 iterations (a traced cap).
    units = rng.normal(size=(7, 4)) + 0.5
    units /= np.linalg.norm(units, axis=1, keepdims=True)
    gram = units @ units.T
    np.testing.assert_allclose(solve(gram), np_min_norm_fw(gram), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(solve(gram, 3), np_min_norm_fw(gram, max_iters=3))
    with pytest.raises(ValueError, match="square"):
        optlab.min_norm_weights(jnp.ones((2, 3)))


@pytest.mark.parametrize("projection", [False, True])
def test_matches_reference_loop(projection, rng, x64):
    """Warm-up until every client has taken part (rounds 0-2 sample 2 of 4, so round 1
    still averages and the min-norm step starts in round 2 or 3), then stale momenta of
    idle clients enter the min-norm problem. The projection run goes through
    inject_hyperparams (alpha traced) with data-size weights."""
    steps = 13
    a, data, x0 = worker_problem(rng, WORKERS, steps)
    masks = random_masks(rng, steps // H + 1, WORKERS, 2)
    masks[:3] = [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]  # warm-up ends in round 2
    grad = lambda i, t, x: a @ x - data[t, i]
    client, server = optax.sgd(0.05), optax.sgd(0.5, momentum=0.5)
    weights = np.array([1.0, 3.0, 0.5, 2.0]) if projection else None
    if projection:
        tx = optax.inject_hyperparams(optlab.fedaware, static_args=("projection",))(
            client, server, H, AXIS, alpha=0.375, projection=True,
            client_weights=weights,
        )  # fmt: skip
    else:
        tx = optlab.fedaware(client, server, H, AXIS, alpha=0.375)
    xs, (_, state) = run_vmap(with_extras(tx, H, masks), a, data, x0)
    ref, _ = reference_rounds(
        grad, x0, steps, WORKERS, NumpySGD(0.05), NumpySGD(0.5, 0.5), H, masks=masks,
        weights=weights, method="fedaware", alpha=0.375, projection=projection,
    )  # fmt: skip
    np.testing.assert_allclose(xs, ref, rtol=1e-9, atol=1e-11)
    assert np.all(np.asarray(federated_state(state).seen))
    # Two warm-up rounds of averaging: FedAvg's trajectory until the min-norm step.
    fedavg_ref, _ = reference_rounds(
        grad, x0, 2 * H, WORKERS, NumpySGD(0.05), NumpySGD(0.5, 0.5), H, masks=masks,
        weights=weights,
    )  # fmt: skip
    np.testing.assert_allclose(xs[: 2 * H], fedavg_ref, rtol=1e-9, atol=1e-11)
    fedavg_ref, _ = reference_rounds(
        grad, x0, 3 * H, WORKERS, NumpySGD(0.05), NumpySGD(0.5, 0.5), H, masks=masks,
        weights=weights,
    )  # fmt: skip
    assert np.abs(xs[3 * H - 1] - fedavg_ref[-1]).max() > 1e-3  # then they part


def test_vmap_equals_shard_map_and_off_round_steps_move_no_bytes(rng):
    workers = 8
    a, data, x0 = worker_problem(rng, workers, 6)
    masks = np.ones((3, workers), bool)
    masks[1, ::2] = False
    tx = with_extras(optlab.fedaware(optax.sgd(0.05), optax.sgd(1.0), 2, AXIS), 2, masks)
    xs, (_, v_state) = run_vmap(tx, a, data, x0)
    # The sync conditional (the warm-up/min-norm choice nests inside it).
    ys, (_, s_state) = shard_map_run_and_check(tx, a, data, x0, conditionals=1)
    np.testing.assert_allclose(ys, xs, rtol=1e-5, atol=1e-6)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), s_state, v_state
    )
    assert isinstance(s_state, optlab.FedAWAREState)
    assert np.all(np.asarray(s_state.seen))


def test_orbax_round_trip_mid_round_resumes_bitwise(tmp_path, rng):
    a, data, x0 = worker_problem(rng, WORKERS, 9)
    masks = random_masks(rng, 5, WORKERS, 2)
    masks[:2] = [[True, True, False, False], [False, False, True, True]]
    tx = optlab.fedaware(optax.sgd(0.05, momentum=0.9), optax.sgd(1.0), 3, AXIS)
    assert_orbax_resume_is_bitwise(
        with_extras(tx, 3, masks),
        a,
        data.astype(np.float32),
        x0,
        WORKERS,
        steps=9,
        split=7,  # one step into the third round, after the min-norm step started
        state_type=optlab.FedAWAREState,
        path=(tmp_path / "ckpt").absolute(),
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, r"alpha must lie in \[0, 1\]"),
        ({"alpha": -0.1}, "alpha"),
        ({"projection": "yes"}, "projection must be a bool"),
        ({"max_iters": -1}, r"max_iters must be an integer in \[0, "),
        ({"tol": -1.0}, "tol must lie in"),
        ({"local_steps": 0}, "local_steps"),
        ({"client_weights": [1.0, np.nan]}, "client_weights"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"local_steps": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        optlab.fedaware(optax.sgd(0.01), optax.sgd(1.0), axis_name=AXIS, **args)

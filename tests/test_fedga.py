"""optlab.fedga against a float64 loop over clients written from the official FedGA round
(ALGORITHMS.md 2.4), one local step = optlab.gradalign, vmap vs shard_map, the compiled
off-round steps, refusals and validation (the Orbax mid-round resume of the shared round
skeleton is checked in test_fedaware.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from federated_checks import random_masks, reference_rounds, shard_map_run_and_check, with_extras
from worker_axis_checks import (
    AXIS,
    DIM,
    NumpySGD,
    run_vmap,
    worker_problem,
)

import optlab

WORKERS = 4
H = 3
STEPS = 10
CUBIC = 0.1  # client loss: 1/2 x'A_i x + CUBIC/4 sum x^4 - d_i(t)'x


def problem(rng):
    """Client-specific Hessians, so that the aligned start points matter (with one common
    A and a quadratic loss the displacements would cancel in the server average)."""
    m = rng.normal(size=(WORKERS, DIM, DIM))
    a = m @ np.swapaxes(m, 1, 2) / DIM + np.eye(DIM)
    data = 2.0 * rng.normal(size=(WORKERS, DIM)) + 0.3 * rng.normal(size=(STEPS, WORKERS, DIM))
    return a, data, rng.normal(size=DIM)


def run(tx, a, data, x0, masks=None):
    """Clients under vmap, each with its own A_i; ``grad_fn`` on the step's data."""

    def step(w, state, a_i, d, active):
        grad_fn = lambda w: a_i @ w + CUBIC * w**3 - d
        extra = {} if masks is None else {"active": active}
        updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn, **extra)
        return optax.apply_updates(w, updates), state

    step = jax.jit(jax.vmap(step, axis_name=AXIS, in_axes=(0, 0, 0, 0, None)))
    w = jnp.broadcast_to(jnp.asarray(x0), (WORKERS, DIM))
    state = jax.vmap(tx.init)(w)
    out = []
    for t in range(len(data)):
        active = jnp.asarray(masks[t // H] if masks is not None else np.ones(WORKERS, bool))
        w, state = step(w, state, jnp.asarray(a), jnp.asarray(data[t]), active)
        out.append(np.asarray(w))
    return np.array(out)


def test_matches_reference_loop(rng, x64):
    a, data, x0 = problem(rng)
    masks = random_masks(rng, STEPS // H + 1, WORKERS, 3)
    weights = np.array([1.0, 3.0, 0.5, 2.0])
    grad = lambda i, t, x: a[i] @ x + CUBIC * x**3 - data[t, i]
    # Through inject_hyperparams: beta and the weights are traced (values exact in float32).
    tx = optax.inject_hyperparams(optlab.fedga)(
        optax.sgd(0.05, momentum=0.9), optax.sgd(1.0, momentum=0.5), H, AXIS, beta=0.25,
        client_weights=weights,
    )  # fmt: skip
    xs = run(tx, a, data, x0, masks)
    common = (grad, x0, STEPS, WORKERS, NumpySGD(0.05, 0.9), NumpySGD(1.0, 0.5), H)
    ref, _ = reference_rounds(*common, masks=masks, weights=weights, method="fedga", beta=0.25)
    np.testing.assert_allclose(xs, ref, rtol=1e-10, atol=1e-12)
    fedavg, _ = reference_rounds(*common, masks=masks, weights=weights)
    assert np.abs(ref[-1] - fedavg[-1]).max() > 1e-3  # the alignment changed the path


def test_one_local_step_is_gradalign(rng, x64):
    a, data, x0 = problem(rng)
    client = optax.sgd(0.05, momentum=0.9)
    # Client momentum kept across rounds, as GradAlign's base state (linear in the
    # gradients, so the mean of the client buffers follows the mean gradient).
    tx = optlab.fedga(client, optax.sgd(1.0), 1, AXIS, beta=0.3, reset_client_state=False)
    xs = run(tx, a, data, x0)
    ys = run(optlab.gradalign(client, 0.3, AXIS), a, data, x0)
    np.testing.assert_allclose(xs, ys, rtol=1e-10, atol=1e-12)


def test_vmap_equals_shard_map_and_off_round_steps_move_no_bytes(rng):
    workers = 8
    a, data, x0 = worker_problem(rng, workers, 6)
    masks = random_masks(rng, 3, workers, 3)
    tx = with_extras(optlab.fedga(optax.sgd(0.05), optax.sgd(1.0), 2, AXIS, beta=0.5), 2, masks, a)
    xs, _ = run_vmap(tx, a, data, x0)
    # Two conditionals: the round start (mean gradient, second gradient) and the sync.
    ys, (_, s_state) = shard_map_run_and_check(tx, a, data, x0, conditionals=2)
    np.testing.assert_allclose(ys, xs, rtol=1e-5, atol=1e-6)
    assert isinstance(s_state, optlab.FedGAState)


def test_refusals():
    tx = optlab.fedga(optax.sgd(0.1), optax.sgd(1.0), 2, AXIS)
    w = jnp.ones((2, 3))
    call = lambda tx, **kw: jax.vmap(lambda p, s: tx.update(p, s, p, **kw), axis_name=AXIS)(
        w, jax.vmap(tx.init)(w)
    )
    with pytest.raises(ValueError, match="needs the extra argument grad_fn"):
        call(tx)
    with pytest.raises(ValueError, match=r"inside optax\.MultiSteps would silently drop"):
        call(optax.MultiSteps(tx, 2), grad_fn=lambda p: p)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": -0.1}, "beta must lie in"),
        ({"beta": "0.1"}, "beta must be a real number"),
        ({"local_steps": 0}, "local_steps"),
        ({"axis_name": ()}, "axis_name"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"local_steps": 3, "axis_name": AXIS, **kwargs}
    with pytest.raises(ValueError, match=match):
        optlab.fedga(optax.sgd(0.01), optax.sgd(1.0), **args)

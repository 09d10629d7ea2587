"""optlab.gradalign against a float64 NumPy loop over workers written from the equations
(ALGORITHMS.md 2.3), the sign, the first-order (variance-penalty) view, vmap vs shard_map,
composition (chain, inject_hyperparams, donation, Orbax, MultiSteps) and validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P
from worker_axis_checks import (
    AXIS,
    DIM,
    NumpyAdam,
    NumpySGD,
    clip,
    init_workers,
    worker_mesh,
)

import optlab

WORKERS = 4
STEPS = 9
CUBIC = 0.1  # worker loss: 1/2 x'A_i x + CUBIC/4 sum x^4 - d_i(t)'x


def gradalign_problem(rng: np.random.Generator, workers: int, steps: int):
    """(A[i], data[t, i], x0): worker-specific Hessians, so that alignment matters (with a
    common A the displacements would cancel in the mean of the second gradients)."""
    m = rng.normal(size=(workers, DIM, DIM))
    a = m @ np.swapaxes(m, 1, 2) / DIM + np.eye(DIM)
    b = 2.0 * rng.normal(size=(workers, DIM))
    data = b[None] + 0.3 * rng.normal(size=(steps, workers, DIM))
    return a, data, rng.normal(size=DIM)


def np_grad(a_i, d, x):
    return a_i @ x + CUBIC * x**3 - d


def reference_gradalign(a, data, x0, base, beta, max_norm=None):
    """GradAlign from the equations: g_i, mean, x_i = x + beta (g_i - mean), h_i, base on
    mean h. ``beta`` may be a function of the step."""
    workers = data.shape[1]
    x, s = x0.copy(), base.init(x0)
    out = []
    for t in range(len(data)):
        b = beta(t) if callable(beta) else beta
        gs = [np_grad(a[i], data[t, i], x) for i in range(workers)]
        if max_norm is not None:  # a clip chained before gradalign sees the first gradient
            gs = [clip(g, max_norm) for g in gs]
        g_bar = np.mean(gs, axis=0)
        hs = [np_grad(a[i], data[t, i], x + b * (gs[i] - g_bar)) for i in range(workers)]
        x, s = base.step(x, np.mean(hs, axis=0), s)
        out.append(x.copy())
    return np.array(out)


def make_step(tx):
    """One worker's step: its gradient and grad_fn from its own Hessian and data."""

    def step(params, state, a_i, d):
        def grad_fn(p):
            w = p["w"]
            return {"w": a_i.astype(w.dtype) @ w + CUBIC * w**3 - d.astype(w.dtype)}

        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    return step


def run_vmap(tx, a, data, x0, *, donate=False):
    workers = data.shape[1]
    params, state = init_workers(tx, x0, workers)
    step = jax.jit(jax.vmap(make_step(tx), axis_name=AXIS), donate_argnums=(0, 1) if donate else ())
    xs = []
    for t in range(len(data)):
        params, state = step(params, state, jnp.asarray(a), jnp.asarray(data[t]))
        xs.append(np.asarray(params["w"]))
    return np.array(xs), (params, state)


def run_shard_map(tx, a, data, x0):
    workers = data.shape[1]
    params, state = init_workers(tx, x0, workers)
    worker_step = make_step(tx)

    def body(params, state, a, d):
        out = worker_step(*jax.tree.map(lambda v: v[0], (params, state, a, d)))
        return jax.tree.map(lambda v: v[None], out)

    spec = P(AXIS)
    step = jax.jit(
        jax.shard_map(body, mesh=worker_mesh(workers), in_specs=(spec,) * 4, out_specs=spec)
    )
    xs = []
    for t in range(len(data)):
        params, state = step(params, state, jnp.asarray(a), jnp.asarray(data[t]))
        xs.append(np.asarray(params["w"]))
    return np.array(xs), (params, state)


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


def _replicated(xs):
    """The workers' params are identical after every step; returns worker 0's path."""
    np.testing.assert_array_equal(xs, np.broadcast_to(xs[:, :1], xs.shape))
    return xs[:, 0]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_reference_loop_momentum(beta, rng, x64):
    a, data, x0 = gradalign_problem(rng, WORKERS, STEPS)
    tx = optlab.gradalign(optax.sgd(0.05, momentum=0.9), beta, AXIS)
    xs, (_, state) = run_vmap(tx, a, data, x0)
    ref = reference_gradalign(a, data, x0, NumpySGD(0.05, 0.9), beta)
    _close(_replicated(xs), ref)
    assert isinstance(state, optlab.GradAlignState)
    np.testing.assert_array_equal(state.count, STEPS)
    # GradAlign really differs from synchronous SGD here.
    sync = reference_gradalign(a, data, x0, NumpySGD(0.05, 0.9), 0.0)
    assert np.abs(ref - sync).max() > 1e-3


def test_matches_reference_loop_adam_and_beta_schedule(rng, x64):
    a, data, x0 = gradalign_problem(rng, WORKERS, STEPS)
    schedule = optax.linear_schedule(0.5, 0.0, STEPS - 1)
    tx = optlab.gradalign(optax.adam(0.05), schedule, AXIS)
    xs, _ = run_vmap(tx, a, data, x0)
    ref = reference_gradalign(a, data, x0, NumpyAdam(0.05), lambda t: float(schedule(t)))
    _close(_replicated(xs), ref)


def test_beta_zero_is_synchronous_sgd_on_the_mean_gradient(rng, x64):
    a, data, x0 = gradalign_problem(rng, WORKERS, STEPS)
    xs, _ = run_vmap(optlab.gradalign(optax.sgd(0.05, momentum=0.9), 0.0, AXIS), a, data, x0)
    sync = optax.chain(optlab.mean_gradients(AXIS), optax.sgd(0.05, momentum=0.9))
    ys, _ = run_vmap(sync, a, data, x0)
    np.testing.assert_array_equal(xs, ys)


def test_sign_hand_computed_one_step():
    """Scalar w = 0, worker losses a_i/2 (w - c_i)^2: g = -a c = [-1, 0, 3, 2], mean 1,
    deviations [-2, -1, 2, 1], points beta * dev = [-1, -1/2, 1, 1/2] (beta = 1/2),
    h = a (point - c) = [-2, -1, 6, 4], mean 7/4; the step is -lr * 7/4 = -0.4375."""
    a = jnp.array([1.0, 2.0, 3.0, 4.0])
    c = jnp.array([1.0, 0.0, -1.0, -0.5])
    tx = optlab.gradalign(optax.sgd(0.25), 0.5, AXIS)

    def step(w, a, c):
        grad_fn = jax.grad(lambda w: a / 2 * (w - c) ** 2)
        updates, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
        return updates

    updates = jax.vmap(step, axis_name=AXIS)(jnp.zeros(4), a, c)
    np.testing.assert_allclose(updates, np.full(4, -0.4375), rtol=1e-6)
    # Synchronous SGD would step -0.25 * 1; the opposite sign -0.25 * 1/4.
    wrong_sign = -0.25 * np.mean(np.asarray(a) * (-0.5 * np.array([-2, -1, 2, 1]) - c))
    np.testing.assert_allclose(wrong_sign, -0.0625)


def test_mean_second_gradient_is_the_gradient_of_the_variance_penalty(rng, x64):
    """Quadratic worker losses: mean_i h_i = grad[f + beta/2 * mean_i ||grad f_i - grad f||^2]
    exactly (the first-order view of the docstring, exact here)."""
    a, data, x0 = gradalign_problem(rng, WORKERS, 1)
    a, d, beta = jnp.asarray(a), jnp.asarray(data[0]), 0.3

    def losses(x):
        return 0.5 * jnp.einsum("j,ijk,k->i", x, a, x) - d @ x

    def penalised(x):
        g = jax.jacobian(losses)(x)  # (workers, DIM)
        return jnp.mean(losses(x)) + beta / 2 * jnp.mean(jnp.sum((g - g.mean(0)) ** 2, axis=1))

    tx = optlab.gradalign(optax.sgd(1.0), beta, AXIS)

    def step(x, a_i, d_i):
        grad_fn = jax.grad(lambda x: 0.5 * x @ a_i @ x - d_i @ x)
        updates, _ = tx.update(grad_fn(x), tx.init(x), x, grad_fn=grad_fn)
        return -updates

    x = jnp.asarray(x0)
    h = jax.vmap(step, in_axes=(None, 0, 0), axis_name=AXIS)(x, a, d)
    _close(np.asarray(h), np.broadcast_to(jax.grad(penalised)(x), h.shape))


def test_vmap_equals_shard_map(rng):
    a, data, x0 = gradalign_problem(rng, WORKERS, STEPS)
    tx = optlab.gradalign(optax.sgd(0.05, momentum=0.9), 0.3, AXIS)
    xs, (_, v_state) = run_vmap(tx, a, data, x0)
    ys, (_, s_state) = run_shard_map(tx, a, data, x0)
    np.testing.assert_allclose(ys, xs, rtol=1e-5, atol=1e-6)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), s_state, v_state
    )
    assert isinstance(s_state, optlab.GradAlignState)


def test_inside_chain_after_clipping(rng, x64):
    """A clip chained before gradalign changes the displacement only."""
    a, data, x0 = gradalign_problem(rng, WORKERS, STEPS)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optlab.gradalign(optax.sgd(0.05, momentum=0.9), 0.3, AXIS)
    )
    xs, _ = run_vmap(tx, a, data, x0)
    ref = reference_gradalign(a, data, x0, NumpySGD(0.05, 0.9), 0.3, max_norm=1.0)
    _close(_replicated(xs), ref)
    assert np.linalg.norm(np_grad(a[0], data[0, 0], x0)) > 1.0  # the clipping bites


def test_inject_hyperparams_traced_beta(rng, x64):
    a, data, x0 = gradalign_problem(rng, WORKERS, STEPS)
    # Values exact in float32 (inject_hyperparams keeps float32 hyperparameters).
    schedule = optax.piecewise_constant_schedule(0.5, {3: 0.5, 6: 0.0})

    def factory(beta, learning_rate):
        return optlab.gradalign(optax.sgd(learning_rate, momentum=0.9), beta, AXIS)

    tx = optax.inject_hyperparams(factory)(beta=schedule, learning_rate=0.0625)
    xs, (_, state) = run_vmap(tx, a, data, x0)
    ref = reference_gradalign(a, data, x0, NumpySGD(0.0625, 0.9), lambda t: float(schedule(t)))
    _close(_replicated(xs), ref)
    np.testing.assert_allclose(state.hyperparams["beta"], schedule(STEPS - 1))
    assert isinstance(state.inner_state, optlab.GradAlignState)


def test_jitted_step_donating_params_and_state(rng):
    a, data, x0 = gradalign_problem(rng, WORKERS, 5)
    tx = optlab.gradalign(optax.adam(0.05), 0.2, AXIS)
    xs, (params, state) = run_vmap(tx, a, data, x0)
    ys, (d_params, d_state) = run_vmap(tx, a, data, x0, donate=True)
    np.testing.assert_array_equal(ys, xs)
    jax.tree.map(np.testing.assert_array_equal, (d_params, d_state), (params, state))

    step = jax.jit(jax.vmap(make_step(tx), axis_name=AXIS), donate_argnums=(0, 1))
    p, s = init_workers(tx, x0, WORKERS)
    step(p, s, jnp.asarray(a), jnp.asarray(data[0]))
    assert p["w"].is_deleted()


def test_orbax_round_trip_resumes_bitwise(tmp_path, rng):
    steps, split = 8, 3
    a, data, x0 = gradalign_problem(rng, WORKERS, steps)
    a, data = a.astype(np.float32), data.astype(np.float32)
    tx = optlab.gradalign(optax.sgd(0.05, momentum=0.9), optax.linear_schedule(0.4, 0.1, 6), AXIS)
    step = jax.jit(jax.vmap(make_step(tx), axis_name=AXIS))

    def run(params, state, start, stop):
        for t in range(start, stop):
            params, state = step(params, state, jnp.asarray(a), jnp.asarray(data[t]))
        return params, state

    start = init_workers(tx, x0.astype(np.float32), WORKERS)
    full = run(*start, 0, steps)
    half = run(*start, 0, split)
    path = (tmp_path / "ckpt").absolute()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, half)
        ckpt.wait_until_finished()
        restored = ckpt.restore(path, jax.eval_shape(lambda: half))
    assert isinstance(restored[1], optlab.GradAlignState)
    jax.tree.map(np.testing.assert_array_equal, restored, half)
    resumed = run(*restored, split, steps)
    jax.tree.map(np.testing.assert_array_equal, resumed, full)


def _one_step(tx, params, grad_fn, extra=None):
    def step(p):
        return tx.update(grad_fn(p), tx.init(p), p, grad_fn=grad_fn, **(extra or {}))

    return jax.vmap(step, axis_name=AXIS)(params)


def test_extra_args_reach_the_base_optimizer():
    seen = []

    def base_update(updates, state, params=None, **extra):
        seen.append(sorted(extra))
        return updates, state

    base = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), base_update)
    _one_step(optlab.gradalign(base, 0.1, AXIS), jnp.ones((2, 3)), lambda p: p, {"key": 1})
    assert seen == [["grad_fn", "key"]]


def test_multi_steps_around_is_refused_inside_works(x64):
    params = jnp.ones((WORKERS, 2))
    grad_fn = lambda p: 2.0 * p
    tx = optlab.gradalign(optax.sgd(0.1), 0.1, AXIS)
    with pytest.raises(ValueError, match=r"MultiSteps.*microbatched_grad_fn.*MultiSteps\(base"):
        _one_step(optax.MultiSteps(tx, 2), params, grad_fn)
    inside = optlab.gradalign(optax.MultiSteps(optax.sgd(0.1), 2), 0.1, AXIS)
    updates, _ = _one_step(inside, params, grad_fn)
    np.testing.assert_array_equal(updates, 0.0)  # the first micro-step only accumulates


def test_tuple_axis_name():
    """Two named axes (hosts x devices, here nested vmaps) average over both."""
    tx = optlab.gradalign(optax.sgd(1.0), 0.5, ("a", "b"))
    scale = jnp.arange(1.0, 7.0).reshape(2, 3)

    def step(s):
        w = jnp.zeros(())
        grad_fn = lambda w: s * (w - 1.0)
        updates, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
        return updates

    out = jax.vmap(jax.vmap(step, axis_name="b"), axis_name="a")(scale)
    s = np.arange(1.0, 7.0)
    g = -s
    h = s * (0.5 * (g - g.mean()) - 1.0)
    np.testing.assert_allclose(out, np.full((2, 3), -h.mean()), rtol=1e-6)


def test_needs_params_and_grad_fn():
    tx = optlab.gradalign(optax.sgd(0.1), 0.1, AXIS)
    params = jnp.ones(3)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="needs the extra argument grad_fn"):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": -0.1}, r"beta must lie in \[0, inf\)"),
        ({"beta": float("nan")}, "beta"),
        ({"beta": float("inf")}, "beta"),
        ({"beta": None}, "beta"),
        ({"axis_name": None}, "axis_name must be a string"),
        ({"axis_name": 3}, "axis_name"),
        ({"axis_name": ()}, "axis_name"),
        ({"axis_name": ("a", 1)}, "axis_name"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"beta": 0.1, "axis_name": AXIS, **kwargs}
    with pytest.raises(ValueError, match=match):
        optlab.gradalign(optax.sgd(0.1), **args)


def test_shard_map_replicated_params_tiny_mlp(rng):
    """Replicated (P()) params under shard_map with data_parallel_value_and_grad(average=False),
    as the docstring says, equal the vmap simulation on a tiny MLP with per-worker batches."""
    params = {
        "w1": jnp.asarray(rng.normal(size=(3, 8)) / 2, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(8,)) / 3, jnp.float32),
    }
    xs = jnp.asarray(rng.normal(size=(WORKERS, 6, 3)), jnp.float32)
    ys = jnp.asarray(rng.normal(size=(WORKERS, 6)), jnp.float32)
    tx = optlab.gradalign(optax.sgd(0.1, momentum=0.9), 0.5, AXIS)

    def loss(p, x, y):
        return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

    def step(p, s, x, y):
        vg = optlab.data_parallel_value_and_grad(loss, AXIS, average=False)
        grad_fn = lambda q: vg(q, x, y)[1]
        updates, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), s

    sharded = jax.jit(
        jax.shard_map(
            lambda p, s, x, y: step(p, s, x[0], y[0]),
            mesh=worker_mesh(WORKERS),
            in_specs=(P(), P(), P(AXIS), P(AXIS)),
            out_specs=P(),
        )
    )
    simulated = jax.jit(jax.vmap(step, in_axes=(None, None, 0, 0), out_axes=None, axis_name=AXIS))
    p_s = p_v = params
    s_s = s_v = tx.init(params)
    for _ in range(3):
        p_s, s_s = sharded(p_s, s_s, xs, ys)
        p_v, s_v = simulated(p_v, s_v, xs, ys)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), p_s, p_v)
    moved = optax.tree.norm(jax.tree.map(jnp.subtract, p_s, params))
    assert moved > 1e-2

"""optlab.local_sgd against a float64 NumPy loop over workers, vmap vs shard_map, the compiled
off-sync step, composition (chain, inject_hyperparams, donation, Orbax) and validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from worker_axis_checks import (
    AXIS,
    NumpyAdam,
    NumpySGD,
    assert_collectives_only_in_sync_branch,
    assert_orbax_resume_is_bitwise,
    clip,
    init_workers,
    make_step,
    mean_states,
    run_shard_map,
    run_vmap,
    worker_problem,
)

import optlab

WORKERS = 4
STEPS = 13


def reference_local_sgd(
    a, data, x0, inner, sync_period, *, start_step=0, average_state=False, max_norm=None
):
    """Local SGD / post-local SGD from the equations (ALGORITHMS.md 9.1)."""
    workers = data.shape[1]
    xs = [x0.copy() for _ in range(workers)]
    states = [inner.init(x0) for _ in range(workers)]
    out = []
    for t in range(len(data)):
        for i in range(workers):
            g = a @ xs[i] - data[t, i]
            if max_norm is not None:
                g = clip(g, max_norm)
            xs[i], states[i] = inner.step(xs[i], g, states[i])
        if t < start_step or (t + 1 - start_step) % sync_period == 0:
            mean = np.mean(xs, axis=0)
            xs = [mean.copy() for _ in range(workers)]
            if average_state:
                states = mean_states(states)
        out.append(np.array(xs))
    return np.array(out)


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sync_period", [1, 2, 3, 5])
@pytest.mark.parametrize("average_state", [False, True])
def test_matches_reference_loop_momentum(sync_period, average_state, rng, x64):
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    tx = optlab.local_sgd(
        optax.sgd(0.05, momentum=0.9), sync_period, AXIS, average_state=average_state
    )
    xs, _ = run_vmap(tx, a, data, x0)
    ref = reference_local_sgd(
        a, data, x0, NumpySGD(0.05, 0.9), sync_period, average_state=average_state
    )
    _close(xs, ref)
    if sync_period > 1:  # the workers really drift apart between syncs
        assert np.ptp(xs[0], axis=0).max() > 1e-3


@pytest.mark.parametrize("average_state", [False, True])
def test_matches_reference_loop_adam(average_state, rng, x64):
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    tx = optlab.local_sgd(optax.adam(0.05), 3, AXIS, average_state=average_state)
    xs, _ = run_vmap(tx, a, data, x0)
    _close(xs, reference_local_sgd(a, data, x0, NumpyAdam(0.05), 3, average_state=average_state))


@pytest.mark.parametrize(("start_step", "sync_period"), [(3, 4), (5, 2), (1, 3)])
def test_post_local_sgd_matches_reference_loop(start_step, sync_period, rng, x64):
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    tx = optlab.local_sgd(
        optax.sgd(0.05, momentum=0.9, nesterov=True), sync_period, AXIS, start_step=start_step
    )
    xs, _ = run_vmap(tx, a, data, x0)
    ref = reference_local_sgd(
        a, data, x0, NumpySGD(0.05, 0.9, nesterov=True), sync_period, start_step=start_step
    )
    _close(xs, ref)
    # Syncs: every step before start_step, then after each H-th step counted from there.
    synced = [np.ptp(x, axis=0).max() < 1e-12 for x in xs]
    expected = [t < start_step or (t + 1 - start_step) % sync_period == 0 for t in range(STEPS)]
    assert synced == expected


def test_averaging_every_step_with_momentum_is_synchronous_sgd(rng, x64):
    """H = 1 with local momentum buffers equals momentum SGD on the mean gradient."""
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    xs, _ = run_vmap(optlab.local_sgd(optax.sgd(0.05, momentum=0.9), 1, AXIS), a, data, x0)
    sync = optax.chain(optlab.mean_gradients(AXIS), optax.sgd(0.05, momentum=0.9))
    ys, _ = run_vmap(sync, a, data, x0)
    _close(xs, ys)


@pytest.mark.parametrize("sync_period", [1, 3])
def test_one_worker_is_the_inner_optimizer(sync_period, rng, x64):
    a, data, x0 = worker_problem(rng, 1, STEPS)
    inner = optax.adam(0.05)
    xs, _ = run_vmap(optlab.local_sgd(inner, sync_period, AXIS), a, data, x0)
    ys, _ = run_vmap(inner, a, data, x0)
    _close(xs, ys)


@pytest.mark.parametrize("workers", [4, 8])
def test_vmap_equals_shard_map(workers, rng):
    a, data, x0 = worker_problem(rng, workers, STEPS)
    tx = optlab.local_sgd(optax.sgd(0.05, momentum=0.9), 3, AXIS, start_step=2, average_state=True)
    xs, (_, v_state) = run_vmap(tx, a, data, x0)
    ys, (_, s_state) = run_shard_map(tx, a, data, x0)
    np.testing.assert_allclose(ys, xs, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6), s_state, v_state
    )
    assert isinstance(s_state, optlab.LocalSGDState)


@pytest.mark.parametrize("average_state", [False, True])
@pytest.mark.parametrize("start_step", [0, 4])
def test_off_sync_step_compiles_without_collectives(average_state, start_step, rng):
    a, _, _ = worker_problem(rng, WORKERS, 1)
    tx = optlab.local_sgd(
        optax.sgd(0.05, momentum=0.9), 3, AXIS, start_step=start_step, average_state=average_state
    )
    assert_collectives_only_in_sync_branch(tx, a, WORKERS)


def _collectives_outside_and_inside_while(jaxpr) -> tuple[int, int]:
    """Collective primitives reachable without entering a ``while`` body, and inside one
    (whose predicate is data-dependent: not a literal)."""
    counts = [0, 0]

    def subjaxprs(value):
        if hasattr(value, "eqns"):
            yield value
        elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
            yield value.jaxpr
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from subjaxprs(v)

    def walk(jaxpr, in_while):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name.startswith(("psum", "pmax", "pmin", "ppermute", "all_gather", "all_to_all")):
                counts[in_while] += 1
            if name == "while":
                (out,) = eqn.params["cond_jaxpr"].jaxpr.outvars
                assert not hasattr(out, "val"), "a while loop with a constant predicate"
            for key, value in eqn.params.items():
                for sub in subjaxprs(value):
                    walk(sub, in_while or (name == "while" and key == "body_jaxpr"))

    walk(jaxpr, False)
    return counts[0], counts[1]


def test_runs_by_workers_vmap_skips_the_sync_off_sync(rng, x64):
    """vmap over runs (no axis name) of vmap over workers: the count is batched, so a
    ``lax.cond`` would be a select running the all-reduce every step; ``run_if`` keeps it
    in a while loop that runs only while some member syncs. Same params as the reference."""
    runs, steps, period = 2, 6, 3
    a, _, x0 = worker_problem(rng, WORKERS, steps)
    data = np.stack([worker_problem(rng, WORKERS, steps)[1] for _ in range(runs)], axis=1)
    tx = optlab.local_sgd(optax.sgd(0.05, momentum=0.9), period, AXIS)
    step = jax.jit(jax.vmap(jax.vmap(make_step(tx, a), axis_name=AXIS)))
    params, state = init_workers(tx, x0, WORKERS)
    params, state = jax.tree.map(lambda v: jnp.stack([v] * runs), (params, state))
    for t in range(steps):
        params, state = step(params, state, jnp.asarray(data[t]))
    for r in range(runs):
        ref = reference_local_sgd(a, data[:, r], x0, NumpySGD(0.05, 0.9), period)
        _close(np.asarray(params["w"][r]), ref[-1])

    # The worker axis bound by name (psum stays a primitive), the runs vmapped.
    one_worker = jax.tree.map(lambda v: v[:, 0], (params, state, jnp.asarray(data[0])))
    trace = lambda f: jax.make_jaxpr(jax.vmap(f), axis_env=[(AXIS, WORKERS)])(*one_worker)
    assert state.count.shape == (runs, WORKERS)  # batched: the cond cannot stay a cond
    outside, inside = _collectives_outside_and_inside_while(trace(make_step(tx, a)).jaxpr)
    assert (outside, inside) == (0, 1)
    # Negative control: synchronous data parallelism all-reduces on every step.
    dp = optax.chain(optlab.mean_gradients(AXIS), optax.sgd(0.05))
    dp_state = jax.vmap(jax.vmap(dp.init))(params)
    one_dp = (one_worker[0], jax.tree.map(lambda v: v[:, 0], dp_state), one_worker[2])
    dp_jaxpr = jax.make_jaxpr(jax.vmap(make_step(dp, a)), axis_env=[(AXIS, WORKERS)])(*one_dp)
    assert _collectives_outside_and_inside_while(dp_jaxpr.jaxpr)[0] > 0


def test_inside_chain_after_clipping(rng, x64):
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optlab.local_sgd(optax.sgd(0.05, momentum=0.9), 3, AXIS)
    )
    xs, _ = run_vmap(tx, a, data, x0)
    ref = reference_local_sgd(a, data, x0, NumpySGD(0.05, 0.9), 3, max_norm=1.0)
    _close(xs, ref)
    assert np.linalg.norm(a @ x0 - data[0, 0]) > 1.0  # the clipping bites


def test_inject_hyperparams_traced_inner_learning_rate(rng, x64):
    """inject_hyperparams over local_sgd itself: the learning rate (a schedule) is traced,
    and the integer knobs go through without static_args."""
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    # Rates exact in float32 (inject_hyperparams keeps float32 hyperparameters).
    schedule = optax.piecewise_constant_schedule(0.0625, {4: 0.5, 8: 0.5})

    def factory(learning_rate, sync_period, start_step):
        inner = optax.sgd(learning_rate, momentum=0.9)
        return optlab.local_sgd(inner, sync_period, AXIS, start_step=start_step)

    tx = optax.inject_hyperparams(factory)(learning_rate=schedule, sync_period=3, start_step=2)
    xs, (_, state) = run_vmap(tx, a, data, x0)
    ref = reference_local_sgd(
        a, data, x0, NumpySGD(lambda t: float(schedule(t)), 0.9), 3, start_step=2
    )
    _close(xs, ref)
    np.testing.assert_allclose(state.hyperparams["learning_rate"], schedule(STEPS - 1))


def test_jitted_step_donating_params_and_state(rng):
    a, data, x0 = worker_problem(rng, WORKERS, 7)
    tx = optlab.local_sgd(optax.adam(0.05), 3, AXIS, average_state=True)
    xs, (params, state) = run_vmap(tx, a, data, x0)
    ys, (d_params, d_state) = run_vmap(tx, a, data, x0, donate=True)
    np.testing.assert_array_equal(ys, xs)
    jax.tree.map(np.testing.assert_array_equal, (d_params, d_state), (params, state))

    # The donated buffers are really consumed.
    step = jax.jit(jax.vmap(make_step(tx, a), axis_name=AXIS), donate_argnums=(0, 1))
    p, s = init_workers(tx, x0, WORKERS)
    step(p, s, jnp.asarray(data[0]))
    assert p["w"].is_deleted()


def test_orbax_round_trip_mid_period_resumes_bitwise(tmp_path, rng):
    steps, split, period = 11, 4, 3  # 4 % 3 == 1: one local step into a period
    a, data, x0 = worker_problem(rng, WORKERS, steps)
    data = data.astype(np.float32)
    tx = optlab.local_sgd(optax.sgd(0.05, momentum=0.9), period, AXIS, start_step=1)
    assert_orbax_resume_is_bitwise(
        tx,
        a,
        data,
        x0,
        WORKERS,
        steps=steps,
        split=split,
        state_type=optlab.LocalSGDState,
        path=(tmp_path / "ckpt").absolute(),
    )


def test_extra_args_reach_the_inner_optimizer():
    seen = []

    def inner_update(updates, state, params=None, **extra):
        seen.append(extra)
        return updates, state

    inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), inner_update)
    tx = optlab.local_sgd(inner, 2, AXIS)
    params = {"w": jnp.ones((2, 3))}
    state = jax.vmap(tx.init)(params)
    jax.vmap(lambda g, s, p: tx.update(g, s, p, grad_fn="f"), axis_name=AXIS)(params, state, params)
    assert seen == [{"grad_fn": "f"}]


def test_needs_params():
    tx = optlab.local_sgd(optax.sgd(0.1), 2, AXIS)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


def test_tuple_axis_name():
    """Two named axes (e.g. hosts x devices, here nested vmaps) average over both."""
    tx = optlab.local_sgd(optax.sgd(1.0), 1, ("a", "b"))
    params = jnp.zeros((2, 3, 1))
    grads = jnp.arange(6.0).reshape(2, 3, 1)

    def step(p, g):
        u, _ = tx.update(g, tx.init(p), p)
        return p + u

    out = jax.vmap(jax.vmap(step, axis_name="b"), axis_name="a")(params, grads)
    np.testing.assert_allclose(out, np.full((2, 3, 1), -2.5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sync_period": 0}, r"sync_period must be an integer in \[1, "),
        ({"sync_period": -2}, "sync_period"),
        ({"sync_period": 2.0}, "sync_period must be an integer"),
        ({"sync_period": True}, "sync_period must be an integer"),
        ({"sync_period": "3"}, "sync_period"),
        ({"start_step": -1}, r"start_step must be an integer in \[0, "),
        ({"start_step": 1.5}, "start_step"),
        ({"axis_name": None}, "axis_name must be a string"),
        ({"axis_name": 3}, "axis_name"),
        ({"axis_name": ()}, "axis_name"),
        ({"axis_name": ("a", 1)}, "axis_name"),
        ({"average_state": "yes"}, "average_state must be a bool"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"sync_period": 2, "axis_name": AXIS, **kwargs}
    with pytest.raises(ValueError, match=match):
        optlab.local_sgd(optax.sgd(0.1), **args)


def test_collective_check_catches_an_every_step_all_reduce(rng):
    """Negative control: synchronous data parallelism all-reduces outside any branch."""
    a, _, _ = worker_problem(rng, WORKERS, 1)
    tx = optax.chain(optlab.mean_gradients(AXIS), optax.sgd(0.1))
    with pytest.raises(AssertionError):
        assert_collectives_only_in_sync_branch(tx, a, WORKERS)

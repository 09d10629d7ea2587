"""optlab.diloco against a float64 NumPy loop over workers, its reductions (plain averaging,
one worker), vmap vs shard_map, the compiled off-sync step, composition and validation."""

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
    run_shard_map,
    run_vmap,
    worker_problem,
)

import optlab

WORKERS = 4
STEPS = 13


def reference_diloco(a, data, x0, inner, outer, sync_period, *, max_norm=None):
    """DiLoCo from the equations (ALGORITHMS.md 9.3); returns the workers' params and the
    anchor after every step."""
    workers = data.shape[1]
    xs = [x0.copy() for _ in range(workers)]
    states = [inner.init(x0) for _ in range(workers)]
    anchor, outer_state = x0.copy(), outer.init(x0)
    out, anchors = [], []
    for t in range(len(data)):
        for i in range(workers):
            g = a @ xs[i] - data[t, i]
            if max_norm is not None:
                g = clip(g, max_norm)
            xs[i], states[i] = inner.step(xs[i], g, states[i])
        if (t + 1) % sync_period == 0:
            delta = anchor - np.mean(xs, axis=0)
            anchor, outer_state = outer.step(anchor, delta, outer_state)
            xs = [anchor.copy() for _ in range(workers)]
        out.append(np.array(xs))
        anchors.append(anchor.copy())
    return np.array(out), np.array(anchors)


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


PAPER_OUTER = NumpySGD(0.7, 0.9, nesterov=True)


@pytest.mark.parametrize("sync_period", [1, 2, 3, 5])
def test_matches_reference_loop_momentum_inner(sync_period, rng, x64):
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    tx = optlab.diloco(optax.sgd(0.05, momentum=0.9), None, sync_period, AXIS)
    xs, (_, state) = run_vmap(tx, a, data, x0)
    ref, anchors = reference_diloco(a, data, x0, NumpySGD(0.05, 0.9), PAPER_OUTER, sync_period)
    _close(xs, ref)
    for w in range(WORKERS):
        _close(optlab.diloco_outer_params(jax.tree.map(lambda v: v[w], state))["w"], anchors[-1])


@pytest.mark.parametrize("sync_period", [2, 4])
def test_matches_reference_loop_adam_inner_adam_outer(sync_period, rng, x64):
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    tx = optlab.diloco(optax.adam(0.05), optax.adam(0.3), sync_period, AXIS)
    xs, _ = run_vmap(tx, a, data, x0)
    ref, _ = reference_diloco(a, data, x0, NumpyAdam(0.05), NumpyAdam(0.3), sync_period)
    _close(xs, ref)


def test_default_outer_is_the_papers_nesterov_sgd(rng, x64):
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    inner = optax.sgd(0.05)
    xs, _ = run_vmap(optlab.diloco(inner, None, 3, AXIS), a, data, x0)
    paper = optax.sgd(0.7, momentum=0.9, nesterov=True)
    ys, _ = run_vmap(optlab.diloco(inner, paper, 3, AXIS), a, data, x0)
    np.testing.assert_array_equal(xs, ys)


@pytest.mark.parametrize("sync_period", [1, 3])
def test_unit_outer_sgd_is_local_sgd(sync_period, rng, x64):
    """outer = sgd(1.0): the new anchor is the workers' mean (with H = 1: plain averaging
    after every step)."""
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    inner = optax.sgd(0.05, momentum=0.9)
    xs, _ = run_vmap(optlab.diloco(inner, optax.sgd(1.0), sync_period, AXIS), a, data, x0)
    ys, _ = run_vmap(optlab.local_sgd(inner, sync_period, AXIS), a, data, x0)
    _close(xs, ys)


@pytest.mark.parametrize("sync_period", [1, 3])
def test_one_worker_unit_outer_is_the_inner_optimizer(sync_period, rng, x64):
    a, data, x0 = worker_problem(rng, 1, STEPS)
    inner = optax.adam(0.05)
    xs, _ = run_vmap(optlab.diloco(inner, optax.sgd(1.0), sync_period, AXIS), a, data, x0)
    ys, _ = run_vmap(inner, a, data, x0)
    _close(xs, ys)


@pytest.mark.parametrize("workers", [4, 8])
def test_vmap_equals_shard_map(workers, rng):
    a, data, x0 = worker_problem(rng, workers, STEPS)
    tx = optlab.diloco(optax.adam(0.05), None, 3, AXIS)
    xs, (_, v_state) = run_vmap(tx, a, data, x0)
    ys, (_, s_state) = run_shard_map(tx, a, data, x0)
    np.testing.assert_allclose(ys, xs, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6), s_state, v_state
    )
    assert isinstance(s_state, optlab.DiLoCoState)
    # The anchor and the outer state stay replicated.
    for leaf in jax.tree.leaves((s_state.anchor, s_state.outer_state)):
        np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[0], leaf.shape))


@pytest.mark.parametrize("outer", [None, optax.adam(0.1)], ids=["nesterov", "adam"])
def test_off_sync_step_compiles_without_collectives(outer, rng):
    a, _, _ = worker_problem(rng, WORKERS, 1)
    tx = optlab.diloco(optax.adamw(1e-3, weight_decay=0.1), outer, 4, AXIS)
    assert_collectives_only_in_sync_branch(tx, a, WORKERS)


def test_inside_chain_after_clipping(rng, x64):
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optlab.diloco(optax.sgd(0.05, momentum=0.9), None, 3, AXIS),
    )
    xs, _ = run_vmap(tx, a, data, x0)
    ref, _ = reference_diloco(a, data, x0, NumpySGD(0.05, 0.9), PAPER_OUTER, 3, max_norm=1.0)
    _close(xs, ref)
    assert np.linalg.norm(a @ x0 - data[0, 0]) > 1.0  # the clipping bites


def test_inject_hyperparams_traced_learning_rates(rng, x64):
    """inject_hyperparams over diloco: inner and outer rates are traced (a schedule for the
    inner one), the period goes through without static_args."""
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    # Rates exact in float32 (inject_hyperparams keeps float32 hyperparameters).
    schedule = optax.piecewise_constant_schedule(0.0625, {4: 0.5, 8: 0.5})

    def factory(inner_lr, outer_lr, sync_period):
        return optlab.diloco(
            optax.sgd(inner_lr, momentum=0.9),
            optax.sgd(outer_lr, momentum=0.9, nesterov=True),
            sync_period,
            AXIS,
        )

    tx = optax.inject_hyperparams(factory)(inner_lr=schedule, outer_lr=0.75, sync_period=3)
    xs, (_, state) = run_vmap(tx, a, data, x0)
    inner = NumpySGD(lambda t: float(schedule(t)), 0.9)
    ref, _ = reference_diloco(a, data, x0, inner, NumpySGD(0.75, 0.9, nesterov=True), 3)
    _close(xs, ref)
    np.testing.assert_allclose(state.hyperparams["inner_lr"], schedule(STEPS - 1))


def test_anchor_is_a_copy_and_survives_donation(rng):
    a, data, x0 = worker_problem(rng, WORKERS, 8)
    tx = optlab.diloco(optax.adam(0.05), None, 3, AXIS)
    params = {"w": jnp.asarray(x0, jnp.float32)}
    state = tx.init(params)
    assert state.anchor["w"] is not params["w"]
    assert state.anchor["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()

    xs, (params, state) = run_vmap(tx, a, data, x0)
    ys, (d_params, d_state) = run_vmap(tx, a, data, x0, donate=True)
    np.testing.assert_array_equal(ys, xs)
    jax.tree.map(np.testing.assert_array_equal, (d_params, d_state), (params, state))

    step = jax.jit(jax.vmap(make_step(tx, a), axis_name=AXIS), donate_argnums=(0, 1))
    p, s = init_workers(tx, x0, WORKERS)
    step(p, s, jnp.asarray(data[0]))
    assert p["w"].is_deleted()
    assert s.anchor["w"].is_deleted()


def test_orbax_round_trip_mid_period_resumes_bitwise(tmp_path, rng):
    steps, split, period = 11, 5, 3  # 5 % 3 == 2: two inner steps into a round
    a, data, x0 = worker_problem(rng, WORKERS, steps)
    data = data.astype(np.float32)
    tx = optlab.diloco(optax.adamw(0.05, weight_decay=0.1), None, period, AXIS)
    assert_orbax_resume_is_bitwise(
        tx,
        a,
        data,
        x0,
        WORKERS,
        steps=steps,
        split=split,
        state_type=optlab.DiLoCoState,
        path=(tmp_path / "ckpt").absolute(),
    )


def test_outer_params_helper():
    tx = optlab.diloco(optax.sgd(0.1), None, 2, AXIS)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    chained = optax.chain(optax.clip(1.0), tx).init(params)
    for s in (state, chained):
        np.testing.assert_array_equal(optlab.diloco_outer_params(s)["w"], params["w"])
    with pytest.raises(ValueError, match="holds 0 DiLoCo states"):
        optlab.diloco_outer_params(optax.sgd(0.1).init(params))


def test_needs_params():
    tx = optlab.diloco(optax.sgd(0.1), None, 2, AXIS)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sync_period": 0}, r"sync_period must be an integer in \[1, "),
        ({"sync_period": -1}, "sync_period"),
        ({"sync_period": 500.0}, "sync_period must be an integer"),
        ({"sync_period": False}, "sync_period must be an integer"),
        ({"axis_name": None}, "axis_name must be a string"),
        ({"axis_name": ["workers"]}, "axis_name"),
        ({"axis_name": ()}, "axis_name"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"outer": None, "sync_period": 500, "axis_name": AXIS, **kwargs}
    with pytest.raises(ValueError, match=match):
        optlab.diloco(optax.adamw(4e-4, weight_decay=0.1), **args)

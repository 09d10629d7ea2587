"""optlab.extrapolation / extrap_sgd: local extragradient, extrapolation from the past and
noise extrapolation against reference loops, switching off, workers, and the contract."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from sam_family_checks import (
    assert_trees_close,
    assert_trees_equal,
    check_donating_step,
    check_dtype_is_kept,
    check_nnx_optimizer,
    check_no_retrace,
    check_orbax_resume,
    enable_x64,
    flat,
    flat_grad_fn,
    make_step,
    mlp_data,
    mlp_grad,
    mlp_loss,
    mlp_params,
    reference_heavy_ball,
    run,
    trace_counter,
    worker_step,
)

import optlab
from optlab.perturbation import gaussian_like

LR, MOMENTUM, STEPS = 0.1, 0.9, 6
# Halvings are exact in float32, so the schedule has the same values inside and outside jit.
GAMMA = optax.piecewise_constant_schedule(0.3, {2: 0.5, 4: 0.5})


def _gamma(t):
    return float(GAMMA(jnp.int32(t)))


def _reference(params0, xs, ys, direction, *, stop_after=None, seed=0, gamma=_gamma):
    """Plain float64 loop from Lin et al.'s framework with heavy-ball SGD as the optimizer.

    Step t extrapolates with ``gamma(t)``. Returns (true iterate x, point the loop holds)
    after all steps.
    """
    _gamma = gamma
    grad = flat_grad_fn(params0)
    x, m, offset = flat(params0), 0.0, 0.0

    def on(t):
        return _gamma(t) != 0 and (stop_after is None or t < stop_after)

    for t in range(len(xs)):
        if direction == "gradient":
            g = grad(x, xs[t], ys[t])
            h = grad(x - _gamma(t) * g, xs[t], ys[t]) if on(t) else g
        else:
            h = grad(x + offset, xs[t], ys[t])  # the loop differentiates at y = x + offset
        m = MOMENTUM * m + h
        x = x - LR * m
        if direction == "past":
            offset = -_gamma(t + 1) * h if on(t + 1) else 0.0 * h
        elif direction == "noise":
            key = jax.random.fold_in(jax.random.key(seed), t + 1)
            u = flat(gaussian_like(key, params0))
            offset = -_gamma(t + 1) * u if on(t + 1) else 0.0 * u
    return x, x + offset


@pytest.mark.parametrize("direction", ["gradient", "past", "noise"])
@pytest.mark.parametrize("stop_after", [None, 3])
def test_matches_reference_loop(direction, stop_after):
    with enable_x64():
        params = mlp_params(jnp.float64)
        xs, ys = mlp_data(STEPS, dtype=jnp.float64)
        tx = optlab.extrapolation(
            optax.sgd(LR, momentum=MOMENTUM),
            GAMMA,
            direction=direction,
            stop_after=stop_after,
            seed=5,
        )
        held, state, _ = run(tx, params, xs, ys, with_grad_fn=direction == "gradient")
        x, y = _reference(params, xs, ys, direction, stop_after=stop_after, seed=5)
        np.testing.assert_allclose(flat(held), y, rtol=1e-11, atol=1e-13)
        evaluated = optlab.extrapolation_eval_params(held, state)
        np.testing.assert_allclose(flat(evaluated), x, rtol=1e-11, atol=1e-13)
        if stop_after is not None:  # switched off: the loop holds the true iterate
            np.testing.assert_array_equal(flat(held), flat(evaluated))
        plain = reference_heavy_ball(params, xs, ys, LR, MOMENTUM)
        assert np.max(np.abs(plain - x)) > 1e-4


# Reaches 0 at step 3: with the offset of step t+1 built from gamma_t, step 3 would still
# be extrapolated (the lag this checks for).
GAMMA_TO_ZERO = optax.piecewise_constant_schedule(0.4, {2: 0.5, 3: 0.0})


def _gamma_to_zero(t):
    return float(GAMMA_TO_ZERO(jnp.int32(t)))


@pytest.mark.parametrize("direction", ["past", "noise"])
@pytest.mark.parametrize("how", ["plain", "injected", "injected_partial", "static_args"])
def test_gamma_schedule_plain_and_injected_match_the_reference(direction, how):
    """Step t+1's offset uses gamma_{t+1}, however the schedule reaches the transform."""
    base = optax.sgd(LR, momentum=MOMENTUM)
    with enable_x64():
        params = mlp_params(jnp.float64)
        xs, ys = mlp_data(STEPS, dtype=jnp.float64)
        if how == "plain":
            tx = optlab.extrapolation(base, GAMMA_TO_ZERO, direction=direction, seed=5)
        elif how == "injected":
            tx = optax.inject_hyperparams(optlab.extrapolation)(
                base, gamma=GAMMA_TO_ZERO, direction=direction, seed=5
            )
        elif how == "injected_partial":
            factory = functools.partial(optlab.extrapolation, base, direction=direction)
            tx = optax.inject_hyperparams(factory)(gamma=GAMMA_TO_ZERO, seed=5)
        else:
            tx = optax.inject_hyperparams(optlab.extrapolation, static_args=("gamma",))(
                base, gamma=GAMMA_TO_ZERO, direction=direction, seed=5
            )
        held, state, path = run(tx, params, xs, ys, with_grad_fn=False)
        x, y = _reference(params, xs, ys, direction, seed=5, gamma=_gamma_to_zero)
        np.testing.assert_allclose(flat(held), y, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(
            flat(optlab.extrapolation_eval_params(held, state)), x, rtol=1e-11, atol=1e-13
        )
        # gamma is 0 from step 3 on: the loop holds the true iterate (offset exactly 0).
        offset = optax.tree.get(state, "offset")
        assert all(float(np.abs(o).max()) == 0.0 for o in jax.tree.leaves(offset))
        # The step-2 offset is gamma_2 = 0.2 (not gamma_1 = 0.4).
        _, y2 = _reference(params, xs[:2], ys[:2], direction, seed=5, gamma=_gamma_to_zero)
        np.testing.assert_allclose(flat(path[1]), y2, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("direction", ["gradient", "past", "noise"])
def test_gamma_zero_is_the_base_optimizer_exactly(direction):
    # Same gradient arrays into both (computing them inside two different programs may
    # round differently): the updates must be bitwise the base optimizer's.
    params = mlp_params()
    xs, ys = mlp_data(STEPS)
    base = optax.sgd(LR, momentum=MOMENTUM)
    tx = optlab.extrapolation(base, 0.0, direction=direction)
    grad = jax.jit(mlp_grad)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=lambda q: q))
    base_update = jax.jit(base.update)
    state, base_state, held, expected = tx.init(params), base.init(params), params, params
    for t in range(STEPS):
        updates, state = update(grad(held, xs[t], ys[t]), state, held)
        base_updates, base_state = base_update(grad(expected, xs[t], ys[t]), base_state)
        assert_trees_equal(updates, base_updates)
        held = optax.apply_updates(held, updates)
        expected = optax.apply_updates(expected, base_updates)
    assert_trees_equal(optlab.extrapolation_eval_params(held, state), expected)


def test_extrap_sgd_is_the_gradient_direction():
    params = mlp_params()
    xs, ys = mlp_data(3)
    base = optax.sgd(LR, momentum=MOMENTUM)
    a, _, _ = run(optlab.extrap_sgd(base, 0.2, stop_after=2), params, xs, ys)
    b, _, _ = run(
        optlab.extrapolation(base, 0.2, direction="gradient", stop_after=2), params, xs, ys
    )
    assert_trees_equal(a, b)


def _count_grad_fn_calls(tx, steps):
    """Runs ``steps`` jitted updates; returns the steps at which grad_fn ran."""
    params = mlp_params()
    xs, ys = mlp_data(steps)
    calls = []

    def step(params, state, x, y, t):
        def grad_fn(p):
            jax.debug.callback(lambda s: calls.append(int(s)), t)
            return mlp_grad(p, x, y)

        updates, state = tx.update(mlp_grad(params, x, y), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step)
    state = tx.init(params)
    for t in range(steps):
        params, state = step(params, state, xs[t], ys[t], t)
    jax.effects_barrier()
    return calls, step, (params, state, xs[0], ys[0], 0)


def test_no_second_gradient_after_stop_after_or_when_gamma_reaches_zero():
    base = optax.sgd(LR, momentum=MOMENTUM)
    calls, step, args = _count_grad_fn_calls(optlab.extrap_sgd(base, 0.1, stop_after=3), 6)
    assert calls == [0, 1, 2]
    # The switch is a lax.cond in the compiled step, not a select of two computed sides.
    assert "cond" in str(jax.make_jaxpr(step.__wrapped__)(*args))
    schedule = optax.piecewise_constant_schedule(0.1, {4: 0.0})
    calls, _, _ = _count_grad_fn_calls(optlab.extrap_sgd(base, schedule), 6)
    assert calls == [0, 1, 2, 3]


@pytest.mark.parametrize("direction", ["gradient", "past"])
def test_shard_map_equals_vmap_simulation_and_per_worker_reference(direction):
    steps, workers, gamma = 3, 8, 0.3
    params = mlp_params()
    xs, ys = mlp_data(steps)
    tx = optlab.extrapolation(
        optax.sgd(LR, momentum=MOMENTUM), gamma, direction=direction, axis_name="data"
    )
    step = worker_step(tx, with_grad_fn=direction == "gradient")
    mesh = jax.make_mesh((workers,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
        )
    )
    simulated = jax.jit(jax.vmap(step, in_axes=(None, None, 0, 0), axis_name="data"))
    p_shard, s_shard = params, tx.init(params)
    p_sim, s_sim = params, tx.init(params)
    for t in range(steps):
        p_shard, s_shard = sharded(p_shard, s_shard, xs[t], ys[t])
        p_sim, s_sim = simulated(p_sim, s_sim, xs[t].reshape(8, 2, 3), ys[t].reshape(8, 2, 2))
        assert_trees_close(jax.tree.map(lambda v: v[5], p_sim), jax.tree.map(lambda v: v[0], p_sim))
        p_sim, s_sim = jax.tree.map(lambda v: v[0], (p_sim, s_sim))
        assert_trees_close(p_shard, p_sim, rtol=1e-5, atol=1e-7)
    with enable_x64():
        grad = flat_grad_fn(params)
        x, m, offset = flat(params), 0.0, 0.0
        global_x, global_m = flat(params), 0.0
        for t in range(steps):
            parts = [
                (np.asarray(xs[t][2 * i : 2 * i + 2]), np.asarray(ys[t][2 * i : 2 * i + 2]))
                for i in range(workers)
            ]
            if direction == "gradient":
                # Each worker extrapolates with its own gradient; only h is averaged.
                h = sum(grad(x - gamma * grad(x, *b), *b) for b in parts) / workers
                g_all = sum(grad(global_x, *b) for b in parts) / workers
                h_global = sum(grad(global_x - gamma * g_all, *b) for b in parts) / workers
                global_m = MOMENTUM * global_m + h_global
                global_x = global_x - LR * global_m
            else:
                h = sum(grad(x + offset, *b) for b in parts) / workers
            m = MOMENTUM * m + h
            x = x - LR * m
            if direction == "past":
                offset = -gamma * h
    np.testing.assert_allclose(flat(p_shard), x + offset, rtol=1e-4, atol=1e-5)
    if direction == "gradient":
        # Local extragradient is not global extragradient (pmean-ed first gradient).
        assert np.max(np.abs(global_x - x)) > 1e-4


def test_inject_hyperparams_traced_gamma_and_stop_after_without_static_args():
    params = mlp_params()
    xs, ys = mlp_data(5)
    base = optax.sgd(LR, momentum=MOMENTUM)
    tx = optax.inject_hyperparams(optlab.extrap_sgd)(base, gamma=0.2, stop_after=4)
    step, traces = trace_counter(make_step(tx))
    state, got = tx.init(params), params
    for t in range(5):
        if t == 2:
            state.hyperparams["gamma"] = jnp.asarray(0.05, jnp.float32)
        got, state = step(got, state, xs[t], ys[t])
    assert len(traces) == 1
    p, s, _ = run(optlab.extrap_sgd(base, 0.2, stop_after=4), params, xs[:2], ys[:2])
    expected, _, _ = run(optlab.extrap_sgd(base, 0.05, stop_after=4), p, xs, ys, state=s, start=2)
    assert_trees_close(got, expected, rtol=1e-6, atol=1e-7)


def test_contract_gradient_direction():
    tx = optlab.extrap_sgd(optax.adam(1e-2), optax.cosine_decay_schedule(0.1, 5), stop_after=2)
    check_no_retrace(tx)
    opt_state = check_nnx_optimizer(tx)
    assert int(opt_state.count) == 3


def test_multi_steps_around_the_gradient_direction_is_refused_naming_the_fixes():
    # MultiSteps would hand over the last micro-batch's grad_fn only.
    params = mlp_params()
    xs, ys = mlp_data(2)
    for tx in (
        optlab.extrap_sgd(optax.sgd(LR), 0.1),
        optax.chain(optax.clip(1.0), optlab.extrapolation(optax.sgd(LR), 0.1)),
    ):
        with pytest.raises(
            ValueError, match=r"MultiSteps.*microbatched_grad_fn.*extrap_sgd\(optax\.MultiSteps"
        ):
            run(optax.MultiSteps(tx, 2), params, xs, ys)


def test_multi_steps_inside_extrap_sgd_matches_an_independent_accumulation_loop():
    """Each micro-batch extrapolates with its own gradient (like a worker); mean of the k."""
    with enable_x64():
        params = mlp_params(jnp.float64)
        xs, ys = mlp_data(6, dtype=jnp.float64)
        base = optax.MultiSteps(optax.sgd(LR, momentum=MOMENTUM), 2, accumulator_dtype=jnp.float64)
        got, state, _ = run(optlab.extrap_sgd(base, 0.2), params, xs, ys)
        assert int(state.count) == 6
        grad = flat_grad_fn(params)
        x, m = flat(params), 0.0
        for start in (0, 2, 4):
            h = 0.0
            for i in (start, start + 1):
                g = grad(x, xs[i], ys[i])
                h = h + grad(x - 0.2 * g, xs[i], ys[i]) / 2
            m = MOMENTUM * m + h
            x = x - LR * m
        np.testing.assert_allclose(flat(got), x, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("direction", ["past", "noise"])
def test_single_call_directions_inside_multi_steps_match_an_accumulation_loop(direction):
    """All k micro-batches at the same extrapolated point; the offset moves once per k."""
    with enable_x64():
        params = mlp_params(jnp.float64)
        xs, ys = mlp_data(6, dtype=jnp.float64)
        tx = optlab.extrapolation(
            optax.sgd(LR, momentum=MOMENTUM), GAMMA, direction=direction, seed=2
        )
        multi = optax.MultiSteps(tx, 2, accumulator_dtype=jnp.float64)
        held, state, _ = run(multi, params, xs, ys, with_grad_fn=False)
        grad = flat_grad_fn(params)
        x, m, offset = flat(params), 0.0, 0.0
        for step, start in enumerate((0, 2, 4)):
            h = sum(grad(x + offset, xs[i], ys[i]) for i in (start, start + 1)) / 2
            m = MOMENTUM * m + h
            x = x - LR * m
            if direction == "past":
                u = h
            else:
                key = jax.random.fold_in(jax.random.key(2), step + 1)
                u = flat(gaussian_like(key, params))
            offset = -_gamma(step + 1) * u
        np.testing.assert_allclose(flat(held), x + offset, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(
            flat(optlab.extrapolation_eval_params(held, state)), x, rtol=1e-11, atol=1e-13
        )


@pytest.mark.parametrize("seed", [jax.random.key(9), jax.random.PRNGKey(9)], ids=["typed", "raw"])
def test_noise_seed_takes_typed_and_raw_keys(seed):
    with enable_x64():
        params = mlp_params(jnp.float64)
        xs, ys = mlp_data(3, dtype=jnp.float64)
        tx = optlab.extrapolation(
            optax.sgd(LR, momentum=MOMENTUM), GAMMA, direction="noise", seed=seed
        )
        held, _, _ = run(tx, params, xs, ys, with_grad_fn=False)
        _, y = _reference(params, xs, ys, "noise", seed=9)
        np.testing.assert_allclose(flat(held), y, rtol=1e-11, atol=1e-13)
    with pytest.raises(ValueError, match="seed"):
        optlab.extrapolation(optax.sgd(LR), 0.1, direction="noise", seed=2.5)


@pytest.mark.parametrize(
    ("make", "with_grad_fn"),
    [
        (lambda: optlab.extrap_sgd(optax.sgd(LR, momentum=MOMENTUM), 0.1, stop_after=2), True),
        (lambda: optlab.extrapolation(optax.adam(1e-2), 0.1, direction="past"), False),
        (
            lambda: optlab.extrapolation(
                optax.sgd(LR), 0.1, direction="noise", seed=jax.random.PRNGKey(0)
            ),
            False,
        ),
        (
            lambda: optax.chain(
                optax.clip(1.0), optlab.extrapolation(optax.sgd(LR), 0.1, direction="past")
            ),
            False,
        ),
        (
            lambda: optax.inject_hyperparams(optlab.extrapolation)(
                optax.sgd(LR), GAMMA, direction="noise", stop_after=4
            ),
            False,
        ),
        (lambda: optax.inject_hyperparams(optlab.extrap_sgd)(optax.sgd(LR), 0.1), True),
        (lambda: optlab.extrap_sgd(optax.MultiSteps(optax.sgd(LR), 2), 0.1), True),
    ],
    ids=["gradient", "past", "noise_raw_key", "chain", "inject_noise", "inject_gradient", "ms"],
)
def test_jitted_step_donating_params_and_state(make, with_grad_fn):
    check_donating_step(make(), steps=4, with_grad_fn=with_grad_fn)


def test_contract_single_call_directions():
    tx = optlab.extrapolation(optax.sgd(LR, momentum=MOMENTUM), 0.1, direction="past")
    check_no_retrace(tx)
    opt_state = check_nnx_optimizer(tx, with_grad_fn=False)
    assert int(opt_state.count) == 3
    # After a clip in a chain: the clipped gradient is what gets extrapolated with.
    params = mlp_params()
    xs, ys = mlp_data(4)
    chained = optax.chain(optax.clip_by_global_norm(1e-3), tx)
    got, state, _ = run(chained, params, xs, ys, with_grad_fn=False)
    with enable_x64():
        grad = flat_grad_fn(params)
        x, m, offset = flat(params), 0.0, 0.0
        for t in range(4):
            g = grad(x + offset, np.asarray(xs[t]), np.asarray(ys[t]))
            h = g * min(1.0, 1e-3 / np.linalg.norm(g))
            m = MOMENTUM * m + h
            x = x - LR * m
            offset = -0.1 * h
    np.testing.assert_allclose(flat(got), x + offset, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        flat(optlab.extrapolation_eval_params(got, state)), x, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("direction", ["gradient", "past", "noise"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_is_kept(direction, dtype):
    tx = optlab.extrapolation(optax.sgd(LR, momentum=MOMENTUM), 0.1, direction=direction)
    state = check_dtype_is_kept(tx, dtype)
    assert all(o.dtype == dtype for o in jax.tree.leaves(state.offset))


@pytest.mark.parametrize("direction", ["gradient", "noise"])
def test_orbax_round_trip_resumes_identically(tmp_path, direction):
    tx = optlab.extrapolation(
        optax.adam(1e-2), optax.linear_schedule(0.1, 0.0, 6), direction=direction, seed=3
    )
    if direction == "gradient":
        restored = check_orbax_resume(tx, tmp_path / "ckpt")
    else:
        restored = _check_orbax_resume_single_call(tx, tmp_path / "ckpt")
    assert isinstance(restored, optlab.ExtrapolationState)


def _check_orbax_resume_single_call(tx, directory):
    from sam_family_checks import orbax_round_trip

    params = mlp_params()
    xs, ys = mlp_data(6)
    full, _, _ = run(tx, params, xs, ys, with_grad_fn=False)
    p, s, _ = run(tx, params, xs[:3], ys[:3], with_grad_fn=False)
    p, s = orbax_round_trip(directory, p, s, tx)
    assert s.key.dtype == jnp.uint32
    resumed, _, _ = run(tx, p, xs, ys, state=s, start=3, with_grad_fn=False)
    assert_trees_equal(resumed, full)
    return s


def test_eval_params_finds_the_state_inside_wrappers():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.full(3, 2.0)}
    tx = optlab.extrapolation(optax.sgd(0.1), 0.5, direction="past")
    injected = optax.inject_hyperparams(optlab.extrapolation)(optax.sgd(0.1), 0.5, direction="past")
    # (transform, the gradient it extrapolates with): optax.clip(1.0) clips 2 to 1.
    for wrapped, g in ((tx, 2.0), (optax.chain(optax.clip(1.0), tx), 1.0), (injected, 2.0)):
        state = wrapped.init(params)
        updates, state = wrapped.update(grads, state, params)
        held = optax.apply_updates(params, updates)
        x = optlab.extrapolation_eval_params(held, state)["w"]
        np.testing.assert_allclose(x, 1.0 - 0.1 * g, rtol=1e-6)
        np.testing.assert_allclose(held["w"], 1.0 - 0.1 * g - 0.5 * g, rtol=1e-6)
    with pytest.raises(ValueError, match="exactly one ExtrapolationState"):
        optlab.extrapolation_eval_params(params, optax.sgd(0.1).init(params))


def test_needs_grad_fn_only_for_the_gradient_direction():
    params = {"w": jnp.ones(2)}
    tx = optlab.extrap_sgd(optax.sgd(0.1), 0.1)
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(params, tx.init(params), params)
    for direction in ("past", "noise"):
        tx = optlab.extrapolation(optax.sgd(0.1), 0.1, direction=direction)
        tx.update(params, tx.init(params), params)  # no grad_fn needed
        with pytest.raises(ValueError, match="params"):
            tx.update(params, tx.init(params))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"gamma": 0.1, "direction": "sideways"}, "direction"),
        ({"gamma": 0.1, "stop_after": -1}, "stop_after"),
        ({"gamma": 0.1, "stop_after": 2.5}, "stop_after"),
    ],
)
def test_invalid_arguments_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        optlab.extrapolation(optax.sgd(0.1), **kwargs)
    if "direction" not in kwargs:
        with pytest.raises(ValueError, match=name):
            optlab.extrap_sgd(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize("direction", ["gradient", "past"])
def test_converges_on_a_small_regression_problem(direction):
    params = mlp_params()
    xs, ys = mlp_data(1, seed=3)
    x, y = xs[0], ys[0]
    tx = optlab.extrapolation(optax.sgd(0.1, momentum=0.9), 0.1, direction=direction)
    state, p = tx.init(params), params
    step = make_step(tx, with_grad_fn=direction == "gradient")
    for _ in range(300):
        p, state = step(p, state, x, y)
    p = optlab.extrapolation_eval_params(p, state)
    initial, final = float(mlp_loss(params, x, y)), float(mlp_loss(p, x, y))
    assert final < 0.1 * initial, (initial, final)
    assert float(optax.tree.norm(mlp_grad(p, x, y))) < 0.05

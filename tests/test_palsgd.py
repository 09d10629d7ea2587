"""optlab.palsgd against a float64 NumPy loop over workers written from ALGORITHMS.md 9.4
(same coins), its reductions, the coin rate, vmap vs shard_map, the compiled off-sync step,
gradient skipping, composition, checkpointing and validation."""

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
STEPS = 17


def draw_coins(seed, workers, steps, prob, warmup_steps, shared):
    """coins[t, i]: whether step t of worker i is a pseudo-sync step (drawn at the end of
    step t - 1 from fold_in(fold_in(key, i), t); never before step W + 1)."""
    key = jax.random.key_data(jax.random.key(seed))
    out = np.zeros((steps, workers), bool)
    for i in range(workers):
        k = key if shared else jax.random.fold_in(key, i)
        for t in range(warmup_steps + 1, steps):
            out[t, i] = bool(jax.random.uniform(jax.random.fold_in(k, t)) < prob)
    return out


def direction(inner, g, s):
    """The inner optimizer's direction without learning rate (a NumPy optimizer, lr 1)."""
    x, s = inner.step(np.zeros_like(g), g, s)
    return -x, s


def reference_palsgd(
    a, data, x0, inner, outer, sync_period, *, lr, prob, eta, warmup, coins, max_norm=None
):
    """PALSGD from the equations (ALGORITHMS.md 9.4); returns the params after every step."""
    workers = data.shape[1]
    xs = [x0.copy() for _ in range(workers)]
    states = [inner.init(x0) for _ in range(workers)]
    anchor, outer_state = x0.copy(), outer.init(x0)

    def grad(t, i):
        g = a @ xs[i] - data[t, i]
        return g if max_norm is None else clip(g, max_norm)

    out = []
    for t in range(len(data)):
        lr_t = lr(t) if callable(lr) else lr
        if t < warmup:  # data parallel: the mean gradient, the plain rate
            g = np.mean([grad(t, i) for i in range(workers)], axis=0)
            for i in range(workers):
                d, states[i] = direction(inner, g, states[i])
                xs[i] = xs[i] - lr_t * d
            if t == warmup - 1:
                anchor = np.mean(xs, axis=0)
                xs = [anchor.copy() for _ in range(workers)]
        else:
            for i in range(workers):
                if coins[t, i]:
                    xs[i] = xs[i] - (lr_t / prob) * eta * (xs[i] - anchor)
                else:
                    d, states[i] = direction(inner, grad(t, i), states[i])
                    xs[i] = xs[i] - lr_t / (1 - prob) * d
            if (t - warmup + 1) % sync_period == 0:
                delta = anchor - np.mean(xs, axis=0)
                anchor, outer_state = outer.step(anchor, delta, outer_state)
                xs = [anchor.copy() for _ in range(workers)]
        out.append(np.array(xs))
    return np.array(out)


def _close(actual, expected, rtol=1e-10):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-12)


PAPER_OUTER = NumpySGD(0.1, 0.9, nesterov=True)


@pytest.mark.parametrize(
    ("workers", "sync_period", "warmup", "shared"),
    [(4, 3, 0, False), (4, 4, 3, False), (4, 1, 0, True), (4, 5, 2, True), (1, 3, 2, False)],
)
def test_matches_reference_loop_momentum_inner(workers, sync_period, warmup, shared, rng, x64):
    a, data, x0 = worker_problem(rng, workers, STEPS)
    prob, eta, lr = 0.3, 0.5, 0.05
    tx = optlab.palsgd(
        optax.trace(0.9),
        None,
        sync_period,
        AXIS,
        learning_rate=lr,
        prob=prob,
        eta=eta,
        warmup_steps=warmup,
        shared_coin=shared,
        seed=3,
    )
    xs, (_, state) = run_vmap(tx, a, data, x0)
    coins = draw_coins(3, workers, STEPS, prob, warmup, shared)
    assert coins.any()  # both kinds of step happen
    assert not coins[warmup + 1 :].all()
    if workers > 1 and not shared:
        assert (coins != coins[:, :1]).any()  # the workers' coins differ
    ref = reference_palsgd(
        a,
        data,
        x0,
        NumpySGD(1.0, 0.9),
        PAPER_OUTER,
        sync_period,
        lr=lr,
        prob=prob,
        eta=eta,
        warmup=warmup,
        coins=coins,
    )
    _close(xs, ref)
    # The next coin is in the state, readable before the gradient.
    next_coins = draw_coins(3, workers, STEPS + 1, prob, warmup, shared)[-1]
    np.testing.assert_array_equal(optlab.palsgd_is_pseudo_sync(state), next_coins)


def test_matches_reference_loop_adam_inner_adam_outer_schedule(rng, x64):
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    schedule = optax.piecewise_constant_schedule(0.0625, {5: 0.5, 10: 0.5})  # exact in f32
    prob, eta = 0.2, 1.0
    tx = optlab.palsgd(
        optax.scale_by_adam(),
        optax.adam(0.3),
        4,
        AXIS,
        learning_rate=schedule,
        prob=prob,
        eta=eta,
        warmup_steps=2,
    )
    xs, _ = run_vmap(tx, a, data, x0)
    coins = draw_coins(0, WORKERS, STEPS, prob, 2, False)
    assert coins.any()
    ref = reference_palsgd(
        a,
        data,
        x0,
        NumpyAdam(1.0),
        NumpyAdam(0.3),
        4,
        lr=lambda t: float(schedule(t)),
        prob=prob,
        eta=eta,
        warmup=2,
        coins=coins,
    )
    _close(xs, ref)


def test_pull_steps_ignore_the_gradient(rng, x64):
    """A loop that skips the forward/backward on pseudo-sync steps (zeros instead) gets the
    same trajectory: bitwise that of the same program whose predicate never skips (so the
    gradient is computed and ignored), and that of the plain transform to the last ulp (a
    differently compiled program may round differently)."""
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    tx = optlab.palsgd(optax.scale_by_adam(), None, 4, AXIS, learning_rate=0.05, prob=0.4)
    xs, _ = run_vmap(tx, a, data, x0)

    def loop(skip_of):
        def skipping(params, state, d):
            grads = jax.lax.cond(
                skip_of(state),
                lambda: jax.tree.map(jnp.zeros_like, params),
                lambda: {"w": a @ params["w"] - d},
            )
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        step = jax.jit(jax.vmap(skipping, axis_name=AXIS))
        params, state = init_workers(tx, x0, WORKERS)
        for t in range(STEPS):
            params, state = step(params, state, jnp.asarray(data[t]))
        return params["w"]

    skipped = loop(optlab.palsgd_is_pseudo_sync)
    never = loop(lambda state: state.count < 0)  # traced, always false
    np.testing.assert_array_equal(skipped, never)
    np.testing.assert_allclose(skipped, xs[-1], rtol=1e-14, atol=0)


@pytest.mark.parametrize("shared", [False, True])
def test_coin_rate(shared):
    """The pseudo-sync rate is prob (4-sigma binomial bound); shared coins agree."""
    workers, steps, prob = 4, 1500, 0.2
    tx = optlab.palsgd(
        optax.identity(),
        optax.sgd(1.0),
        7,
        AXIS,
        learning_rate=0.01,
        prob=prob,
        shared_coin=shared,
        seed=jax.random.key(11),
    )

    def body(carry, _):
        params, state = carry
        updates, state = tx.update(jnp.zeros_like(params), state, params)
        return (params + updates, state), optlab.palsgd_is_pseudo_sync(state)

    def run(params):
        state = tx.init(params)
        return jax.lax.scan(body, (params, state), length=steps)[1]

    coins = np.asarray(jax.jit(jax.vmap(run, axis_name=AXIS))(jnp.zeros((workers, 2))))
    n = coins.size
    assert abs(coins.mean() - prob) < 4 * np.sqrt(prob * (1 - prob) / n)
    if shared:
        np.testing.assert_array_equal(coins, np.broadcast_to(coins[:1], coins.shape))
    else:
        assert (coins != coins[:1]).any()


def test_tiny_prob_is_diloco_with_the_rescaled_rate(rng, x64):
    """prob -> 0: no pulls; every step is the inner step at lr/(1 - p): DiLoCo."""
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    prob, lr = 1e-12, 0.05
    tx = optlab.palsgd(optax.trace(0.9), None, 3, AXIS, learning_rate=lr, prob=prob)
    xs, _ = run_vmap(tx, a, data, x0)
    paper = optax.sgd(0.1, momentum=0.9, nesterov=True)
    ys, _ = run_vmap(
        optlab.diloco(optax.sgd(lr / (1 - prob), momentum=0.9), paper, 3, AXIS), a, data, x0
    )
    _close(xs, ys)


def test_prob_near_one_pulls_onto_the_anchor(rng, x64):
    """prob -> 1 with lr * eta / p = 1: after the first (gradient, rate lr / (1 - p)) step,
    every step is a pull that lands on the anchor; one worker."""
    a, data, x0 = worker_problem(rng, 1, 6)
    prob = 1 - 1e-6
    assert draw_coins(0, 1, 6, prob, 0, False)[1:].all()
    tx = optlab.palsgd(
        optax.identity(), optax.sgd(1.0), 100, AXIS, learning_rate=prob, prob=prob, eta=1.0
    )
    xs, (_, state) = run_vmap(tx, a, data, x0)
    np.testing.assert_allclose(xs[0, 0], x0 - prob / (1 - prob) * (a @ x0 - data[0, 0]))
    for t in range(1, 6):
        np.testing.assert_allclose(xs[t, 0], x0, atol=1e-8)
    assert bool(optlab.palsgd_is_pseudo_sync(state)[0])


def test_seed_forms_give_the_same_stream(rng):
    a, data, x0 = worker_problem(rng, WORKERS, 9)
    runs = [
        run_vmap(
            optlab.palsgd(optax.sgd(1.0), None, 3, AXIS, learning_rate=0.05, seed=s),
            a,
            data,
            x0,
        )[0]
        for s in (5, jax.random.key(5), jax.random.PRNGKey(5), jnp.int32(5))
    ]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])
    other = run_vmap(
        optlab.palsgd(optax.sgd(1.0), None, 3, AXIS, learning_rate=0.05, seed=6), a, data, x0
    )[0]
    assert not np.array_equal(other, runs[0])


@pytest.mark.parametrize("shared", [False, True])
def test_vmap_equals_shard_map(shared, rng):
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    tx = optlab.palsgd(
        optax.scale_by_adam(),
        None,
        3,
        AXIS,
        learning_rate=0.05,
        prob=0.3,
        warmup_steps=2,
        shared_coin=shared,
    )
    xs, (_, v_state) = run_vmap(tx, a, data, x0)
    ys, (_, s_state) = run_shard_map(tx, a, data, x0)
    np.testing.assert_allclose(ys, xs, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6), s_state, v_state
    )
    assert isinstance(s_state, optlab.PALSGDState)
    for leaf in jax.tree.leaves((s_state.anchor, s_state.outer_state, s_state.key)):
        np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[0], leaf.shape))


def test_off_sync_step_compiles_without_collectives(rng):
    a, _, _ = worker_problem(rng, WORKERS, 1)
    tx = optlab.palsgd(
        optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.1)),
        None,
        4,
        AXIS,
        learning_rate=1e-3,
    )
    assert_collectives_only_in_sync_branch(tx, a, WORKERS)


def test_warmup_collectives_sit_in_conditionals_with_a_silent_branch(rng):
    a, _, _ = worker_problem(rng, WORKERS, 1)
    tx = optlab.palsgd(optax.scale_by_adam(), None, 4, AXIS, learning_rate=1e-3, warmup_steps=8)
    # The warm-up mean (in the gradient branch of the coin's conditional, whose pull
    # branch is silent) and the real sync.
    assert_collectives_only_in_sync_branch(tx, a, WORKERS, conditionals=2)


def test_inside_chain_after_clipping(rng, x64):
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    tx = optax.chain(
        optax.clip_by_global_norm(0.5),
        optlab.palsgd(optax.trace(0.9), None, 3, AXIS, learning_rate=0.05, warmup_steps=2),
    )
    xs, _ = run_vmap(tx, a, data, x0)
    coins = draw_coins(0, WORKERS, STEPS, 0.2, 2, False)
    ref = reference_palsgd(
        a,
        data,
        x0,
        NumpySGD(1.0, 0.9),
        PAPER_OUTER,
        3,
        lr=0.05,
        prob=0.2,
        eta=0.5,
        warmup=2,
        coins=coins,
        max_norm=0.5,
    )
    _close(xs, ref)
    assert np.linalg.norm(a @ x0 - data[0, 0]) > 0.5  # the clipping bites


def test_inject_hyperparams_traced_float_knobs(rng, x64):
    """inject_hyperparams over palsgd: the rate (a schedule), prob, eta and the outer rate
    are traced; the period and warm-up go through without static_args."""
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    schedule = optax.piecewise_constant_schedule(0.0625, {6: 0.5})

    def factory(learning_rate, prob, eta, outer_lr, sync_period, warmup_steps):
        return optlab.palsgd(
            optax.trace(0.9),
            optax.sgd(outer_lr, momentum=0.9, nesterov=True),
            sync_period,
            AXIS,
            learning_rate=learning_rate,
            prob=prob,
            eta=eta,
            warmup_steps=warmup_steps,
        )

    tx = optax.inject_hyperparams(factory)(
        learning_rate=schedule,
        prob=0.25,
        eta=0.5,
        outer_lr=0.75,
        sync_period=3,
        warmup_steps=1,
    )
    xs, (_, state) = run_vmap(tx, a, data, x0)
    coins = draw_coins(0, WORKERS, STEPS, 0.25, 1, False)
    ref = reference_palsgd(
        a,
        data,
        x0,
        NumpySGD(1.0, 0.9),
        NumpySGD(0.75, 0.9, nesterov=True),
        3,
        lr=lambda t: float(schedule(t)),
        prob=0.25,
        eta=0.5,
        warmup=1,
        coins=coins,
    )
    _close(xs, ref, rtol=1e-6)  # lr / (1 - p) is computed in float32
    np.testing.assert_allclose(state.hyperparams["learning_rate"], schedule(STEPS - 1))


def test_anchor_is_a_copy_and_survives_donation(rng):
    a, data, x0 = worker_problem(rng, WORKERS, 8)
    tx = optlab.palsgd(optax.scale_by_adam(), None, 3, AXIS, learning_rate=0.05)
    params = {"w": jnp.asarray(x0, jnp.float32)}
    state = tx.init(params)
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
    steps, split, period = 13, 5, 3
    a, data, x0 = worker_problem(rng, WORKERS, steps)
    data = data.astype(np.float32)
    tx = optlab.palsgd(
        optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.1)),
        None,
        period,
        AXIS,
        learning_rate=0.05,
        prob=0.4,
        warmup_steps=1,
    )
    assert_orbax_resume_is_bitwise(
        tx,
        a,
        data,
        x0,
        WORKERS,
        steps=steps,
        split=split,
        state_type=optlab.PALSGDState,
        path=(tmp_path / "ckpt").absolute(),
    )


def test_helpers():
    tx = optlab.palsgd(optax.sgd(1.0), None, 2, AXIS, learning_rate=0.1)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    chained = optax.chain(optax.clip(1.0), tx).init(params)
    for s in (state, chained):
        np.testing.assert_array_equal(optlab.palsgd_outer_params(s)["w"], params["w"])
        assert not bool(optlab.palsgd_is_pseudo_sync(s))  # the first step is a gradient step
    for helper in (optlab.palsgd_outer_params, optlab.palsgd_is_pseudo_sync):
        with pytest.raises(ValueError, match="holds 0 PALSGD states"):
            helper(optax.sgd(0.1).init(params))


def test_needs_params():
    tx = optlab.palsgd(optax.sgd(1.0), None, 2, AXIS, learning_rate=0.1)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sync_period": 0}, r"sync_period must be an integer in \[1, "),
        ({"sync_period": 4.0}, "sync_period must be an integer"),
        ({"sync_period": True}, "sync_period must be an integer"),
        ({"axis_name": None}, "axis_name must be a string"),
        ({"axis_name": ()}, "axis_name"),
        ({"prob": 0.0}, r"prob must lie in \(0, 1\)"),
        ({"prob": 1.0}, r"prob must lie in \(0, 1\)"),
        ({"prob": -0.1}, "prob"),
        ({"prob": float("nan")}, "prob"),
        ({"prob": lambda t: 0.2}, "prob must be a real number"),
        ({"eta": -1.0}, "eta must lie in"),
        ({"eta": float("inf")}, "eta"),
        ({"learning_rate": -0.1}, "learning_rate must lie in"),
        ({"learning_rate": "fast"}, "learning_rate must be a real number"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer"),
        ({"warmup_steps": 2.5}, "warmup_steps must be an integer"),
        ({"shared_coin": 1}, "shared_coin must be a bool"),
        ({"seed": 1.5}, "seed must be an integer seed"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"outer": None, "sync_period": 32, "axis_name": AXIS, "learning_rate": 0.01, **kwargs}
    with pytest.raises(ValueError, match=match):
        optlab.palsgd(optax.scale_by_adam(), **args)

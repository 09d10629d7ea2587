"""optlab.lookahead / multilayer_lookahead / slow_params against independent references."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import optlab
from experiments.train.checkpoint import Checkpointer
from experiments.train.step import make_mesh

DIM = 6
LR = 0.05


def _problem(rng: np.random.Generator, steps: int):
    """A noisy quadratic: grad_t(x) = A x - b + noise_t (noise fixed per step)."""
    m = rng.normal(size=(DIM, DIM))
    a = m @ m.T / DIM + np.eye(DIM)
    b = rng.normal(size=DIM)
    noise = 0.3 * rng.normal(size=(steps, DIM))
    x0 = rng.normal(size=DIM)
    return a, b, noise, x0


# ----------------------------------------------------------------------------------------
# The reference: a plain loop written from the papers' equations (NumPy, float64).


class _NumpyMomentum:
    """optax.sgd(lr, momentum=beta): m <- g + beta m; x <- x - lr m."""

    def __init__(self, lr: float, beta: float):
        self.lr, self.beta = lr, beta

    def init(self, x):
        return {"m": np.zeros_like(x)}

    def step(self, x, g, s):
        s = {"m": g + self.beta * s["m"]}
        return x - self.lr * s["m"], s


class _NumpyAdam:
    """optax.adam(lr): bias-corrected moments, eps outside the square root."""

    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps

    def init(self, x):
        return {"m": np.zeros_like(x), "v": np.zeros_like(x), "t": 0}

    def step(self, x, g, s):
        t = s["t"] + 1
        m = self.b1 * s["m"] + (1 - self.b1) * g
        v = self.b2 * s["v"] + (1 - self.b2) * g * g
        m_hat, v_hat = m / (1 - self.b1**t), v / (1 - self.b2**t)
        return x - self.lr * m_hat / (np.sqrt(v_hat) + self.eps), {"m": m, "v": v, "t": t}


def reference_lookahead(x0, grad, inner, levels, momentum, steps):
    """Multilayer Lookahead from the recursive definition (ALGORITHMS.md 1.2-1.3).

    An ``alpha`` may be a function of the step count ``t`` (updates before this one).
    """
    x = x0.copy()
    slow = [x0.copy() for _ in levels]
    state = inner.init(x0)
    cached = np.zeros_like(x0)
    cycles = np.cumprod([k for k, _ in levels])
    xs, slows = [], []
    for t in range(steps):
        x, state = inner.step(x, grad(t, x), state)
        c = t + 1
        for level, (_, alpha) in enumerate(levels):
            if c % cycles[level]:
                break
            alpha = alpha(t) if callable(alpha) else alpha  # t updates came before this one
            below = x if level == 0 else slow[level - 1]
            slow[level] = slow[level] + alpha * (below - slow[level])
            for j in range(level):
                slow[j] = slow[level].copy()
            x = slow[level].copy()
        if c % cycles[0] == 0 and momentum != "keep":
            if momentum == "reset":
                state["m"] = np.zeros_like(x)
            else:  # pullback
                alpha = levels[0][1](t) if callable(levels[0][1]) else levels[0][1]
                state["m"] = alpha * state["m"] + (1 - alpha) * cached
                cached = state["m"].copy()
        xs.append(x.copy())
        slows.append(slow[-1].copy())
    return np.array(xs), np.array(slows)


def run_optlab(tx, x0, grad, steps, *, jit=True):
    params = {"w": jnp.asarray(x0)}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    xs, slows = [], []
    for t in range(steps):
        g = {"w": jnp.asarray(grad(t, np.asarray(params["w"])))}
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        xs.append(np.asarray(params["w"]))
        slows.append(np.asarray(optlab.slow_params(state)["w"]))
    return np.array(xs), np.array(slows), state


LEVELS = [
    ((1, 0.5),),
    ((5, 0.5),),
    ((3, 0.8),),
    ((2, 0.5), (3, 0.8)),
    ((3, 0.6), (2, 0.3)),
    ((2, 0.3), (2, 0.7), (3, 0.5)),
]


@pytest.mark.parametrize("levels", LEVELS, ids=str)
@pytest.mark.parametrize("momentum", ["keep", "reset", "pullback"])
def test_matches_reference_loop(levels, momentum, rng, x64):
    steps = 40
    a, b, noise, x0 = _problem(rng, steps)

    def grad(t, x):
        return a @ x - b + noise[t]

    ref_x, ref_slow = reference_lookahead(
        x0, grad, _NumpyMomentum(LR, 0.9), levels, momentum, steps
    )
    tx = optlab.multilayer_lookahead(optax.sgd(LR, momentum=0.9), levels, momentum=momentum)
    xs, slows, _ = run_optlab(tx, x0, grad, steps)
    np.testing.assert_allclose(xs, ref_x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(slows, ref_slow, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum", ["keep", "reset", "pullback"])
def test_adam_inner_matches_reference_loop(momentum, rng, x64):
    steps, levels = 30, ((3, 0.5), (2, 0.8))
    a, b, noise, x0 = _problem(rng, steps)

    def grad(t, x):
        return a @ x - b + noise[t]

    ref_x, ref_slow = reference_lookahead(x0, grad, _NumpyAdam(0.01), levels, momentum, steps)
    tx = optlab.multilayer_lookahead(optax.adam(0.01), levels, momentum=momentum)
    xs, slows, _ = run_optlab(tx, x0, grad, steps)
    np.testing.assert_allclose(xs, ref_x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(slows, ref_slow, rtol=1e-10, atol=1e-12)


def test_lookahead_is_one_level(rng, x64):
    steps = 25
    a, b, noise, x0 = _problem(rng, steps)

    def grad(t, x):
        return a @ x - b + noise[t]

    one = run_optlab(optlab.lookahead(optax.sgd(LR, 0.9), 4, 0.7), x0, grad, steps)
    ml = run_optlab(optlab.multilayer_lookahead(optax.sgd(LR, 0.9), ((4, 0.7),)), x0, grad, steps)
    np.testing.assert_array_equal(one[0], ml[0])
    np.testing.assert_array_equal(one[1], ml[1])


@pytest.mark.parametrize("reset", [False, True])
def test_equals_optax_lookahead(reset, rng, x64):
    """Our params equal optax's fast weights and our slow weights its slow weights."""
    steps, k, alpha = 23, 4, 0.6
    a, b, noise, x0 = _problem(rng, steps)
    inner = optax.sgd(LR, momentum=0.9)
    theirs = optax.lookahead(inner, sync_period=k, slow_step_size=alpha, reset_state=reset)
    params = optax.LookaheadParams.init_synced({"w": jnp.asarray(x0)})
    state = theirs.init(params)
    fast, slow = [], []
    for t in range(steps):
        g = {"w": jnp.asarray(a @ np.asarray(params.fast["w"]) - b + noise[t])}
        updates, state = theirs.update(g, state, params)
        params = optax.apply_updates(params, updates)
        fast.append(np.asarray(params.fast["w"]))
        slow.append(np.asarray(params.slow["w"]))
    ours = optlab.lookahead(inner, k, alpha, momentum="reset" if reset else "keep")
    xs, slows, _ = run_optlab(ours, x0, lambda t, x: a @ x - b + noise[t], steps)
    np.testing.assert_allclose(xs, np.array(fast), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(slows, np.array(slow), rtol=1e-12, atol=1e-12)


def test_nesting_lookahead_by_hand_equals_multilayer(rng, x64):
    steps = 40
    a, b, noise, x0 = _problem(rng, steps)

    def grad(t, x):
        return a @ x - b + noise[t]

    inner = optax.sgd(LR, momentum=0.9)
    nested = optlab.lookahead(optlab.lookahead(inner, 2, 0.5), 2 * 3, 0.8)
    ml = optlab.multilayer_lookahead(inner, ((2, 0.5), (3, 0.8)))
    xs_n, slow_n, _ = run_optlab(nested, x0, grad, steps)
    xs_m, slow_m, _ = run_optlab(ml, x0, grad, steps)
    np.testing.assert_allclose(xs_n, xs_m, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(slow_n, slow_m, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Edge cases.


def test_alpha_one_is_the_inner_optimizer(rng, x64):
    steps = 17
    a, b, noise, x0 = _problem(rng, steps)

    def grad(t, x):
        return a @ x - b + noise[t]

    xs, _, _ = run_optlab(optlab.lookahead(optax.sgd(LR, 0.9), 3, 1.0), x0, grad, steps)
    plain, _, _ = run_optlab(
        optlab.lookahead(optax.sgd(LR, 0.9), 10**6, 0.5), x0, grad, steps
    )  # never syncs within 17 steps
    np.testing.assert_allclose(xs, plain, rtol=1e-12, atol=1e-12)


def test_k_one_is_sgd_with_scaled_step(rng, x64):
    steps = 12
    a, b, noise, x0 = _problem(rng, steps)

    def grad(t, x):
        return a @ x - b + noise[t]

    xs, _, _ = run_optlab(optlab.lookahead(optax.sgd(LR), 1, 0.3), x0, grad, steps)
    x = x0.copy()
    for t in range(steps):
        x = x - 0.3 * LR * grad(t, x)
        np.testing.assert_allclose(xs[t], x, rtol=1e-12, atol=1e-12)


def test_alpha_zero_returns_to_the_start_at_every_sync(rng, x64):
    steps = 12
    a, b, noise, x0 = _problem(rng, steps)
    xs, slows, _ = run_optlab(
        optlab.lookahead(optax.sgd(LR), 4, 0.0), x0, lambda t, x: a @ x - b + noise[t], steps
    )
    for t in (3, 7, 11):
        np.testing.assert_allclose(xs[t], x0, atol=1e-15)
    assert not np.allclose(xs[1], x0)
    np.testing.assert_allclose(slows, np.broadcast_to(x0, slows.shape), atol=1e-15)


def test_zero_gradient_is_a_fixed_point():
    tx = optlab.multilayer_lookahead(optax.sgd(0.1, momentum=0.9), ((2, 0.5), (2, 0.5)))
    params = {"w": jnp.arange(3.0)}
    state = tx.init(params)
    for _ in range(9):
        u, state = tx.update({"w": jnp.zeros(3)}, state, params)
        params = optax.apply_updates(params, u)
    np.testing.assert_array_equal(params["w"], np.arange(3.0))


def test_needs_params():
    tx = optlab.lookahead(optax.sgd(0.1))
    state = tx.init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": jnp.zeros(2)}, state)


# ----------------------------------------------------------------------------------------
# Composition.


def test_chain_with_clipping_before(rng, x64):
    steps = 20
    a, b, noise, x0 = _problem(rng, steps)
    noise *= 10

    def grad(t, x):
        return a @ x - b + noise[t]

    def clipped(t, x):
        g = grad(t, x)
        return g * min(1.0, 1.0 / np.linalg.norm(g))

    chained = optax.chain(
        optax.clip_by_global_norm(1.0), optlab.lookahead(optax.sgd(LR, 0.9), 3, 0.5)
    )
    xs, _, _ = run_optlab(chained, x0, grad, steps)
    ref, _ = reference_lookahead(x0, clipped, _NumpyMomentum(LR, 0.9), ((3, 0.5),), "keep", steps)
    np.testing.assert_allclose(xs, ref, rtol=1e-12, atol=1e-12)


def test_inside_multisteps(rng, x64):
    """MultiSteps(every 2) == lookahead fed with the mean of each pair of gradients."""
    steps = 24
    a, b, noise, x0 = _problem(rng, steps)
    tx = optax.MultiSteps(
        optlab.lookahead(optax.sgd(LR, 0.9), 3, 0.5),
        every_k_schedule=2,
        accumulator_dtype=jnp.float64,  # its default float32 accumulator would round
    )
    params = {"w": jnp.asarray(x0)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    xs = []
    for t in range(steps):
        g = a @ np.asarray(params["w"]) - b + noise[t]
        u, state = update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, u)
        if t % 2 == 1:
            xs.append(np.asarray(params["w"]))
    # Within a pair the params do not move, so both gradients are taken at the same x.
    ref, _ = reference_lookahead(
        x0,
        lambda t, x: a @ x - b + 0.5 * (noise[2 * t] + noise[2 * t + 1]),
        _NumpyMomentum(LR, 0.9),
        ((3, 0.5),),
        "keep",
        steps // 2,
    )
    np.testing.assert_allclose(np.array(xs), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(optlab.slow_params(state)["w"], _slow_after(ref, 3), rtol=1e-12)


def _slow_after(xs: np.ndarray, k: int) -> np.ndarray:
    """The slow weights after the last sync of a one-level trajectory = x at that sync."""
    return xs[(len(xs) // k) * k - 1]


def test_inject_hyperparams_traced_alpha_without_static_args(rng, x64):
    steps = 14
    a, b, noise, x0 = _problem(rng, steps)

    def grad(t, x):
        return a @ x - b + noise[t]

    injected = optax.inject_hyperparams(optlab.lookahead)(optax.sgd(LR, 0.9), alpha=0.6)
    xs, slows, state = run_optlab(injected, x0, grad, steps)
    assert set(state.hyperparams) == {"sync_period", "alpha"}  # both traced
    plain = run_optlab(optlab.lookahead(optax.sgd(LR, 0.9), 5, 0.6), x0, grad, steps)
    np.testing.assert_allclose(xs, plain[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(slows, plain[1], rtol=1e-12, atol=1e-12)
    # Changing the injected alpha takes effect without re-building the transform.
    state.hyperparams["alpha"] = jnp.asarray(1.0)
    params = {"w": jnp.asarray(xs[-1])}
    g = {"w": jnp.ones(DIM)}
    updates, _ = jax.jit(injected.update)(g, state, params)
    assert np.all(np.isfinite(updates["w"]))


def _schedule_levels():
    """Two levels whose alphas change with the step count (traced count -> float64 alpha).

    Written with jnp rather than ``optax.linear_schedule``, which computes in float32 even
    under x64 and would not match the float64 reference to 1e-12.
    """
    return (
        (2, lambda count: 0.2 + 0.7 * jnp.minimum(count, 30) / 30),
        (3, lambda count: 0.3 + 0.4 * (count % 2)),
    )


def _numpy_schedule_levels():
    """The same schedules written with plain NumPy for the reference loop."""
    return ((2, lambda t: 0.2 + 0.7 * min(t, 30) / 30), (3, lambda t: 0.3 + 0.4 * (t % 2)))


@pytest.mark.parametrize("momentum", ["keep", "pullback"])
def test_alpha_schedules_match_reference_loop(momentum, rng, x64):
    steps = 40
    a, b, noise, x0 = _problem(rng, steps)

    def grad(t, x):
        return a @ x - b + noise[t]

    ref_x, ref_slow = reference_lookahead(
        x0, grad, _NumpyMomentum(LR, 0.9), _numpy_schedule_levels(), momentum, steps
    )
    tx = optlab.multilayer_lookahead(
        optax.sgd(LR, momentum=0.9), _schedule_levels(), momentum=momentum
    )
    xs, slows, state = run_optlab(tx, x0, grad, steps)
    np.testing.assert_allclose(xs, ref_x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(slows, ref_slow, rtol=1e-12, atol=1e-12)
    assert int(state.count) == steps
    # The schedules did change the result (the test is not vacuous).
    const = run_optlab(
        optlab.multilayer_lookahead(
            optax.sgd(LR, momentum=0.9), ((2, 0.2), (3, 0.3)), momentum=momentum
        ),
        x0,
        grad,
        steps,
    )
    assert not np.allclose(const[0], xs)


def test_constant_schedule_equals_constant_alpha(rng, x64):
    steps = 21
    a, b, noise, x0 = _problem(rng, steps)

    def grad(t, x):
        return a @ x - b + noise[t]

    plain = run_optlab(optlab.lookahead(optax.sgd(LR, 0.9), 4, 0.7), x0, grad, steps)
    scheduled = run_optlab(
        optlab.lookahead(optax.sgd(LR, 0.9), 4, optax.constant_schedule(0.7)), x0, grad, steps
    )
    np.testing.assert_array_equal(plain[0], scheduled[0])
    np.testing.assert_array_equal(plain[1], scheduled[1])


def test_alpha_schedule_agrees_with_inject_hyperparams(rng, x64):
    # inject_hyperparams evaluates a schedule at its own count (updates before this one)
    # and passes the value in: the same count as a schedule handed to lookahead directly.
    steps = 24
    a, b, noise, x0 = _problem(rng, steps)

    def grad(t, x):
        return a @ x - b + noise[t]

    schedule = optax.linear_schedule(0.1, 0.9, transition_steps=steps)
    direct = run_optlab(optlab.lookahead(optax.sgd(LR, 0.9), 3, schedule), x0, grad, steps)
    injected = run_optlab(
        optax.inject_hyperparams(optlab.lookahead)(optax.sgd(LR, 0.9), 3, alpha=schedule),
        x0,
        grad,
        steps,
    )
    np.testing.assert_allclose(direct[0], injected[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(direct[1], injected[1], rtol=1e-12, atol=1e-12)


def test_alpha_schedule_is_evaluated_only_when_a_level_syncs():
    seen = []

    def schedule(count):
        jax.debug.callback(lambda c: seen.append(int(c)), count)
        return 0.5

    tx = optlab.multilayer_lookahead(optax.sgd(0.1), ((2, schedule), (3, 0.5)))
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(7):
        updates, state = update({"w": jnp.ones(2)}, state, params)
        jax.block_until_ready(updates)
        params = optax.apply_updates(params, updates)
    assert seen == [1, 3, 5]  # level-1 syncs after updates 2, 4, 6 (counts 1, 3, 5)


def test_extra_args_reach_the_inner_optimizer():
    seen = {}

    def spy_update(updates, state, params=None, **extra):
        seen.update(extra)
        return updates, state

    spy = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), spy_update)
    tx = optlab.lookahead(spy, 2, 0.5)
    params = {"w": jnp.zeros(2)}
    tx.update(params, tx.init(params), params, grad_fn="sentinel")
    assert seen == {"grad_fn": "sentinel"}


def test_through_flax_nnx_optimizer():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.linear(x)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
    y = jnp.ones((8, 2))

    def loss(model):
        return jnp.mean((model(x) - y) ** 2)

    model = Model(nnx.Rngs(0))
    params = jax.tree.map(jnp.copy, nnx.as_pure(nnx.state(model, nnx.Param)))  # a snapshot
    tx = optlab.multilayer_lookahead(optax.sgd(0.1, momentum=0.9), ((2, 0.5), (2, 0.5)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(loss)(model)
        optimizer.update(model, grads)

    for _ in range(6):
        step(model, optimizer)

    # The same trajectory with the functional API.
    graphdef = nnx.graphdef(model)
    state = tx.init(params)
    for _ in range(6):
        grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p)))(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), got, params)
    slow = optlab.slow_params(optimizer.opt_state)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6),
        nnx.as_pure(slow),
        optlab.slow_params(state),
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_is_kept(dtype):
    tx = optlab.multilayer_lookahead(optax.sgd(0.1, momentum=0.9), ((2, 0.5), (2, 0.5)))
    params = {"w": jnp.ones(4, dtype), "b": jnp.zeros(2, dtype)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(5):
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
        updates, state = update(grads, state, params)
        assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
        params = optax.apply_updates(params, updates)
        assert all(p.dtype == dtype for p in jax.tree.leaves(params))
    assert all(s.dtype == dtype for s in jax.tree.leaves(state.slow))


def test_no_recompilation_after_the_first_update():
    traces = []
    tx = optlab.multilayer_lookahead(optax.adam(0.1), ((2, 0.5), (3, 0.5)), momentum="pullback")

    @jax.jit
    def step(params, state):
        traces.append(1)
        grads = jax.tree.map(jnp.sin, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for _ in range(13):  # crosses level-1 and level-2 syncs
        params, state = step(params, state)
    assert len(traces) == 1


def _copies_by_computation(hlo: str) -> dict[str, list[str]]:
    """The array copies of a compiled HLO module, by computation name."""
    out: dict[str, list[str]] = {}
    for computation in re.split(r"\n(?=%|ENTRY)", hlo):
        name = computation.split(" ", 1)[0]
        lines = computation.splitlines()
        copies = [ln for ln in lines if re.search(r"= f32\[[\d,]+\]\{[\d,]*\} copy\(", ln)]
        if copies:
            out[name] = lines
    return out


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("momentum", ["keep", "reset"])
def test_donated_state_is_not_copied(levels, momentum):
    """Jitted with the state donated (and returned first), the slow weights stay in place.

    The only array copies in the compiled program are the re-anchoring ones (params into a
    slow tree, inside a branch that does nothing else), so an ordinary step moves no slow
    weights. A multi-way lax.switch, or conds nested in a cond, make XLA:CPU copy them.
    """
    tx = optlab.multilayer_lookahead(
        optax.sgd(0.1, momentum=0.9), ((3, 0.5),) * levels, momentum=momentum
    )
    params = {"w": jnp.ones((64, 32)), "b": jnp.ones(32)}

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return state, updates

    hlo = jax.jit(step, donate_argnums=1).lower(params, tx.init(params), params).compile()
    copies = _copies_by_computation(hlo.as_text())
    assert not any(name == "ENTRY" for name in copies), copies.get("ENTRY")
    for lines in copies.values():
        ops = {m for ln in lines for m in re.findall(r"= \S+ ([\w-]+)\(", ln)}
        assert ops <= {"parameter", "get-tuple-element", "copy", "tuple"}, lines
    assert len(copies) == levels  # one anchoring branch per level


# ----------------------------------------------------------------------------------------
# Several workers: vmap simulation and shard_map on 8 devices.

WORKERS = 8


def _worker_problem():
    rng = np.random.default_rng(3)
    targets = rng.normal(size=(WORKERS, DIM))  # worker i's loss: 0.5 |x - t_i|^2
    return jnp.asarray(targets), jnp.asarray(rng.normal(size=DIM))


def _dp_step(tx, axis):
    def step(params, state, target):
        grads = jax.tree.map(lambda p: p - target, params)
        grads = jax.lax.pmean(grads, axis)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def test_vmap_workers_equal_shard_map_and_single_device():
    targets, x0 = _worker_problem()
    tx = optlab.multilayer_lookahead(optax.sgd(0.1, momentum=0.9), ((2, 0.5), (2, 0.8)))
    steps = 9

    # Single device: the mean gradient is x - mean(targets).
    params = {"w": x0}
    state = tx.init(params)
    for _ in range(steps):
        grads = {"w": params["w"] - targets.mean(0)}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)

    # vmap: 8 simulated workers, replicated params and state.
    def rep(tree):
        return jax.tree.map(lambda v: jnp.broadcast_to(v, (WORKERS, *v.shape)), tree)

    v_params = rep({"w": x0})
    v_state = rep(tx.init({"w": x0}))
    v_step = jax.jit(jax.vmap(_dp_step(tx, "w"), axis_name="w"))
    for _ in range(steps):
        v_params, v_state = v_step(v_params, v_state, targets)

    # shard_map over 8 CPU devices.
    mesh = make_mesh(WORKERS)
    axis = mesh.axis_names[0]
    s_params = rep({"w": x0})
    s_state = rep(tx.init({"w": x0}))
    spec = P(axis)
    s_step = jax.jit(
        jax.shard_map(
            lambda p, s, t: jax.tree.map(
                lambda v: v[None], _dp_step(tx, axis)(*jax.tree.map(lambda v: v[0], (p, s, t)))
            ),
            mesh=mesh,
            in_specs=(spec, spec, spec),
            out_specs=(spec, spec),
        )
    )
    for _ in range(steps):
        s_params, s_state = s_step(s_params, s_state, targets)

    for w in range(WORKERS):
        np.testing.assert_allclose(v_params["w"][w], params["w"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s_params["w"][w], v_params["w"][w], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            optlab.slow_params(jax.tree.map(lambda v: v[w], s_state))["w"],
            optlab.slow_params(state)["w"],
            rtol=1e-5,
            atol=1e-6,
        )


# ----------------------------------------------------------------------------------------
# Checkpointing.


def test_orbax_round_trip_mid_cycle_resumes_identically(tmp_path, rng):
    steps, split = 17, 7  # 7 % (2 * 3) == 1: mid-cycle at both levels
    a, b, noise, x0 = _problem(rng, steps)
    a, b, noise, x0 = (np.asarray(v, np.float32) for v in (a, b, noise, x0))
    tx = optlab.multilayer_lookahead(optax.adam(0.05), ((2, 0.5), (3, 0.8)), momentum="pullback")
    update = jax.jit(tx.update)

    def run(params, state, start, stop):
        for t in range(start, stop):
            g = {"w": jnp.asarray(a) @ params["w"] - b + noise[t]}
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    params0 = {"w": jnp.asarray(x0)}
    full = run(params0, tx.init(params0), 0, steps)
    half = run(params0, tx.init(params0), 0, split)
    assert int(half[1].cycle_step) % 2 != 0
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(split, half)
        ckpt.wait()
        like = jax.eval_shape(lambda: (params0, tx.init(params0)))
        restored = ckpt.restore(like=like, step=split)
    assert isinstance(restored[1], optlab.LookaheadState)
    resumed = run(*restored, split, steps)
    jax.tree.map(np.testing.assert_array_equal, resumed, full)


# ----------------------------------------------------------------------------------------
# slow_params, memory, convergence, validation.


def test_slow_params_found_inside_wrappers():
    params = {"w": jnp.ones(2)}
    la = optlab.lookahead(optax.sgd(0.1), 2, 0.5)
    for tx in (
        la,
        optax.chain(optax.clip(1.0), la),
        optax.MultiSteps(la, every_k_schedule=2),
        optax.inject_hyperparams(optlab.lookahead)(optax.sgd(0.1), alpha=0.5),
        optax.with_extra_args_support(la),
    ):
        np.testing.assert_array_equal(optlab.slow_params(tx.init(params))["w"], params["w"])


def test_slow_params_errors():
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="no LookaheadState"):
        optlab.slow_params(optax.sgd(0.1).init(params))
    la = optlab.lookahead(optax.sgd(0.1))
    two = (la.init(params), la.init(params))
    with pytest.raises(ValueError, match="2 Lookahead states"):
        optlab.slow_params(two)


def test_memory_is_one_copy_per_level():
    params = {"w": jnp.ones((100, 10)), "b": jnp.ones(10)}
    nbytes = sum(p.nbytes for p in jax.tree.leaves(params))
    for levels in (1, 2, 3):
        tx = optlab.multilayer_lookahead(optax.sgd(0.1), ((2, 0.5),) * levels)
        state = jax.eval_shape(tx.init, params)
        slow_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(state.slow))
        assert slow_bytes == levels * nbytes


def test_converges_on_a_quadratic():
    target = jnp.arange(5.0)
    tx = optlab.multilayer_lookahead(optax.sgd(0.2, momentum=0.5), ((5, 0.5), (3, 0.5)))
    params = {"w": jnp.zeros(5)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(400):
        updates, state = update({"w": params["w"] - target}, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["w"], target, atol=1e-4)
    np.testing.assert_allclose(optlab.slow_params(state)["w"], target, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sync_period": 0}, "sync_period must be an integer in"),
        ({"sync_period": -3}, "sync_period must be an integer in"),
        ({"sync_period": 2.0}, "sync_period must be an integer"),
        ({"sync_period": True}, "sync_period must be an integer"),
        ({"sync_period": "5"}, "sync_period must be an integer"),
        ({"alpha": -0.1}, r"alpha must lie in \[0, 1\]"),
        ({"alpha": 1.5}, r"alpha must lie in \[0, 1\]"),
        ({"alpha": float("nan")}, r"alpha must lie in \[0, 1\]"),
        ({"momentum": "nesterov"}, "momentum must be one of"),
    ],
)
def test_invalid_lookahead_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optlab.lookahead(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize(
    ("levels", "match"),
    [
        ((), "at least one"),
        ([], "at least one"),
        ((5, 0.5), r"levels\[0\] must be a \(k, alpha\) pair"),
        (((5,),), r"levels\[0\] must be a \(k, alpha\) pair"),
        (((5, 0.5), (0, 0.5)), r"levels\[1\]\[0\] \(k\) must be an integer in"),
        (((5, 0.5), (2.5, 0.5)), r"levels\[1\]\[0\] \(k\) must be an integer"),
        (((5, 1.2),), r"levels\[0\]\[1\] \(alpha\) must lie in"),
        ("55", "must be a sequence"),
        (((2**16, 0.5), (2**16, 0.5)), "product of the sync periods"),
    ],
)
def test_invalid_levels(levels, match):
    with pytest.raises(ValueError, match=match):
        optlab.multilayer_lookahead(optax.sgd(0.1), levels)


def test_momentum_mode_needs_a_momentum_buffer():
    tx = optlab.lookahead(optax.sgd(0.1), momentum="reset")
    with pytest.raises(ValueError, match="first-moment buffer"):
        tx.init({"w": jnp.zeros(2)})

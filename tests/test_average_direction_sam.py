"""optlab.average_direction_sam: the mean gradient over Gaussian perturbations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from sam_family_checks import (
    assert_trees_close,
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

LR, MOMENTUM, STEPS = 0.1, 0.9, 4


def _noise(seed, t, j, params, worker=None):
    """The documented stream: fold_in(key(seed), t) [, worker], then the sample index j."""
    return flat(_noise_tree(seed, t, j, params, -1 if worker is None else worker))


@jax.jit
def _noise_tree(seed, t, j, params, worker):
    key = jax.random.fold_in(jax.random.key(seed), t)
    key = jnp.where(worker < 0, key, jax.random.fold_in(key, worker))
    return gaussian_like(jax.random.fold_in(key, j), params)


@pytest.mark.parametrize(
    ("sigma", "seed"),
    [
        (0.05, 7),
        (optax.exponential_decay(0.1, 1, 0.5), 7),
        # A typed key and a raw uint32[2] key for the same seed give the same stream.
        (0.05, jax.random.key(7)),
        (0.05, jax.random.PRNGKey(7)),
    ],
    ids=["int_seed", "sigma_schedule", "typed_key", "raw_key"],
)
def test_matches_reference_loop(sigma, seed):
    with enable_x64():
        params = mlp_params(jnp.float64)
        xs, ys = mlp_data(STEPS, dtype=jnp.float64)
        tx = optlab.average_direction_sam(optax.sgd(LR, momentum=MOMENTUM), sigma, 3, seed=seed)
        got, _, _ = run(tx, params, xs, ys)
        grad = flat_grad_fn(params)
        w, m = flat(params), 0.0
        for t in range(STEPS):
            s = float(sigma(jnp.int32(t))) if callable(sigma) else sigma
            h = sum(grad(w + s * _noise(7, t, j, params), xs[t], ys[t]) for j in range(3)) / 3
            m = MOMENTUM * m + h
            w = w - LR * m
        np.testing.assert_allclose(flat(got), w, rtol=1e-11, atol=1e-13)
        plain = reference_heavy_ball(params, xs, ys, LR, MOMENTUM)
        assert np.max(np.abs(plain - w)) > 1e-4


def test_vectorized_samples_equal_the_loop():
    params = mlp_params()
    xs, ys = mlp_data(STEPS)
    base = optax.sgd(LR, momentum=MOMENTUM)
    looped, _, _ = run(optlab.average_direction_sam(base, 0.1, 4), params, xs, ys)
    vectorized, _, _ = run(
        optlab.average_direction_sam(base, 0.1, 4, vectorize=True), params, xs, ys
    )
    assert_trees_close(vectorized, looped, rtol=1e-5, atol=1e-7)


def test_sigma_zero_is_the_base_optimizer():
    params = mlp_params()
    xs, ys = mlp_data(STEPS)
    base = optax.sgd(LR, momentum=MOMENTUM)
    expected, _, _ = run(base, params, xs, ys, with_grad_fn=False)
    one, _, _ = run(optlab.average_direction_sam(base, 0.0, 1), params, xs, ys)
    jax.tree.map(np.testing.assert_array_equal, one, expected)


def test_estimates_the_gradient_of_the_gaussian_smoothed_loss():
    # For L(w) = sum(cos w):  E[grad L(w + eps)] = -sin(w) * exp(-sigma^2 / 2).
    sigma, samples = 0.8, 4000
    w = {"w": jnp.linspace(-2.0, 2.0, 5)}
    grad_fn = jax.grad(lambda p: jnp.sum(jnp.cos(p["w"])))
    tx = optlab.average_direction_sam(optax.sgd(1.0), sigma, samples, vectorize=True)
    updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(
        grad_fn(w), tx.init(w), w
    )
    smoothed = -np.sin(np.asarray(w["w"])) * np.exp(-(sigma**2) / 2)
    np.testing.assert_allclose(-np.asarray(updates["w"]), smoothed, atol=0.03)
    # ... which is far from the unsmoothed gradient -sin(w).
    assert np.max(np.abs(smoothed + np.sin(np.asarray(w["w"])))) > 0.2


def test_grad_fn_called_num_samples_times_with_fresh_noise_each_step():
    params = {"w": jnp.zeros(3)}
    seen = []

    def grad_fn(p):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), p["w"])
        return p

    tx = optlab.average_direction_sam(optax.sgd(0.0), 1.0, 2, seed=3)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
    state = tx.init(params)
    for _ in range(2):
        _, state = update(params, state, params)
    jax.effects_barrier()
    assert len(seen) == 4
    assert len({tuple(np.round(s, 6)) for s in seen}) == 4
    np.testing.assert_allclose(seen[2], _noise(3, 1, 0, params), rtol=1e-6)
    # The same seed gives the same stream; another seed another one.
    other = optlab.average_direction_sam(optax.sgd(0.0), 1.0, 2, seed=4)
    assert not np.array_equal(other.init(params).key, state.key)


def test_shard_map_equals_vmap_simulation_with_per_worker_noise():
    params = mlp_params()
    xs, ys = mlp_data(2)
    tx = optlab.average_direction_sam(optax.sgd(LR, momentum=MOMENTUM), 0.1, 2, axis_name="data")
    step = worker_step(tx)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
        )
    )
    simulated = jax.jit(jax.vmap(step, in_axes=(None, None, 0, 0), axis_name="data"))
    p_shard, s_shard = params, tx.init(params)
    p_sim, s_sim = params, tx.init(params)
    for t in range(2):
        p_shard, s_shard = sharded(p_shard, s_shard, xs[t], ys[t])
        p_sim, s_sim = simulated(p_sim, s_sim, xs[t].reshape(8, 2, 3), ys[t].reshape(8, 2, 2))
        p_sim, s_sim = jax.tree.map(lambda v: v[0], (p_sim, s_sim))
        assert_trees_close(p_shard, p_sim, rtol=1e-5, atol=1e-7)
    # First step by hand: 8 workers x 2 samples, each worker with its own noise and batch.
    with enable_x64():
        grad = flat_grad_fn(params)
        w = flat(params)
        h = 0.0
        for i in range(8):
            xi = np.asarray(xs[0][2 * i : 2 * i + 2], np.float64)
            yi = np.asarray(ys[0][2 * i : 2 * i + 2], np.float64)
            for j in range(2):
                h = h + grad(w + 0.1 * _noise(0, 0, j, params, worker=i), xi, yi) / 16
        expected = w - LR * h
    first, _ = sharded(params, tx.init(params), xs[0], ys[0])
    np.testing.assert_allclose(flat(first), expected, rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_traced_sigma():
    params = mlp_params()
    xs, ys = mlp_data(3)
    base = optax.sgd(LR, momentum=MOMENTUM)
    tx = optax.inject_hyperparams(optlab.average_direction_sam, static_args="num_samples")(
        base, sigma=0.05, num_samples=2
    )
    step, traces = trace_counter(make_step(tx))
    state, got = tx.init(params), params
    for t in range(3):
        got, state = step(got, state, xs[t], ys[t])
    assert len(traces) == 1
    expected, _, _ = run(optlab.average_direction_sam(base, 0.05, 2), params, xs, ys)
    assert_trees_close(got, expected, rtol=1e-6, atol=1e-7)
    # A structural integer must be static: the error names it.
    with pytest.raises(ValueError, match="num_samples"):
        optax.inject_hyperparams(optlab.average_direction_sam)(base, 0.05, 2).init(params)


def test_contract_no_retrace_nnx_chain_multi_steps():
    tx = optlab.average_direction_sam(optax.adam(1e-2), optax.cosine_decay_schedule(0.1, 5), 2)
    check_no_retrace(tx)
    opt_state = check_nnx_optimizer(tx)
    assert int(opt_state.count) == 3
    # Inside a chain: the clip acts on the first gradient, which this method does not use.
    params = mlp_params()
    xs, ys = mlp_data(4)
    chained, state, _ = run(optax.chain(optax.clip_by_global_norm(1e-3), tx), params, xs, ys)
    plain, _, _ = run(tx, params, xs, ys)
    assert_trees_close(chained, plain, rtol=1e-6, atol=1e-7)
    assert int(state[1].count) == 4


def test_multi_steps_around_is_refused_naming_the_fixes():
    # MultiSteps would hand over the last micro-batch's grad_fn and this method ignores the
    # accumulated gradient: k - 1 micro-batches would be dropped.
    params = mlp_params()
    xs, ys = mlp_data(2)
    tx = optlab.average_direction_sam(optax.sgd(LR), 0.05, 2)
    for wrapped in (
        optax.MultiSteps(tx, 2),
        optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), tx), 2),
    ):
        with pytest.raises(
            ValueError, match=r"MultiSteps.*microbatched_grad_fn.*MultiSteps\(base, k\)"
        ):
            run(wrapped, params, xs, ys)


def test_multi_steps_inside_matches_an_independent_accumulation_loop():
    with enable_x64():
        params = mlp_params(jnp.float64)
        xs, ys = mlp_data(6, dtype=jnp.float64)
        base = optax.MultiSteps(optax.sgd(LR, momentum=MOMENTUM), 2, accumulator_dtype=jnp.float64)
        tx = optlab.average_direction_sam(base, 0.05, 2, seed=3)
        got, state, _ = run(tx, params, xs, ys)
        assert int(state.count) == 6  # one noise draw per micro-batch
        grad = flat_grad_fn(params)
        w, m = flat(params), 0.0
        for start in (0, 2, 4):
            h = 0.0
            for i in (start, start + 1):  # each micro-batch: its own noise, at the same w
                for j in range(2):
                    h = h + grad(w + 0.05 * _noise(3, i, j, params), xs[i], ys[i]) / 4
            m = MOMENTUM * m + h
            w = w - LR * m
        np.testing.assert_allclose(flat(got), w, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optlab.average_direction_sam(optax.sgd(LR, momentum=MOMENTUM), 0.05, 2),
        lambda: optlab.average_direction_sam(optax.adam(1e-2), 0.05, seed=jax.random.PRNGKey(1)),
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0),
            optlab.average_direction_sam(optax.sgd(LR), 0.05, seed=jax.random.key(1)),
        ),
        lambda: optax.inject_hyperparams(
            optlab.average_direction_sam, static_args=("num_samples",)
        )(optax.sgd(LR), 0.05, seed=4),
        lambda: optlab.average_direction_sam(optax.MultiSteps(optax.sgd(LR), 2), 0.05),
    ],
    ids=["sgd", "raw_key", "chain_typed_key", "inject", "multi_steps_inside"],
)
def test_jitted_step_donating_params_and_state(make):
    check_donating_step(make(), steps=4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_is_kept(dtype):
    check_dtype_is_kept(optlab.average_direction_sam(optax.sgd(LR, momentum=0.9), 0.05, 2), dtype)


def test_orbax_round_trip_resumes_the_same_noise_stream(tmp_path):
    tx = optlab.average_direction_sam(optax.adam(1e-2), 0.05, 2, seed=11)
    restored = check_orbax_resume(tx, tmp_path / "ckpt")
    assert isinstance(restored, optlab.AverageDirectionSAMState)
    assert restored.key.dtype == jnp.uint32


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((-0.1, 1), {}, "sigma"),
        ((float("inf"), 1), {}, "sigma"),
        ((0.1, 0), {}, "num_samples"),
        ((0.1, 2.0), {}, "num_samples"),
        ((0.1, 1), {"seed": 1.5}, "seed"),
        ((0.1, 1), {"seed": jnp.zeros(3, jnp.uint32)}, "seed"),
    ],
)
def test_invalid_arguments_raise_naming_the_parameter(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        optlab.average_direction_sam(optax.sgd(0.1), *args, **kwargs)


def test_needs_grad_fn():
    tx = optlab.average_direction_sam(optax.sgd(0.1), 0.1)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(params, tx.init(params), params)


def test_converges_on_a_small_regression_problem():
    params = mlp_params()
    xs, ys = mlp_data(1, seed=3)
    tx = optlab.average_direction_sam(optax.sgd(0.1, momentum=0.9), 0.01, 2)
    state, p = tx.init(params), params
    step = make_step(tx)
    for _ in range(300):
        p, state = step(p, state, xs[0], ys[0])
    initial, final = float(mlp_loss(params, xs[0], ys[0])), float(mlp_loss(p, xs[0], ys[0]))
    assert final < 0.1 * initial, (initial, final)
    assert float(optax.tree.norm(mlp_grad(p, xs[0], ys[0]))) < 0.05

"""optlab.perturbation: the safe global norm, the point maps and the gradient at a point."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from sam_family_checks import assert_trees_close, mlp_data, mlp_grad, mlp_params

import optlab
from optlab.perturbation import (
    extrapolation_point,
    gaussian_like,
    grad_at_point,
    group_grad_fn,
    mean_over,
    microbatched_grad_fn,
    raw_key,
    refuse_inside_multi_steps,
    safe_global_norm,
    sharpness_point,
    translate,
)


def _tree(rng, dtype=np.float32):
    return {
        "a": jnp.asarray(rng.normal(size=(3, 4)), dtype),
        "b": [jnp.asarray(rng.normal(size=(5,)), dtype)],
    }


def test_safe_global_norm_equals_the_exact_norm(rng, x64):
    tree = _tree(rng, np.float64)
    exact = np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(tree)))
    np.testing.assert_allclose(safe_global_norm(tree), exact, rtol=1e-14)
    np.testing.assert_allclose(safe_global_norm(tree), optax.tree.norm(tree), rtol=1e-14)
    # The gradient is the unit vector x / |x| away from zero.
    grad = jax.grad(safe_global_norm)(tree)
    assert_trees_close(grad, jax.tree.map(lambda x: x / exact, tree), rtol=1e-12)


def test_safe_global_norm_is_finite_with_zero_gradient_at_zero():
    zeros = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((2,), jnp.bfloat16)}
    assert float(safe_global_norm(zeros, eps=1e-6)) == pytest.approx(1e-6)
    grad = jax.grad(safe_global_norm)(zeros)
    assert all(np.all(np.asarray(g, np.float32) == 0) for g in jax.tree.leaves(grad))
    # The trap it avoids: the plain norm's derivative at zero is NaN.
    plain = jax.grad(optax.tree.norm)({"a": jnp.zeros(3)})
    assert np.isnan(np.asarray(plain["a"])).all()


def test_safe_global_norm_accumulates_bf16_in_float32():
    # 4096 entries of 2**-4: squares 2**-8, sum 16, norm 4. A bf16 running sum stalls at 2.
    tree = {"a": jnp.full((4096,), 2.0**-4, jnp.bfloat16)}
    norm = safe_global_norm(tree)
    assert norm.dtype == jnp.float32
    assert float(norm) == pytest.approx(4.0, rel=1e-6)


def test_sharpness_point_is_at_distance_rho_along_the_gradient(rng, x64):
    params, grads = _tree(rng, np.float64), _tree(rng, np.float64)
    point = sharpness_point(0.3)(params, grads)
    delta = jax.tree.map(jnp.subtract, point, params)
    np.testing.assert_allclose(optax.tree.norm(delta), 0.3, rtol=1e-12)
    scale = 0.3 / float(optax.tree.norm(grads))
    assert_trees_close(delta, jax.tree.map(lambda g: scale * g, grads), rtol=1e-12)


def test_sharpness_point_with_scale_is_asam(rng, x64):
    params, grads = _tree(rng, np.float64), _tree(rng, np.float64)
    t = jax.tree.map(lambda p: jnp.abs(p) + 0.01, params)
    point = sharpness_point(0.5, scale=lambda p: jax.tree.map(lambda x: jnp.abs(x) + 0.01, p))(
        params, grads
    )
    tg = np.concatenate(
        [np.ravel(a * b) for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(grads), strict=True)]
    )
    expected = jax.tree.map(
        lambda p, s, g: p + 0.5 * s * s * g / np.linalg.norm(tg), params, t, grads
    )
    assert_trees_close(point, expected, rtol=1e-12)


def test_zero_gradient_maps_to_the_params_themselves():
    params = {"w": jnp.arange(3.0)}
    zero = {"w": jnp.zeros(3)}
    for point_map in (
        sharpness_point(0.05),
        sharpness_point(0.05, scale=optlab.asam_scale()),
        extrapolation_point(0.1),
    ):
        np.testing.assert_array_equal(point_map(params, zero)["w"], params["w"])


def test_translate_and_extrapolation_point_keep_dtypes():
    params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2, jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
    out = extrapolation_point(0.25)(params, grads)
    assert out["a"].dtype == jnp.bfloat16
    assert out["b"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out["a"], np.float32), 0.5)
    np.testing.assert_array_equal(translate(params, grads, 0.0)["b"], params["b"])


def test_gaussian_like_shapes_dtypes_and_independent_leaves():
    tree = {"a": jnp.zeros((200, 3), jnp.bfloat16), "b": jnp.zeros((200, 3))}
    noise = gaussian_like(jax.random.key(0), tree)
    assert noise["a"].dtype == jnp.bfloat16
    assert noise["b"].shape == (200, 3)
    a, b = np.asarray(noise["a"], np.float32), np.asarray(noise["b"])
    assert abs(a.std() - 1) < 0.1
    assert abs(b.mean()) < 0.1
    assert not np.allclose(a, b, atol=1e-2)


@pytest.mark.parametrize("vectorize", [False, True])
def test_mean_over_matches_numpy(vectorize):
    values = jnp.arange(12.0).reshape(4, 3) ** 1.5
    out = mean_over(
        4, lambda j: {"v": values[j], "h": values[j].astype(jnp.bfloat16)}, vectorize=vectorize
    )
    np.testing.assert_allclose(out["v"], np.asarray(values).mean(0), rtol=1e-6)
    assert out["h"].dtype == jnp.bfloat16


def test_grad_at_point_single_group_calls_grad_fn_once_at_the_point(x64):
    params = mlp_params(jnp.float64)
    xs, ys = mlp_data(1, dtype=jnp.float64)
    calls = []

    def grad_fn(p):
        calls.append(p)
        return mlp_grad(p, xs[0], ys[0])

    grads = mlp_grad(params, xs[0], ys[0])
    point_map = sharpness_point(0.1)
    h = grad_at_point(grad_fn, params, grads, point_map)
    assert len(calls) == 1
    assert_trees_close(h, mlp_grad(point_map(params, grads), xs[0], ys[0]), rtol=1e-13)


@pytest.mark.parametrize("vectorize", [False, True])
def test_grad_at_point_groups_is_m_sharpness(x64, vectorize):
    params = mlp_params(jnp.float64)
    xs, ys = mlp_data(1, dtype=jnp.float64)
    x, y = xs[0], ys[0]
    grad_fn = group_grad_fn(lambda p, b: mlp_grad(p, *b), (x, y), 4)
    point_map = sharpness_point(0.2)
    h = jax.jit(
        lambda p: grad_at_point(grad_fn, p, None, point_map, groups=4, vectorize=vectorize)
    )(params)
    expected = []
    for k in range(4):
        xk, yk = x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]
        expected.append(mlp_grad(point_map(params, mlp_grad(params, xk, yk)), xk, yk))
    assert_trees_close(h, jax.tree.map(lambda *g: sum(g) / 4, *expected), rtol=1e-12)
    # m-sharpness differs from the whole-batch SAM gradient.
    whole = mlp_grad(point_map(params, mlp_grad(params, x, y)), x, y)
    assert not np.allclose(h["w1"], whole["w1"], rtol=1e-3)


def test_per_worker_points_then_pmean_under_vmap_and_shard_map():
    params = mlp_params()
    xs, ys = mlp_data(1)
    x, y = xs[0].reshape(8, 2, 3), ys[0].reshape(8, 2, 2)
    point_map = sharpness_point(0.1)

    def worker(p, xb, yb):
        local = optlab.data_parallel_value_and_grad(mlp_loss_flat, "data", average=False)
        grad_fn = lambda q: local(q, xb, yb)[1]
        return grad_at_point(grad_fn, p, grad_fn(p), point_map, axis_name="data")

    expected = jax.tree.map(
        lambda *g: sum(g) / 8,
        *[mlp_grad(point_map(params, mlp_grad(params, x[i], y[i])), x[i], y[i]) for i in range(8)],
    )
    simulated = jax.vmap(worker, in_axes=(None, 0, 0), axis_name="data")(params, x, y)
    assert_trees_close(jax.tree.map(lambda v: v[3], simulated), expected, rtol=2e-5, atol=1e-7)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.jit(
        jax.shard_map(worker, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
    )(params, xs[0], ys[0])
    assert_trees_close(sharded, expected, rtol=2e-5, atol=1e-7)


def mlp_loss_flat(p, xb, yb):
    hidden = jnp.tanh(xb @ p["w1"] + p["b1"])
    return jnp.mean((hidden @ p["w2"] + p["b2"] - yb) ** 2)


def test_group_grad_fn_validates_groups():
    batch = (jnp.zeros((6, 2)),)
    with pytest.raises(ValueError, match="groups"):
        group_grad_fn(lambda p, b: p, batch, 4)
    with pytest.raises(ValueError, match="groups"):
        group_grad_fn(lambda p, b: p, batch, 0)
    with pytest.raises(ValueError, match="groups"):
        grad_at_point(lambda p, k: p, {"w": jnp.ones(2)}, None, sharpness_point(0.1), groups=2.0)


@pytest.mark.parametrize("vectorize", [False, True])
def test_microbatched_grad_fn_is_the_whole_batch_gradient(x64, vectorize):
    params = mlp_params(jnp.float64)
    xs, ys = mlp_data(1, dtype=jnp.float64)
    gfn = microbatched_grad_fn(lambda p, b: mlp_grad(p, *b), (xs[0], ys[0]), 4, vectorize=vectorize)
    assert_trees_close(jax.jit(gfn)(params), mlp_grad(params, xs[0], ys[0]), rtol=1e-12)
    with pytest.raises(ValueError, match="groups"):
        microbatched_grad_fn(lambda p, b: p, (jnp.zeros((6, 2)),), 4)
    with pytest.raises(ValueError, match="num_micro_batches"):
        microbatched_grad_fn(lambda p, b: p, (jnp.zeros((6, 2)),), 0)


def test_raw_key_accepts_seeds_typed_and_raw_keys_alike():
    want = np.asarray(jax.random.key_data(jax.random.key(7)))
    for seed in (7, np.int64(7), jnp.int32(7), jax.random.key(7), jax.random.PRNGKey(7)):
        got = raw_key(seed)
        assert got.dtype == jnp.uint32
        np.testing.assert_array_equal(got, want)
    for bad in (1.5, True, "7", jnp.zeros(3, jnp.uint32), jax.random.split(jax.random.key(0))):
        with pytest.raises(ValueError, match="seed"):
            raw_key(bad)


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
def test_gaussian_like_takes_typed_and_raw_keys(make_key):
    tree = {"a": jnp.zeros((4, 3)), "b": jnp.zeros(5, jnp.bfloat16)}
    got = jax.jit(gaussian_like)(make_key(3), tree)
    want = gaussian_like(jax.random.key(3), tree)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_refuse_inside_multi_steps_only_around_the_caller():
    def probe(inner=None):
        inner = optax.identity() if inner is None else inner

        def update(updates, state, params=None, **extra):
            refuse_inside_multi_steps("probe", "; fix X")
            return inner.update(updates, state, params)

        return optax.GradientTransformationExtraArgs(inner.init, update)

    params = {"w": jnp.ones(2)}
    for fine in (probe(), probe(optax.MultiSteps(optax.sgd(0.1), 2))):  # MultiSteps inside
        jax.jit(fine.update)(params, fine.init(params), params)
    for outer in (optax.MultiSteps(probe(), 2), optax.MultiSteps(optax.chain(probe()), 3)):
        with pytest.raises(ValueError, match=r"probe inside optax\.MultiSteps.*; fix X\."):
            jax.jit(outer.update)(params, outer.init(params), params)

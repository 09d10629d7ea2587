"""optlab.sharpness: power iteration and Hutchinson against exact Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import optlab


def _quadratic(spectrum, rng):
    """``loss(p, b) = ½ xᵀAx + bᵀx`` with A of the given spectrum; x split over two leaves."""
    n = len(spectrum)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = q @ np.diag(spectrum) @ q.T
    a = 0.5 * (a + a.T)

    def unravel(p):
        return jnp.concatenate([p["a"], p["b"].reshape(-1)])

    def loss(p, b):
        x = unravel(p)
        return 0.5 * x @ jnp.asarray(a) @ x + b @ x

    params = {
        "a": jnp.asarray(rng.normal(size=2)),
        "b": jnp.asarray(rng.normal(size=(2, n // 2 - 1))),
    }
    return loss, params, jnp.asarray(rng.normal(size=n)), a, q, unravel


@pytest.mark.usefixtures("x64")
def test_power_iteration_recovers_top_eigenvalue_and_vector(rng):
    spectrum = np.array([5.0, 2.0, 1.0, 0.5, -1.0, 0.1])
    loss, params, batch, _, q, unravel = _quadratic(spectrum, rng)
    lam, v = optlab.hessian_top_eigenvalue(
        loss, params, batch, key=jax.random.key(0), iters=40, return_vector=True
    )
    assert lam.dtype == jnp.float64
    np.testing.assert_allclose(lam, 5.0, rtol=1e-10)
    flat = np.asarray(unravel(v))
    np.testing.assert_allclose(np.linalg.norm(flat), 1.0, rtol=1e-12)
    np.testing.assert_allclose(abs(flat @ q[:, 0]), 1.0, rtol=1e-8)
    assert jax.tree.structure(v) == jax.tree.structure(params)


@pytest.mark.usefixtures("x64")
def test_eigenvalue_of_largest_magnitude_may_be_negative(rng):
    loss, params, batch, *_ = _quadratic(np.array([-4.0, 1.0, 0.5, 0.2, 2.0, 0.1]), rng)
    lam = optlab.hessian_top_eigenvalue(loss, params, batch, key=jax.random.key(1), iters=60)
    np.testing.assert_allclose(lam, -4.0, rtol=1e-8)


@pytest.mark.usefixtures("x64")
def test_few_iterations_give_a_rayleigh_quotient_below_the_top(rng):
    spectrum = np.array([3.0, 2.9, 1.0, 0.5, 0.3, 0.1])
    loss, params, batch, *_ = _quadratic(spectrum, rng)
    lam = optlab.hessian_top_eigenvalue(loss, params, batch, key=jax.random.key(2), iters=1)
    # One product: the Rayleigh quotient of a random unit vector lies inside the spectrum.
    assert 0.1 <= float(lam) < 3.0


@pytest.mark.usefixtures("x64")
def test_non_quadratic_network_matches_dense_hessian(rng):
    x = jnp.asarray(rng.normal(size=(12, 3)))
    y = jnp.asarray(rng.normal(size=12))
    params = {"w": jnp.asarray(rng.normal(size=(3, 4))), "v": jnp.asarray(rng.normal(size=4))}

    def loss(p, batch):
        x, y = batch
        return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - y) ** 2)

    flat, unravel = ravel_pytree(params)
    dense = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f), (x, y))))(flat))
    eigs = np.linalg.eigvalsh(dense)
    top = eigs[np.argmax(np.abs(eigs))]
    m = 2000

    @jax.jit
    def measure(p, batch, key):
        return (
            optlab.hessian_top_eigenvalue(loss, p, batch, key=key, iters=80),
            optlab.hessian_trace(loss, p, batch, key=key, num_samples=m),
        )

    lam, trace = measure(params, (x, y), jax.random.key(0))
    np.testing.assert_allclose(lam, top, rtol=1e-8)
    se = np.sqrt(2 * (np.sum(dense**2) - np.sum(np.diag(dense) ** 2)) / m)
    assert abs(float(trace) - np.trace(dense)) < 4 * se


@pytest.mark.usefixtures("x64")
def test_hutchinson_converges_within_its_standard_error(rng):
    spectrum = np.array([5.0, 2.0, 1.0, 0.5, -1.0, 0.1])
    loss, params, batch, a, *_ = _quadratic(spectrum, rng)
    m = 4000
    estimate = optlab.hessian_trace(loss, params, batch, key=jax.random.key(3), num_samples=m)
    # Var(zᵀAz) = 2 Σ_{j≠k} A_jk² for Rademacher z, so the standard error of the mean is:
    se = np.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) / m)
    assert se > 0
    assert abs(float(estimate) - spectrum.sum()) < 4 * se


@pytest.mark.usefixtures("x64")
def test_single_probe_variance_is_the_rademacher_variance(rng):
    """Gaussian probes would give variance 2‖A‖_F², here several times larger."""
    loss, params, batch, a, *_ = _quadratic(np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5]), rng)
    keys = jax.random.split(jax.random.key(4), 4000)
    one_probe = jax.vmap(lambda k: optlab.hessian_trace(loss, params, batch, key=k, num_samples=1))(
        keys
    )
    off_diagonal = np.sum(a**2) - np.sum(np.diag(a) ** 2)
    np.testing.assert_allclose(np.var(np.asarray(one_probe)), 2 * off_diagonal, rtol=0.15)
    assert 2 * off_diagonal < 0.5 * 2 * np.sum(a**2)


@pytest.mark.usefixtures("x64")
def test_diagonal_hessian_trace_is_exact_with_one_probe():
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5], [3.0]])}
    weights = {"a": jnp.array([2.0, 3.0]), "b": jnp.array([[-1.0], [7.0]])}

    def loss(p, w):
        return sum(
            jnp.sum(wi * pi**2)
            for wi, pi in zip(jax.tree.leaves(w), jax.tree.leaves(p), strict=True)
        )

    trace = optlab.hessian_trace(loss, params, weights, key=jax.random.key(5), num_samples=1)
    np.testing.assert_allclose(trace, 2 * (2 + 3 - 1 + 7), rtol=1e-14)


def test_zero_hessian_gives_zero_not_nan():
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}

    def loss(p, b):
        return jnp.sum(p["a"]) * b + jnp.sum(p["b"])

    lam, v = optlab.hessian_top_eigenvalue(
        loss, params, 2.0, key=jax.random.key(0), iters=3, return_vector=True
    )
    assert float(lam) == 0.0
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(v))
    trace = optlab.hessian_trace(loss, params, 2.0, key=jax.random.key(0), num_samples=3)
    assert float(trace) == 0.0


@pytest.mark.usefixtures("x64")
def test_jit_matches_eager(rng):
    loss, params, batch, *_ = _quadratic(np.array([5.0, 2.0, 1.0, 0.5, -1.0, 0.1]), rng)
    key = jax.random.key(7)

    @jax.jit
    def measure(p, b, k):
        return (
            optlab.hessian_top_eigenvalue(loss, p, b, key=k, iters=10),
            optlab.hessian_trace(loss, p, b, key=k, num_samples=10),
        )

    jit_lam, jit_trace = measure(params, batch, key)
    lam = optlab.hessian_top_eigenvalue(loss, params, batch, key=key, iters=10)
    trace = optlab.hessian_trace(loss, params, batch, key=key, num_samples=10)
    np.testing.assert_allclose(jit_lam, lam, rtol=1e-12)
    np.testing.assert_allclose(jit_trace, trace, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_params_accumulate_in_float32(dtype):
    diag = jnp.array([4.0, 1.0, 0.5, 0.25])
    params = {"a": jnp.ones(2, dtype), "b": jnp.ones(2, dtype)}

    def loss(p, d):
        x = jnp.concatenate([p["a"], p["b"]]).astype(jnp.float32)
        return 0.5 * jnp.sum(d * x**2)

    lam, v = optlab.hessian_top_eigenvalue(
        loss, params, diag, key=jax.random.key(0), iters=30, return_vector=True
    )
    assert lam.dtype == jnp.float32
    assert v["a"].dtype == dtype
    np.testing.assert_allclose(lam, 4.0, rtol=2e-2)
    trace = optlab.hessian_trace(loss, params, diag, key=jax.random.key(0), num_samples=2)
    assert trace.dtype == jnp.float32
    np.testing.assert_allclose(trace, 5.75, rtol=2e-2)


@pytest.mark.parametrize(
    ("fn", "name", "bad"),
    [
        ("hessian_top_eigenvalue", "iters", 0),
        ("hessian_top_eigenvalue", "iters", 2.0),
        ("hessian_trace", "num_samples", 0),
        ("hessian_trace", "num_samples", True),
    ],
)
def test_bad_counts_raise_naming_the_argument(fn, name, bad):
    def loss(p, b):
        return jnp.sum(p**2)

    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
        getattr(optlab, fn)(loss, jnp.ones(2), None, key=jax.random.key(0), **{name: bad})


@pytest.mark.usefixtures("x64")
def test_typed_and_raw_keys_give_the_same_estimates(rng):
    """``jax.random.key(s)`` and the raw ``jax.random.PRNGKey(s)`` (uint32[2]) are the same key."""
    loss, params, batch, *_ = _quadratic(np.array([5.0, 2.0, 1.0, 0.5, -1.0, 0.1]), rng)
    measure = jax.jit(
        lambda p, b, k: (
            optlab.hessian_top_eigenvalue(loss, p, b, key=k, iters=5),
            optlab.hessian_trace(loss, p, b, key=k, num_samples=3),
        )
    )
    typed = measure(params, batch, jax.random.key(3))
    raw = measure(params, batch, jax.random.PRNGKey(3))
    assert jax.random.PRNGKey(3).dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(typed))
    eager = optlab.hessian_trace(loss, params, batch, key=jax.random.PRNGKey(3), num_samples=3)
    np.testing.assert_allclose(eager, typed[1], rtol=1e-12)


# --- unroll ---------------------------------------------------------------------------------


def _conv_problem(rng):
    """A tiny 1-D convolutional regression, so the products include convolution gradients."""
    x = jnp.asarray(rng.normal(size=(6, 9, 2)))
    params = {
        "kernel": jnp.asarray(0.5 * rng.normal(size=(3, 2, 3))),
        "head": jnp.asarray(rng.normal(size=3)),
    }

    def loss(p, x):
        h = jax.lax.conv_general_dilated(
            x, p["kernel"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
        )
        return jnp.mean((jnp.tanh(h) @ p["head"] - 1.0) ** 2)

    return loss, params, x


def _dense_problem(rng):
    x = jnp.asarray(rng.normal(size=(12, 3)))
    params = {"w": jnp.asarray(rng.normal(size=(3, 4))), "v": jnp.asarray(rng.normal(size=4))}

    def loss(p, x):
        return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - 1.0) ** 2)

    return loss, params, x


def _product_loops(fn, *args):
    """``(length, unroll)`` of every scan (the fori_loop over the products) in fn's jaxpr."""
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    return [(e.params["length"], e.params["unroll"]) for e in eqns if e.primitive.name == "scan"]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("make_problem", [_conv_problem, _dense_problem])
def test_every_unroll_setting_gives_the_same_result(make_problem, rng):
    loss, params, x = make_problem(rng)
    key = jax.random.key(3)
    results = []
    for unroll in (None, False, 1, 2, 3, True):

        @jax.jit
        def measure(p, x, unroll=unroll):
            lam, v = optlab.hessian_top_eigenvalue(
                loss, p, x, key=key, iters=7, return_vector=True, unroll=unroll
            )
            trace = optlab.hessian_trace(loss, p, x, key=key, num_samples=5, unroll=unroll)
            return lam, v, trace

        results.append(measure(params, x))
    for lam, v, trace in results[1:]:
        np.testing.assert_allclose(lam, results[0][0], rtol=1e-13)
        np.testing.assert_allclose(trace, results[0][2], rtol=1e-13)
        for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(results[0][1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_unroll_is_passed_to_the_product_loop(rng):
    loss, params, x = _dense_problem(rng)
    key = jax.random.key(0)

    def top(unroll):
        return _product_loops(
            lambda p, x: optlab.hessian_top_eigenvalue(loss, p, x, key=key, iters=9, unroll=unroll),
            params,
            x,
        )

    assert top(True) == [(8, 8)]
    assert top(False) == top(1) == [(8, 1)]
    assert top(4) == [(8, 4)]
    trace = _product_loops(
        lambda p, x: optlab.hessian_trace(loss, p, x, key=key, num_samples=6, unroll=3), params, x
    )
    assert trace == [(6, 3)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the automatic rule is CPU-only")
def test_auto_unroll_unrolls_convolutions_on_cpu_up_to_the_limit(rng):
    from optlab.sharpness import AUTO_UNROLL_MAX_PRODUCTS as limit

    key = jax.random.key(0)
    conv_loss, conv_params, conv_x = _conv_problem(rng)
    dense_loss, dense_params, dense_x = _dense_problem(rng)

    def trace_loops(loss, params, x, n):
        return _product_loops(
            lambda p, x: optlab.hessian_trace(loss, p, x, key=key, num_samples=n), params, x
        )

    def top_loops(loss, params, x, n):
        return _product_loops(
            lambda p, x: optlab.hessian_top_eigenvalue(loss, p, x, key=key, iters=n), params, x
        )

    # Convolutions: fully unrolled up to the limit (also when the loss sits inside a jit).
    assert top_loops(conv_loss, conv_params, conv_x, 20) == [(19, 19)]
    assert trace_loops(conv_loss, conv_params, conv_x, limit) == [(limit, limit)]
    assert trace_loops(conv_loss, conv_params, conv_x, limit + 1) == [(limit + 1, 1)]
    jitted = jax.jit(lambda p, x: conv_loss(p, x))
    assert trace_loops(jitted, conv_params, conv_x, 4) == [(4, 4)]
    # No convolution: the loop stays rolled.
    assert top_loops(dense_loss, dense_params, dense_x, 20) == [(19, 1)]
    assert trace_loops(dense_loss, dense_params, dense_x, 4) == [(4, 1)]


@pytest.mark.parametrize("bad", [0, -2, 2.5, "yes"])
@pytest.mark.parametrize("fn", ["hessian_top_eigenvalue", "hessian_trace"])
def test_bad_unroll_raises_naming_the_argument(fn, bad):
    def loss(p, b):
        return jnp.sum(p**2)

    with pytest.raises(ValueError, match=r"unroll must be an integer >= 1 \(or True / False"):
        getattr(optlab, fn)(loss, jnp.ones(2), None, key=jax.random.key(0), unroll=bad)

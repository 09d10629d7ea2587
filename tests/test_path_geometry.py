"""optlab.path_geometry: RSI, EB, cosine and the locally optimal LR against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optlab

_geometry = jax.jit(optlab.path_geometry)


def _split(x):
    """Flat vectors of 6 (trailing axis) as a two-leaf pytree (a vector and a matrix)."""
    return {"a": x[..., :2], "b": x[..., 2:].reshape(*x.shape[:-1], 2, 2)}


def _numpy_geometry(g, d):
    """The paper's definitions on flat float64 vectors, as a plain re-statement."""
    inner, gn, dn = float(g @ d), float(np.sqrt(g @ g)), float(np.sqrt(d @ d))
    return {
        "rsi": inner / dn**2,
        "eb": gn / dn,
        "cosine": inner / (gn * dn),
        "optimal_lr": inner / gn**2,
        "inner": inner,
        "grad_norm": gn,
        "distance": dn,
    }


@pytest.mark.usefixtures("x64")
def test_quadratic_with_known_minimiser_matches_closed_form(rng):
    """f(w) = ½ (w − w*)ᵀ A (w − w*): G = A d, so RSI is the Rayleigh quotient of A at d,
    EB = ‖Ad‖/‖d‖, both inside [λmin, λmax] (the RSI/EB conditions with μ = λmin, L = λmax)
    along a whole gradient-descent path, and a step with ``optimal_lr`` shrinks ‖d‖² by
    exactly 1 − cosine²."""
    spectrum = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a = q @ np.diag(spectrum) @ q.T
    w_star = rng.normal(size=6)
    loss = lambda p: 0.5 * (_flat(p) - w_star) @ jnp.asarray(a) @ (_flat(p) - w_star)
    grad = jax.jit(jax.grad(loss))
    reference = _split(w_star)

    w = rng.normal(size=6)
    for _ in range(20):  # gradient descent at 1/λmax
        params = _split(w)
        geo = _geometry(grad(params), params, reference)
        assert geo.rsi.dtype == jnp.float64
        d = w - w_star
        g = a @ d  # the closed-form gradient, not jax.grad
        expected = _numpy_geometry(g, d)
        np.testing.assert_allclose(
            [float(v) for v in geo], [expected[k] for k in geo._fields], rtol=1e-12
        )
        np.testing.assert_allclose(expected["rsi"], (d @ a @ d) / (d @ d), rtol=1e-12)
        assert spectrum.min() - 1e-12 <= float(geo.rsi) <= float(geo.eb) <= spectrum.max() + 1e-12
        assert float(geo.cosine) > 0
        step = d - float(geo.optimal_lr) * g
        np.testing.assert_allclose(step @ step, (1 - float(geo.cosine) ** 2) * (d @ d), rtol=1e-10)
        w = w - g / spectrum.max()

    # Along an eigenvector: RSI = EB = λ, cosine 1, optimal_lr 1/λ (one step lands on w*).
    params = _split(w_star + 3.0 * q[:, 1])
    geo = _geometry(grad(params), params, reference)
    np.testing.assert_allclose([geo.rsi, geo.eb, geo.cosine, geo.optimal_lr], [2, 2, 1, 0.5])


def _flat(p):
    return jnp.concatenate([p["a"], p["b"].reshape(-1)])


def test_finite_at_the_reference_and_for_a_zero_gradient():
    w = _split(np.arange(6.0, dtype=np.float32))
    zero = _split(np.zeros(6, np.float32))
    at_reference = _geometry(_split(np.ones(6, np.float32)), w, w)
    assert [float(v) for v in at_reference] == [0, 0, 0, 0, 0, pytest.approx(6**0.5), 0]
    zero_grad = _geometry(zero, w, zero)
    assert [float(v) for v in zero_grad[:5]] == [0, 0, 0, 0, 0]
    # No NaN in the derivative either (the ratios' denominators are guarded with where).
    dgeo = jax.jit(jax.grad(lambda p: sum(optlab.path_geometry(p, p, w)[:4])))(w)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(dgeo))


def test_weight_decay_traced_vmap_and_low_precision(rng):
    g, w, r = (_split(rng.normal(size=(3, 6)).astype(np.float32)) for _ in range(3))
    first = lambda i, trees=(g, w, r): jax.tree.map(lambda x: x[i], trees)
    lam = 0.3
    with_wd = _geometry(*first(0), weight_decay=np.float32(lam))  # traced by jit
    g_wd = jax.tree.map(lambda a, b: a + lam * b, *first(0)[:2])
    np.testing.assert_allclose(list(with_wd), list(_geometry(g_wd, *first(0)[1:])), rtol=1e-6)
    # vmap over runs equals one run at a time.
    stacked = jax.jit(jax.vmap(optlab.path_geometry))(g, w, r)
    for i in range(3):
        np.testing.assert_allclose([s[i] for s in stacked], list(_geometry(*first(i))), rtol=1e-6)
    # bfloat16 leaves accumulate in float32.
    low = _geometry(*jax.tree.map(lambda x: x.astype(jnp.bfloat16), first(0)))
    assert low.cosine.dtype == jnp.float32
    np.testing.assert_allclose(low.cosine, _geometry(*first(0)).cosine, atol=2e-2)


def test_bad_arguments_raise():
    w = {"a": jnp.ones(2), "b": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="reference must have the structure of grads"):
        optlab.path_geometry(w, w, {"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="params must have the structure of grads"):
        optlab.path_geometry(w, [jnp.ones(2), jnp.ones((2, 2))], w)
    with pytest.raises(ValueError, match="equal leaf shapes"):
        optlab.path_geometry(w, {"a": jnp.ones(3), "b": jnp.ones((2, 2))}, w)
    with pytest.raises(ValueError, match="floating-point"):
        optlab.path_geometry(w, w, {"a": jnp.ones(2, jnp.int32), "b": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="weight_decay must lie in"):
        optlab.path_geometry(w, w, w, weight_decay=-0.1)

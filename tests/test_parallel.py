"""optlab.parallel: data-parallel gradients equal the single-device gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import optlab
from optlab.parallel import is_manual_axis, pmean


def _loss(w, x):
    return jnp.mean(jnp.tanh(x @ w["a"]) @ w["b"])


def _problem():
    k = jax.random.split(jax.random.key(0), 3)
    w = {"a": jax.random.normal(k[0], (5, 4)), "b": jax.random.normal(k[1], (4,))}
    x = jax.random.normal(k[2], (16, 5))
    return w, x


def _mesh(n=8):
    return jax.make_mesh(
        (n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
    )


def test_shard_map_gradient_equals_single_device():
    w, x = _problem()
    ref_value, ref_grad = jax.value_and_grad(_loss)(w, x)
    fn = jax.jit(
        jax.shard_map(
            optlab.data_parallel_value_and_grad(_loss, "data"),
            mesh=_mesh(),
            in_specs=(P(), P("data")),
            out_specs=P(),
        )
    )
    value, grad = fn(w, x)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad, ref_grad
    )


def test_without_pvary_shard_map_overcounts():
    """Documents the trap the helper exists for: a plain grad + pmean is 8x too large."""
    w, x = _problem()
    ref = jax.grad(_loss)(w, x)

    def naive(w, x):
        return jax.lax.pmean(jax.grad(_loss)(w, x), "data")

    out = jax.jit(jax.shard_map(naive, mesh=_mesh(), in_specs=(P(), P("data")), out_specs=P()))(
        w, x
    )
    np.testing.assert_allclose(out["b"], 8 * ref["b"], rtol=1e-5)


def test_vmap_simulation_equals_shard_map_and_reference():
    w, x = _problem()
    ref = jax.grad(_loss)(w, x)
    fn = optlab.data_parallel_value_and_grad(_loss, "data")
    _, g_vmap = jax.vmap(fn, in_axes=(None, 0), axis_name="data")(w, x.reshape(8, 2, 5))
    # Every simulated worker holds the same averaged gradient.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a, np.broadcast_to(b, a.shape), rtol=1e-5, atol=1e-6
        ),
        g_vmap,
        ref,
    )


def test_local_gradient_without_average_is_per_worker():
    w, x = _problem()
    fn = optlab.data_parallel_value_and_grad(_loss, "data", average=False)
    sharded = jax.jit(
        jax.shard_map(
            lambda w, x: fn(w, x)[1], mesh=_mesh(), in_specs=(P(), P("data")), out_specs=P("data")
        )
    )
    g = sharded(w, x)
    for i in range(8):
        ref = jax.grad(_loss)(w, x[2 * i : 2 * i + 2])
        np.testing.assert_allclose(g["b"][4 * i : 4 * i + 4], ref["b"], rtol=1e-5, atol=1e-6)


def test_pvary_is_identity_outside_shard_map_and_idempotent_inside():
    w, _ = _problem()
    assert optlab.pvary(w, "data") is w
    assert optlab.pvary(w, None) is w
    assert pmean(w, None) is w

    def body(v):
        assert is_manual_axis("data")
        once = optlab.pvary(v, "data")
        twice = optlab.pvary(once, "data")  # already varying: must not raise
        return pmean(twice, "data")

    out = jax.jit(jax.shard_map(body, mesh=_mesh(), in_specs=P(), out_specs=P()))(w)
    # pmean of 8 equal values is the value up to one rounding of the sum.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out, w)


def test_not_manual_under_vmap():
    def body(v):
        assert not is_manual_axis("data")
        return v

    jax.vmap(body, axis_name="data")(jnp.ones(4))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_any_device_count(n):
    w, x = _problem()
    ref = jax.grad(_loss)(w, x)
    fn = jax.jit(
        jax.shard_map(
            optlab.data_parallel_value_and_grad(_loss, "data"),
            mesh=_mesh(n),
            in_specs=(P(), P("data")),
            out_specs=P(),
        )
    )
    _, g = fn(w, x)
    np.testing.assert_allclose(g["a"], ref["a"], rtol=1e-5, atol=1e-6)

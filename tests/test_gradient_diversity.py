"""optlab.gradient_diversity: against a direct float64 loop, streaming, chunked, sharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import optlab

N = 8  # examples: divisible by 1, 2 and 4 devices, and by chunks of 4 (with a remainder at 3)


def _loss(params, example):
    """A tiny two-layer network on one example (tanh hidden layer, squared error)."""
    hidden = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
    return 0.5 * jnp.sum((hidden @ params["w2"] - example["y"]) ** 2)


def _problem(rng, dtype=np.float64):
    params = {
        "w1": rng.normal(size=(3, 4)),
        "b1": rng.normal(size=4),
        "w2": rng.normal(size=(4, 2)),
    }
    batch = {"x": rng.normal(size=(N, 3)), "y": rng.normal(size=(N, 2))}
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)
    return cast(params), cast(batch)


def _reference(params, batch) -> float:
    """Σ‖g_i‖² / ‖Σ g_i‖² by a loop over examples, with the gradients derived by hand."""
    w1, b1, w2 = (np.asarray(params[k], np.float64) for k in ("w1", "b1", "w2"))
    grads = []
    for x, y in zip(np.asarray(batch["x"]), np.asarray(batch["y"]), strict=True):
        h = np.tanh(x @ w1 + b1)
        r = h @ w2 - y
        dz = (w2 @ r) * (1 - h**2)
        grads.append(np.concatenate([np.outer(x, dz).ravel(), dz, np.outer(h, r).ravel()]))
    numerator = sum(float(g @ g) for g in grads)
    total = np.sum(grads, axis=0)
    return numerator / float(total @ total)


@pytest.mark.usefixtures("x64")
def test_diversity_streaming_and_chunking_equal_the_direct_loop(rng):
    params, batch = _problem(rng)
    expected = _reference(params, batch)

    @jax.jit  # one compile for every variant
    def variants(params, batch):
        grads = optlab.per_example_grads(_loss, params, batch)
        # Chunked: full chunks only (4), and chunks with a remainder (3).
        chunked = [optlab.per_example_grads(_loss, params, batch, chunk_size=c) for c in (4, 3)]
        # Streaming over two batches of unequal size (5 + 3), the first in chunks of 2
        # (with a remainder), the second from explicit per-example gradients.
        acc = optlab.gradient_diversity_init(params)
        first = jax.tree.map(lambda a: a[:5], batch)
        rest = jax.tree.map(lambda a: a[5:], batch)
        acc = optlab.gradient_diversity_update_from_loss(acc, _loss, params, first, chunk_size=2)
        acc = optlab.gradient_diversity_update(acc, optlab.per_example_grads(_loss, params, rest))
        diversity = optlab.gradient_diversity(grads)
        return grads, chunked, acc, diversity, optlab.gradient_diversity_result(acc)

    grads, chunked, acc, diversity, streamed = variants(params, batch)
    np.testing.assert_allclose(float(diversity), expected, rtol=1e-12)
    np.testing.assert_allclose(float(streamed), expected, rtol=1e-12)
    assert int(acc.count) == N
    assert acc.sum_sq_norms.dtype == jnp.float64
    for other in chunked:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-13), other, grads)


def test_known_values_and_zero_gradients():
    @jax.jit
    def values(trees):
        return [optlab.gradient_diversity(t) for t in trees]

    same = {"w": jnp.ones((4, 3))}  # identical gradients: the lower bound 1/n
    zero = {"w": jnp.zeros((4, 3))}
    cancel = {"w": jnp.array([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0], [0.0] * 3, [0.0] * 3])}
    low, nothing, large = (float(v) for v in values([same, zero, cancel]))
    np.testing.assert_allclose(low, 0.25, rtol=1e-6)
    assert nothing == 0.0
    assert np.isfinite(large)  # gradients summing to exactly zero: large, finite
    assert large > 1e30
    empty = optlab.gradient_diversity_init({"w": jnp.zeros(3, jnp.bfloat16)})
    assert empty.sum_sq_norms.dtype == jnp.float32  # accumulates bf16 in float32
    assert float(optlab.gradient_diversity_result(empty)) == 0.0


@pytest.mark.usefixtures("x64")
def test_shard_map_over_1_2_4_devices_equals_one_device(rng):
    """Each device accumulates its own examples; psum of both parts before the ratio."""
    params, batch = _problem(rng)
    expected = _reference(params, batch)
    for devices in (1, 2, 4):
        mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:devices])  # fmt: skip

        def body(params, batch):
            acc = optlab.gradient_diversity_init(params)
            acc = optlab.gradient_diversity_update_from_loss(
                acc, _loss, params, batch, axis_name="data"
            )
            from_acc = optlab.gradient_diversity_result(acc, axis_name="data")
            grads = optlab.per_example_grads(_loss, params, batch, axis_name="data")
            return from_acc, optlab.gradient_diversity(grads, axis_name="data")

        sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
        for value in sharded(params, batch):
            np.testing.assert_allclose(float(value), expected, rtol=1e-12)
    # The same under vmap with an axis name (a simulation of 4 devices on one).
    split = jax.tree.map(lambda a: a.reshape(4, N // 4, *a.shape[1:]), batch)

    @jax.jit
    def simulated(params, split):
        grads = jax.vmap(lambda b: optlab.per_example_grads(_loss, params, b))(split)
        return jax.vmap(lambda g: optlab.gradient_diversity(g, axis_name="d"), axis_name="d")(grads)

    values = simulated(params, split)
    np.testing.assert_allclose(np.asarray(values), expected, rtol=1e-12)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="chunk_size"):
        optlab.per_example_grads(_loss, {}, {"x": jnp.zeros((2, 3))}, chunk_size=0)
    with pytest.raises(ValueError, match="leading example axis"):
        optlab.gradient_diversity({"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,))})
    with pytest.raises(ValueError, match="at least one array"):
        optlab.gradient_diversity({})

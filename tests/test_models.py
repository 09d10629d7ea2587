"""Tests for experiments.models: shapes, parameter counts, BatchNorm state, jit, gradients.

Initialising a model compiles one random-number kernel per distinct parameter shape, which
dominates the run time on CPU (threefry kernels compile slowly), so shape-only checks use
``jax.eval_shape``, and tests that need real parameters share a few small configurations
through a cache, initialised under ``jit`` from an ``rbg`` key (any PRNG key works).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.models import (
    MLP,
    Model,
    ResNet,
    ResNet20,
    SmallCNN,
    make_model,
    model_names,
    param_count,
)

SHAPES = {
    "digits": (4, 8, 8, 1),
    "signal": (4, 40, 1),
    "cifar": (2, 32, 32, 3),
}
CASES = [
    ("mlp", "digits"),
    ("mlp", "signal"),
    ("mlp", "cifar"),
    ("cnn", "digits"),
    ("cnn", "signal"),
    ("cnn", "cifar"),
    ("resnet20", "cifar"),
]
# Small variants with the same code paths as the defaults, for tests that compute.
SMALL: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": (32,)},
    "cnn": {"features": (8, 16), "dense": 32},
    "resnet20": {"width": 4, "num_blocks": (1, 1, 1)},
}


@functools.cache
def _init_cached(name: str, example_shape: tuple[int, ...], kwargs: tuple):
    model = make_model(name, num_classes=10, **dict(kwargs))
    key = jax.random.key(0, impl="rbg")
    params, state = jax.jit(model.init)(key, jnp.zeros((1, *example_shape)))
    return model, params, state


def _init(name: str, data: str, **kwargs):
    """A (cached) small model of kind ``name`` and a random batch shaped like ``data``."""
    shape = SHAPES[data]
    kwargs = {**SMALL[name], **kwargs}
    model, params, state = _init_cached(name, shape[1:], tuple(sorted(kwargs.items())))
    x = jax.random.normal(jax.random.key(1), shape)
    return model, params, state, x


@functools.cache
def _jit_apply(model: Model):
    """One jitted ``apply`` per model, shared by tests so equal shapes compile once."""
    return jax.jit(model.apply, static_argnames="train")


def _abstract_init(name: str, shape: tuple[int, ...], **kwargs):
    """Shapes and dtypes only (no compilation, no compute): cheap even for ResNet-20."""
    model = make_model(name, num_classes=10, **kwargs)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    params, state = jax.eval_shape(model.init, jax.random.key(0), x)
    return model, params, state, x


def _cache_size(jitted) -> int:
    """Number of compiled entries of a ``jax.jit`` function (private JAX API)."""
    return int(jitted._cache_size())


def _same_structure(a, b) -> bool:
    return bool(jax.tree.structure(a) == jax.tree.structure(b))  # type: ignore[operator]


def _tree_equal(a, b) -> bool:
    return _same_structure(a, b) and all(
        bool(jnp.all(u == v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize(("name", "data"), CASES)
def test_output_shape_and_dtype(name, data):
    model, params, state, x = _abstract_init(name, SHAPES[data])
    for train in (False, True):
        logits, new_state = jax.eval_shape(
            lambda p, s, x: model.apply(p, s, x, train=train), params, state, x
        )
        assert logits.shape == (x.shape[0], 10)
        assert logits.dtype == jnp.float32
        assert _same_structure(new_state, state)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_param_counts():
    _, p, s, _ = _abstract_init("mlp", SHAPES["digits"])
    assert param_count(p) == (64 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10)
    assert s == {}
    _, p, s, _ = _abstract_init("cnn", SHAPES["digits"])
    # conv 3x3x1x32, conv 3x3x32x64, 8x8 -> 2x2 after two pools, dense 256->128, head.
    assert param_count(p) == (9 * 32 + 32) + (9 * 32 * 64 + 64) + (256 * 128 + 128) + 1290
    assert s == {}
    _, p, s, _ = _abstract_init("resnet20", SHAPES["cifar"])
    assert 260_000 <= param_count(p) <= 280_000  # He et al. (2016): 0.27M
    assert set(s) == {"batch_stats"}
    _, p_b, _, _ = _abstract_init("resnet20", SHAPES["cifar"], shortcut="B")
    # Option B adds two 1x1 projections (16->32, 32->64) with their BatchNorm scales/biases.
    assert param_count(p_b) - param_count(p) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def test_cnn_kernel_rank_and_tiny_spatial_dims():
    model = SmallCNN(num_classes=3, features=(8, 8, 8))
    key = jax.random.key(0)
    # 1-D: 3 -> 2 -> 1 -> 1, pooling never reaches 0.
    x = jax.ShapeDtypeStruct((2, 3, 1), jnp.float32)
    variables = jax.eval_shape(model.init, key, x)
    assert variables["params"]["conv_0"]["kernel"].shape == (3, 1, 8)
    assert variables["params"]["dense"]["kernel"].shape == (8, 128)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 3)
    # 2-D: 8x8 -> 4x4 -> 2x2 -> 1x1.
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    variables = jax.eval_shape(model.init, key, x)
    assert variables["params"]["conv_0"]["kernel"].shape == (3, 3, 1, 8)
    assert variables["params"]["dense"]["kernel"].shape == (8, 128)
    # Default CNN on MNIST-1D-like signals: 40 -> 20 -> 10.
    variables = jax.eval_shape(
        SmallCNN(10).init, key, jax.ShapeDtypeStruct((1, 40, 1), jnp.float32)
    )
    assert variables["params"]["dense"]["kernel"].shape == (10 * 64, 128)
    with pytest.raises(ValueError, match="SmallCNN expects"):
        jax.eval_shape(model.init, key, jax.ShapeDtypeStruct((1, 2, 2, 2, 1), jnp.float32))


def test_resnet_general_depth():
    example = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    n_params = {}
    for depth in (8, 20, 32):
        module = ResNet(depth, num_classes=10, width=4)
        assert tuple(module.num_blocks) == ((depth - 2) // 6,) * 3
        variables = jax.eval_shape(module.init, jax.random.key(0), example)
        n_params[depth] = param_count(variables["params"])
    assert n_params[8] < n_params[20] < n_params[32]
    count = lambda module: param_count(jax.eval_shape(module.init, jax.random.key(0), example))
    assert count(ResNet(20, num_classes=10)) == count(ResNet20(num_classes=10))
    with pytest.raises(ValueError, match=r"6n \+ 2"):
        ResNet(21, num_classes=10)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_batchnorm_state_train_vs_eval(shortcut):
    model, params, state, x = _init("resnet20", "cifar", shortcut=shortcut)
    x = x * 3.0 + 1.0  # batch statistics far from the initial (mean 0, var 1)
    apply = _jit_apply(model)
    _, train_state = apply(params, state, x, train=True)
    assert _same_structure(train_state, state)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state, train_state)
    assert all(jax.tree.leaves(changed))
    _, eval_state = apply(params, train_state, x, train=False)
    assert _tree_equal(eval_state, train_state)
    returned_same_object = []

    def eval_apply(params, state, x):
        logits, new_state = model.apply(params, state, x, train=False)
        returned_same_object.append(new_state is state)
        return logits

    jax.eval_shape(eval_apply, params, train_state, x)
    assert returned_same_object == [True]


def test_batchnorm_momentum():
    model, params, state, x = _init("resnet20", "cifar")
    x = x * 2.0 + 0.5
    _, new_state = _jit_apply(model)(params, state, x, train=True)
    # The stem BN sees conv(x); recompute that batch mean independently.
    h = jax.lax.conv_general_dilated(
        x,
        params["stem_conv"]["kernel"],
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    stem = new_state["batch_stats"]["stem_bn"]
    # momentum 0.9 from the initial (mean 0, var 1): new = 0.9 * old + 0.1 * batch statistic
    np.testing.assert_allclose(
        stem["mean"], 0.1 * jnp.mean(h, axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        stem["var"], 0.9 + 0.1 * jnp.var(h, axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    ("name", "data"), [("mlp", "digits"), ("cnn", "digits"), ("resnet20", "cifar")]
)
def test_eval_is_deterministic(name, data):
    model, params, state, x = _init(name, data)
    evaluate = jax.jit(lambda p, s, x, r: model.apply(p, s, x, train=False, rng=r)[0])
    a = evaluate(params, state, x, jax.random.key(7))
    b = evaluate(params, state, x, jax.random.key(8))  # the rng must not matter in eval mode
    c = evaluate(params, state, x, jax.random.key(7))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert bool(jnp.all(jnp.isfinite(a)))


def test_init_is_deterministic_and_batch_independent():
    # Default (threefry) keys; the same parameter shapes as the dropout and overfitting tests.
    model = make_model("mlp", num_classes=4, hidden=(64,))
    p1, s1 = model.init(jax.random.key(0), jnp.ones((4, 16)))
    p2, s2 = model.init(jax.random.key(0), jnp.zeros((64, 16)))
    assert _tree_equal(p1, p2)
    assert s1 == s2 == {}
    p3, _ = model.init(jax.random.key(1), jnp.ones((4, 16)))
    assert not _tree_equal(p1, p3)


def test_dropout_uses_rng():
    model = make_model("mlp", num_classes=4, hidden=(64,), dropout_rate=0.5)
    x = jnp.ones((4, 16))
    params, state = model.init(jax.random.key(0), x)
    a, _ = model.apply(params, state, x, train=True, rng=jax.random.key(1))
    b, _ = model.apply(params, state, x, train=True, rng=jax.random.key(2))
    c, _ = model.apply(params, state, x, train=True, rng=jax.random.key(1))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    e1, _ = model.apply(params, state, x, train=False)
    e2, _ = model.apply(params, state, x, train=False)
    np.testing.assert_array_equal(e1, e2)


def test_jit_traces_once():
    model, params, state, x = _init("mlp", "digits")
    traces = []

    @jax.jit
    def step(params, state, x):
        traces.append(1)
        return model.apply(params, state, x, train=True)

    logits1, state1 = step(params, state, x)
    step(params, state1, x + 1.0)
    assert len(traces) == 1
    assert _cache_size(step) == 1
    eager, _ = model.apply(params, state, x, train=True)
    np.testing.assert_allclose(logits1, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "data"), [("cnn", "digits"), ("resnet20", "cifar")])
def test_jit_no_recompilation(name, data):
    model, params, state, x = _init(name, data)
    apply = _jit_apply(model)
    _, state1 = apply(params, state, x, train=True)
    cache_size = _cache_size(apply)
    _, state2 = apply(params, state1, x + 1.0, train=True)  # new values, same shapes
    assert _cache_size(apply) == cache_size
    assert _same_structure(state2, state)


@pytest.mark.parametrize(
    ("name", "data"), [("mlp", "digits"), ("cnn", "digits"), ("resnet20", "cifar")]
)
def test_gradients_finite(name, data):
    model, params, state, x = _init(name, data)
    labels = jnp.arange(x.shape[0]) % 10

    @jax.jit
    def loss_and_grad(params):
        def loss_fn(params):
            logits, new_state = model.apply(params, state, x, train=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new_state

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, _), grads = loss_and_grad(params)
    assert bool(jnp.isfinite(loss))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0.0
    assert _same_structure(grads, params)


def test_bfloat16_compute():
    model, params, state, x = _init("cnn", "digits")
    module_bf16 = SmallCNN(num_classes=10, dtype=jnp.bfloat16, **SMALL["cnn"])
    logits, _ = Model(module_bf16, "cnn_bf16").apply(params, state, x, train=False)
    assert logits.dtype == jnp.bfloat16
    reference, _ = model.apply(params, state, x, train=False)
    np.testing.assert_allclose(logits.astype(jnp.float32), reference, rtol=0.1, atol=0.1)


def test_make_model_unknown_name_lists_names():
    with pytest.raises(ValueError, match="unknown model name 'vgg'") as info:
        make_model("vgg", num_classes=10)
    for name in ("mlp", "cnn", "resnet20"):
        assert name in str(info.value)
    assert {"mlp", "cnn", "resnet20"} <= set(model_names())


def test_registry_module_types_and_activation_check():
    assert isinstance(make_model("mlp", 3).module, MLP)
    assert isinstance(make_model("cnn", 3).module, SmallCNN)
    assert isinstance(make_model("resnet20", 3).module, ResNet20)
    assert make_model("resnet56", 3).module.num_blocks == (9, 9, 9)
    example = jax.ShapeDtypeStruct((1, 4), jnp.float32)
    with pytest.raises(ValueError, match="activation"):
        jax.eval_shape(make_model("mlp", 3, activation="nope").init, jax.random.key(0), example)


def test_mlp_overfits_random_labels():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=32))
    model = make_model("mlp", num_classes=4, hidden=(64,))
    params, state = model.init(jax.random.key(0), x)
    tx = optax.adam(1e-2)

    def loss_fn(params):
        logits, _ = model.apply(params, state, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), length=200)
        return params, losses

    params, losses = train(params)
    logits, _ = model.apply(params, state, x, train=False)
    assert float(jnp.mean(jnp.argmax(logits, -1) == y)) == 1.0
    assert float(losses[-1]) < 0.05 < float(losses[0])

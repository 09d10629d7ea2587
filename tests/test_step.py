"""The jitted train step: data parallel equals single device; extra args; no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.train import init_train_state, make_step_fn, make_train_step


def _loss_fn(params, model_state, batch, rng):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    logits = h @ params["w2"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    # A running statistic stands in for BatchNorm: averaged over workers like the loss.
    new_state = {"mean_x": 0.9 * model_state["mean_x"] + 0.1 * batch["x"].mean(0)}
    return loss, (new_state, {"accuracy": acc})


def _setup(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(1), 4)
    params = {
        "w1": jax.random.normal(k[0], (6, 8), dtype),
        "b1": jnp.zeros((8,), dtype),
        "w2": jax.random.normal(k[1], (8, 3), dtype),
    }
    model_state = {"mean_x": jnp.zeros((6,), dtype)}
    rs = np.random.default_rng(0)
    batches = [
        {"x": rs.normal(size=(32, 6)).astype(dtype), "y": rs.integers(0, 3, 32).astype(np.int32)}
        for _ in range(4)
    ]
    return params, model_state, batches


def _extragradient(lr):
    """A tiny GradientTransformationExtraArgs that needs grad_fn (EXTRAP-style)."""

    def init(params):
        return optax.EmptyState()

    def update(grads, state, params, *, grad_fn, **extra):
        lookahead = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return jax.tree.map(lambda g: -lr * g, grad_fn(lookahead)), state

    return optax.GradientTransformationExtraArgs(init, update)


def _run(tx, num_devices, dtype=jnp.float32):
    params, model_state, batches = _setup(dtype)
    compiled = make_train_step(_loss_fn, tx, num_devices=num_devices)
    state = compiled.put_state(init_train_state(params, model_state, tx, jax.random.key(0)))
    history = []
    for batch in batches:
        state, metrics = compiled.step(state, compiled.put_batch(batch))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


@pytest.mark.parametrize("tx_name", ["sgd", "momentum", "adam", "extragradient", "clip_chain"])
@pytest.mark.parametrize("num_devices", [2, 8])
def test_data_parallel_step_equals_single_device(x64, tx_name, num_devices):
    tx = {
        "sgd": optax.sgd(0.1),
        "momentum": optax.sgd(0.1, momentum=0.9),
        "adam": optax.adam(1e-2),
        "extragradient": _extragradient(0.1),
        "clip_chain": optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1)),
    }[tx_name]
    ref_state, ref_hist = _run(tx, 1, jnp.float64)
    state, hist = _run(tx, num_devices, jnp.float64)
    assert state.params["w1"].dtype == np.float64
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13),
        state.params,
        ref_state.params,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13),
        state.model_state,
        ref_state.model_state,
    )
    for m, r in zip(hist, ref_hist, strict=True):
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-12)
        np.testing.assert_allclose(m["accuracy"], r["accuracy"], rtol=1e-12)
    assert int(state.step) == 4


def test_data_parallel_float32_close():
    tx = optax.adam(1e-2)
    ref_state, _ = _run(tx, 1)
    state, _ = _run(tx, 8)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        state.params,
        ref_state.params,
    )


def test_grad_fn_and_value_fn_are_the_loss_at_given_params():
    params, model_state, batches = _setup()
    seen = {}

    def probe():
        def update(grads, state, params, *, grad_fn, value_fn, value, grad, **extra):
            seen["grad_match"] = jax.tree.map(
                lambda a, b: jnp.max(jnp.abs(a - b)), grad_fn(params), grads
            )
            seen["value_match"] = jnp.abs(value_fn(params) - value)
            seen["grad_is_grads"] = grad is grads
            return jax.tree.map(jnp.zeros_like, grads), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    tx = probe()
    state = init_train_state(params, model_state, tx, jax.random.key(0))
    step = make_step_fn(_loss_fn, tx)
    new_state, _ = step(state, batches[0])  # eager: concrete values
    assert max(jax.tree.leaves(seen["grad_match"])) == 0
    assert seen["value_match"] == 0
    assert seen["grad_is_grads"]
    jax.tree.map(np.testing.assert_array_equal, new_state.params, params)


def test_no_recompilation_after_first_step():
    tx = optax.adam(1e-2)
    params, model_state, batches = _setup()
    compiled = make_train_step(_loss_fn, tx)
    state = compiled.put_state(init_train_state(params, model_state, tx, jax.random.key(0)))
    state, _ = compiled.step(state, compiled.put_batch(batches[0]))
    size = compiled.step._cache_size()
    for batch in batches[1:]:
        state, _ = compiled.step(state, compiled.put_batch(batch))
    assert compiled.step._cache_size() == size == 1


def test_nonfinite_step_is_recorded_on_device():
    params, model_state, batches = _setup()
    batches[2]["x"][0, 0] = np.nan  # the loss of step 2 is NaN, and stays so after it
    tx = optax.sgd(0.1)
    compiled = make_train_step(_loss_fn, tx)
    state = compiled.put_state(init_train_state(params, model_state, tx, jax.random.key(0)))
    for i, batch in enumerate(batches):
        state, metrics = compiled.step(state, compiled.put_batch(batch))
        assert np.isfinite(float(metrics["loss"])) == (i < 2)
        assert int(state.first_nonfinite_step) == (-1 if i < 2 else 2)


def test_batch_must_divide_devices():
    compiled = make_train_step(_loss_fn, optax.sgd(0.1), num_devices=8)
    with pytest.raises(ValueError, match="batch_size must be divisible by devices=8"):
        compiled.put_batch({"x": np.zeros((12, 6), np.float32), "y": np.zeros(12, np.int32)})


def test_too_many_devices_is_a_clear_error():
    with pytest.raises(ValueError, match=r"devices must be in \[1, 8\]"):
        make_train_step(_loss_fn, optax.sgd(0.1), num_devices=9)


@pytest.mark.parametrize("num_devices", [1, 4])
def test_donation_never_deletes_the_callers_arrays(num_devices):
    params, model_state, batches = _setup()
    tx = optax.sgd(0.1)
    compiled = make_train_step(_loss_fn, tx, num_devices=num_devices)
    for _ in range(2):  # the same params start two runs, as a notebook or a sweep does
        state = compiled.put_state(init_train_state(params, model_state, tx, jax.random.key(0)))
        state, _ = compiled.step(state, compiled.put_batch(batches[0]))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))
    np.testing.assert_array_equal(params["b1"], np.zeros(8, np.float32))

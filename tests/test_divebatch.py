"""optlab.divebatch: the DiveBatch rule written out, AdaBatch, learning-rate rescaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optlab


def _rule(diversity, old, *, n, delta, b_min, b_max, multiple_of):
    """The rule as the public DiveBatch code writes it, plus the rounding to micro-batches."""
    if math.isnan(diversity) or math.isinf(diversity):
        new = b_max
    else:
        new = int(min(max(delta * diversity * n, old), b_max))
    new = max(min(new, b_max), b_min)
    return max((new // multiple_of) * multiple_of, old)


def test_controller_equals_the_rule_written_out():
    kw = {"n": 1000, "delta": 0.05, "b_min": 16, "b_max": 256, "multiple_of": 16}
    ctrl = optlab.divebatch(
        1000, delta=0.05, min_batch_size=16, max_batch_size=256, resize_every=3, multiple_of=16
    )
    diversities = [0.1, 9.0, 0.5, 1.0, 0.2, 2.3, 0.0, 1e-3, 4.9, 1.0, 1.0, float("nan")]
    end_epoch = jax.jit(ctrl.end_epoch)  # one compile for every epoch
    state, batch, sizes = ctrl.init(16), 16, []
    for epoch, div in enumerate(diversities, start=1):
        state = end_epoch(state, div)
        if epoch % 3 == 0:
            batch = _rule(div, batch, **kw)
        assert int(state.batch_size) == batch
        assert int(state.epoch) == epoch
        sizes.append(batch)
    # 25 -> 16 (rounded down), 115 -> 112, 245 -> 240, NaN -> B_max; off-resize epochs ignored.
    assert sizes == [16] * 5 + [112] * 3 + [240] * 3 + [256]
    assert end_epoch._cache_size() == 1
    # The bare rule: huge and infinite diversities saturate at B_max, the batch never shrinks.
    for div, old in [(1e30, 16), (float("inf"), 16), (0.0, 64), (-1.0, 32), (0.33, 16)]:
        assert int(ctrl.batch_size_for(div, old)) == _rule(div, old, **kw)


def test_adabatch_schedule_and_lr_scale():
    got = [
        optlab.adabatch_batch_size(e, initial_batch_size=16, max_batch_size=100, every=3)
        for e in range(12)
    ]
    assert got == [16] * 3 + [32] * 3 + [64] * 3 + [100] * 3
    assert optlab.adabatch_batch_size(10**6, initial_batch_size=8, max_batch_size=64, every=1) == 64
    got = [
        optlab.adabatch_batch_size(e, initial_batch_size=2, max_batch_size=50, every=1, factor=3)
        for e in range(5)
    ]
    assert got == [2, 6, 18, 50, 50]
    assert optlab.lr_scale(128, 32) == 4.0
    assert optlab.lr_scale(128, 32, "sqrt") == 2.0
    assert float(optlab.lr_scale(jnp.int32(64), 32, "none")) == 1.0


def test_scale_by_batch_size_in_a_chain_under_a_donating_jit_and_nnx():
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), optlab.scale_by_batch_size(32, "sqrt"))

    def step(params, state, grads, batch_size):
        updates, state = tx.update(grads, state, params, batch_size=batch_size)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    params, grads = {"w": jnp.zeros(2)}, {"w": jnp.array([1.0, -2.0])}
    state = tx.init(params)
    # Reference: SGD with momentum whose learning rate is 0.1 * sqrt(B / 32) at each step.
    trace, expected = np.zeros(2), np.zeros(2)
    for batch_size in (32, 128, 512):
        params, state = step(params, state, grads, jnp.int32(batch_size))
        trace = 0.9 * trace + np.asarray(grads["w"])
        expected = expected - 0.1 * math.sqrt(batch_size / 32) * trace
        np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=1e-6)
    assert step._cache_size() == 1  # the batch size is traced: no recompilation
    # Without the extra argument the updates pass unchanged; behind nnx.Optimizer too.
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(
        model, optax.chain(optax.sgd(1.0), optlab.scale_by_batch_size(8)), wrt=nnx.Param
    )
    before = np.asarray(model.kernel[...])
    ones = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    opt.update(model, ones, batch_size=jnp.int32(16))
    np.testing.assert_allclose(np.asarray(model.kernel[...]), before - 2.0, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": float("nan")}, "delta"),
        ({"min_batch_size": 0}, "min_batch_size"),
        ({"max_batch_size": 8}, "max_batch_size"),
        ({"resize_every": 0}, "resize_every"),
        ({"multiple_of": 0}, "multiple_of"),
        ({"multiple_of": 5}, "must be a multiple of multiple_of"),
        ({"min_batch_size": 16.0}, "min_batch_size"),
    ],
)
def test_bad_controller_arguments_raise(kwargs, match):
    args = {"delta": 0.1, "min_batch_size": 16, "max_batch_size": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        optlab.divebatch(100, **args)


def test_other_bad_arguments_raise():
    ctrl = optlab.divebatch(100, delta=0.1, min_batch_size=16, max_batch_size=64)
    with pytest.raises(ValueError, match="batch_size"):
        ctrl.init(8)
    with pytest.raises(ValueError, match="num_examples"):
        optlab.divebatch(0, delta=0.1, min_batch_size=1, max_batch_size=2)
    with pytest.raises(ValueError, match="lr_scaling"):
        optlab.scale_by_batch_size(32, "square")
    with pytest.raises(ValueError, match="lr_scaling"):
        optlab.lr_scale(64, 32, "cubic")
    with pytest.raises(ValueError, match="base_batch_size"):
        optlab.scale_by_batch_size(0)
    with pytest.raises(ValueError, match="factor"):
        optlab.adabatch_batch_size(0, initial_batch_size=8, max_batch_size=64, every=1, factor=1)
    with pytest.raises(ValueError, match="max_batch_size"):
        optlab.adabatch_batch_size(0, initial_batch_size=8, max_batch_size=4, every=1)
    with pytest.raises(ValueError, match="every"):
        optlab.adabatch_batch_size(0, initial_batch_size=8, max_batch_size=64, every=0)

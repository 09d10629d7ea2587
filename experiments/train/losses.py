"""Classification loss and evaluation built on a :class:`experiments.models.Model`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.train.step import LossFn

PyTree = Any


def classification_loss(model: Any) -> LossFn:
    """Mean softmax cross-entropy with integer labels, plus batch accuracy as a metric.

    ``model.apply(params, state, x, train=True, rng=rng) -> (logits, new_state)``.
    """

    def loss_fn(params, model_state, batch, rng):
        logits, new_state = model.apply(params, model_state, batch["x"], train=True, rng=rng)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
        return loss, (new_state, {"accuracy": accuracy})

    return loss_fn


def _padded_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xs, ys, mask)`` of shape ``[num_batches, batch_size, ...]``: the last batch padded
    with zeros and masked out, so every batch has one shape (one compile)."""
    n = len(x)
    batch_size = min(batch_size, n)
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    xs = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(
        num_batches, batch_size, *x.shape[1:]
    )
    ys = np.concatenate([y, np.zeros((pad,), y.dtype)]).reshape(num_batches, batch_size)
    mask = (np.arange(num_batches * batch_size) < n).reshape(num_batches, batch_size)
    return xs, ys, mask


def make_evaluator(
    model: Any, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512
) -> Callable[[PyTree, PyTree], dict[str, float]]:
    """Returns ``evaluate(params, model_state) -> {"loss", "accuracy"}`` over all of (x, y).

    Eval mode (BatchNorm running averages). The data is split into fixed-size batches, the
    last one padded and masked, so the jitted function compiles once.
    """
    n = len(x)
    xs, ys, mask = _padded_batches(x, y, batch_size)
    num_batches = len(xs)

    @jax.jit
    def totals(params, model_state, xb, yb, mb):
        logits, _ = model.apply(params, model_state, xb, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        correct = jnp.argmax(logits, -1) == yb
        return jnp.sum(jnp.where(mb, losses, 0.0)), jnp.sum(jnp.where(mb, correct, 0))

    def evaluate(params, model_state) -> dict[str, float]:
        loss_sum, correct = 0.0, 0
        parts = [totals(params, model_state, xs[i], ys[i], mask[i]) for i in range(num_batches)]
        for loss_part, correct_part in jax.device_get(parts):
            loss_sum += float(loss_part)
            correct += int(correct_part)
        return {"loss": loss_sum / n, "accuracy": correct / n}

    return evaluate


def make_stacked_evaluator(
    model: Any, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1024
) -> Callable[[PyTree, PyTree], dict[str, jax.Array]]:
    """``evaluate(params, model_state) -> {"loss": [R], "accuracy": [R]}`` for stacked runs.

    The jit-compatible twin of :func:`make_evaluator` for a leading run axis: eval mode,
    the whole of ``(x, y)`` in fixed-size batches (the last padded and masked) under
    ``lax.map``, every run at once under ``vmap``.
    """
    n = len(x)
    xs, ys, mask = _padded_batches(x, y, batch_size)

    def one_run(params, model_state):
        def totals(batch):
            xb, yb, mb = batch
            logits, _ = model.apply(params, model_state, xb, train=False)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            correct = jnp.argmax(logits, -1) == yb
            return (
                jnp.sum(jnp.where(mb, losses, 0.0), dtype=jnp.float32),
                jnp.sum(jnp.where(mb, correct, 0)),
            )

        loss, correct = jax.lax.map(totals, (jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(mask)))
        return {"loss": loss.sum() / n, "accuracy": correct.sum() / n}

    return jax.vmap(one_run)

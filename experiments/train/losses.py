"""Classification loss and evaluation built on a :class:`experiments.models.Model`.

Labels are either one class per example, ``(N,)``, or one per position of a sequence,
``(N, T)`` (next-token prediction: the model returns logits ``(N, T, classes)``). The
same code serves both: losses and accuracies are means over every label entry (per-token
for sequences), and for sequence labels the evaluators also report ``perplexity``
(``exp`` of the mean token cross-entropy) and ``bits_per_token`` (the same loss in
base 2: bits per byte on the byte-level ``"text"`` dataset).
"""

from __future__ import annotations

import math
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

    ``model.apply(params, state, x, train=True, rng=rng) -> (logits, new_state)``. With
    sequence labels ``(B, T)`` both are means over all ``B * T`` tokens.
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
    ys = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)]).reshape(
        num_batches, batch_size, *y.shape[1:]
    )
    mask = (np.arange(num_batches * batch_size) < n).reshape(num_batches, batch_size)
    return xs, ys, mask


def _masked_totals(logits: jax.Array, y: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
    """Summed cross-entropy and correct predictions of the unmasked examples' labels."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = jnp.argmax(logits, -1) == y
    keep = mask.reshape(mask.shape + (1,) * (y.ndim - 1))  # every label of a kept example
    return (  # sums in float32 at least (bfloat16 logits), float64 under x64
        jnp.sum(jnp.where(keep, losses, 0.0), dtype=jnp.promote_types(losses.dtype, jnp.float32)),
        jnp.sum(jnp.where(keep, correct, 0)),
    )


def _summary(loss: Any, accuracy: Any, sequence: bool) -> dict[str, Any]:
    """``loss`` and ``accuracy``, plus ``perplexity`` and ``bits_per_token`` for sequences."""
    out = {"loss": loss, "accuracy": accuracy}
    if sequence:
        out["perplexity"] = jnp.exp(loss) if isinstance(loss, jax.Array) else math.exp(loss)
        out["bits_per_token"] = loss / math.log(2.0)
    return out


def make_evaluator(
    model: Any, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512
) -> Callable[[PyTree, PyTree], dict[str, float]]:
    """Returns ``evaluate(params, model_state) -> {"loss", "accuracy"}`` over all of (x, y).

    Eval mode (BatchNorm running averages). The data is split into fixed-size batches, the
    last one padded and masked, so the jitted function compiles once. Means are over every
    label (token); sequence labels ``(N, T)`` add ``perplexity`` and ``bits_per_token``.
    """
    labels = y.size
    xs, ys, mask = _padded_batches(x, y, batch_size)
    num_batches = len(xs)

    @jax.jit
    def totals(params, model_state, xb, yb, mb):
        logits, _ = model.apply(params, model_state, xb, train=False)
        return _masked_totals(logits, yb, mb)

    def evaluate(params, model_state) -> dict[str, float]:
        loss_sum, correct = 0.0, 0
        parts = [totals(params, model_state, xs[i], ys[i], mask[i]) for i in range(num_batches)]
        for loss_part, correct_part in jax.device_get(parts):
            loss_sum += float(loss_part)
            correct += int(correct_part)
        return _summary(loss_sum / labels, correct / labels, y.ndim > 1)

    return evaluate


def make_stacked_evaluator(
    model: Any, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1024
) -> Callable[[PyTree, PyTree], dict[str, jax.Array]]:
    """``evaluate(params, model_state) -> {"loss": [R], "accuracy": [R]}`` for stacked runs.

    The jit-compatible twin of :func:`make_evaluator` for a leading run axis: eval mode,
    the whole of ``(x, y)`` in fixed-size batches (the last padded and masked) under
    ``lax.map``, every run at once under ``vmap``. Sequence labels ``(N, T)`` add
    ``perplexity`` and ``bits_per_token`` (``[R]`` each).
    """
    labels = y.size
    xs, ys, mask = _padded_batches(x, y, batch_size)

    def one_run(params, model_state):
        def totals(batch):
            xb, yb, mb = batch
            logits, _ = model.apply(params, model_state, xb, train=False)
            return _masked_totals(logits, yb, mb)

        loss, correct = jax.lax.map(totals, (jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(mask)))
        return _summary(loss.sum() / labels, correct.sum() / labels, y.ndim > 1)

    return jax.vmap(one_run)

"""Synchronous data parallelism as a transform: average the gradient over a worker axis.

Put it first in a chain: ``optax.chain(optlab.mean_gradients("workers"), optax.sgd(0.1))``
is what every worker of synchronous data-parallel SGD does. In a harness where each
worker holds its own parameters and its own batch (``jax.vmap(..., axis_name=...)`` or
``jax.shard_map``), this keeps the workers' parameters identical: each applies the same
averaged update.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

__all__ = ["mean_gradients"]


def mean_gradients(axis_name: str | tuple[str, ...] | None) -> optax.GradientTransformation:
    """The gradient averaged over ``axis_name``: ``g <- (1/W) sum_w g_w``.

    Args:
      axis_name: the named worker axis (a ``vmap`` axis name, a ``shard_map`` mesh axis,
        or a tuple of both); ``None`` makes this the identity (one worker).

    Returns:
      A stateless ``optax.GradientTransformation``; ``update`` must run inside a context
      that binds ``axis_name``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> tx = optax.chain(optlab.mean_gradients("workers"), optax.sgd(1.0))
      >>> grads = jnp.array([[1.0], [3.0]])  # two workers' gradients
      >>> def step(g):
      ...     updates, _ = tx.update(g, tx.init(g))
      ...     return updates
      >>> jax.vmap(step, axis_name="workers")(grads)
      Array([[-2.],
             [-2.]], dtype=float32)
    """
    if axis_name is not None and not (
        isinstance(axis_name, str)
        or (isinstance(axis_name, tuple) and all(isinstance(a, str) for a in axis_name))
    ):
        raise ValueError(
            f"axis_name must be a string, a tuple of strings or None, got {axis_name!r}."
        )

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple:
        del params
        if axis_name is None:
            return updates, state
        return jax.lax.pmean(updates, axis_name), state

    return optax.GradientTransformation(init, update)

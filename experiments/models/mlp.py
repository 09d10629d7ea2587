"""Multilayer perceptron classifier.

A plain fully connected network: flatten, ``len(hidden)`` dense layers each followed by a
nonlinearity (and optional dropout), then a linear classifier head producing logits.

Reference: D. E. Rumelhart, G. E. Hinton, R. J. Williams, "Learning representations by
back-propagating errors", Nature 323, 1986.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Activation = str | Callable[[jax.Array], jax.Array]


def resolve_activation(activation: Activation) -> Callable[[jax.Array], jax.Array]:
    """Return the activation callable for a name in ``flax.linen`` (e.g. "relu") or a callable.

    Raises:
      ValueError: if ``activation`` is a string that names no ``flax.linen`` activation.
    """
    if callable(activation):
        return activation
    fn = getattr(nn, activation, None) if isinstance(activation, str) else None
    if fn is None or not callable(fn) or isinstance(fn, type):
        raise ValueError(
            f"activation={activation!r} is not an activation of flax.linen; "
            "use a name such as 'relu', 'gelu', 'tanh', 'silu' or a callable."
        )
    return fn


class MLP(nn.Module):
    """Fully connected classifier on inputs of any shape ``(N, ...)`` (flattened per example).

    Attributes:
      num_classes: number of output logits.
      hidden: widths of the hidden layers, in order; ``()`` gives a linear (softmax
        regression) model.
      activation: a ``flax.linen`` activation name (``"relu"``, ``"gelu"``, ``"tanh"``, ...)
        or a callable.
      dropout_rate: dropout after each hidden activation in train mode (needs a ``'dropout'``
        rng when positive); 0 disables it.
      dtype: computation dtype (``None``: inferred from inputs and params).
      param_dtype: parameter dtype (float32 by default).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = MLP(num_classes=10, hidden=(32,))
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
      >>> model.apply(variables, jnp.zeros((4, 8, 8, 1))).shape
      (4, 10)
    """

    num_classes: int
    hidden: Sequence[int] = (128, 128)
    activation: Activation = "relu"
    dropout_rate: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits of shape ``(N, num_classes)`` for a batch ``x`` of shape ``(N, ...)``."""
        act = resolve_activation(self.activation)
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"dense_{i}")(
                x
            )
            x = act(x)
            if self.dropout_rate > 0.0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head"
        )(x)

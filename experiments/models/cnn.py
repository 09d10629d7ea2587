"""Small convolutional classifier for 2-D images and 1-D signals.

``len(features)`` blocks of [3-wide convolution, ReLU, 2-wide max pooling with stride 2],
then one hidden dense layer and a linear classifier head: the LeNet-style pattern of
LeCun et al. (1998) with ReLU and max pooling as in Krizhevsky et al. (2012).

References:
  Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning applied to document
  recognition", Proc. IEEE 86(11), 1998.
  A. Krizhevsky, I. Sutskever, G. E. Hinton, "ImageNet classification with deep
  convolutional neural networks", NeurIPS 2012.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class SmallCNN(nn.Module):
    """Conv(3)-ReLU-MaxPool(2) blocks, then dense-ReLU and a linear head.

    The number of spatial dimensions ``d`` is read from the input rank: ``(N, H, W, C)``
    gives 2-D convolutions (kernel ``(3, 3)``, window ``(2, 2)``), ``(N, L, C)`` gives 1-D
    ones (kernel ``(3,)``, window ``(2,)``); a channel-less ``(N, L)`` input is treated as
    ``(N, L, 1)``. Convolutions and pooling use ``"SAME"`` padding, so each pooling maps a
    spatial size ``s`` to ``ceil(s / 2) >= 1`` and no dimension ever reaches 0 (8x8 digits
    with two blocks end at 2x2; a size-1 dimension stays 1).

    Attributes:
      num_classes: number of output logits.
      features: output channels of each convolutional block.
      dense: width of the hidden dense layer after flattening (0 skips it).
      dropout_rate: dropout before the head in train mode (needs a ``'dropout'`` rng when
        positive); 0 disables it.
      dtype: computation dtype (``None``: inferred from inputs and params).
      param_dtype: parameter dtype (float32 by default).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = SmallCNN(num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 40, 1)))
      >>> model.apply(variables, jnp.zeros((4, 40, 1))).shape
      (4, 10)
    """

    num_classes: int
    features: Sequence[int] = (32, 64)
    dense: int = 128
    dropout_rate: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for ``x`` of shape ``(N, H, W, C)`` or ``(N, L, C)``."""
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim not in (3, 4):
            raise ValueError(
                f"SmallCNN expects inputs of shape (N, L, C) or (N, H, W, C); got shape {x.shape}"
            )
        d = x.ndim - 2
        for i, width in enumerate(self.features):
            x = nn.Conv(
                width,
                kernel_size=(3,) * d,
                padding="SAME",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv_{i}",
            )(x)
            x = nn.relu(x)
            x = nn.max_pool(x, window_shape=(2,) * d, strides=(2,) * d, padding="SAME")
        x = jnp.reshape(x, (x.shape[0], -1))
        if self.dense > 0:
            x = nn.Dense(self.dense, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(
                x
            )
            x = nn.relu(x)
        if self.dropout_rate > 0.0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head"
        )(x)

"""CIFAR-style residual networks (ResNet-20/32/44/56/110) of He et al. (2016), Sec. 4.2.

Architecture for 32x32 inputs: a 3x3 convolution with 16 filters, then three stages of
``n`` basic blocks (two 3x3 convolutions each) with 16, 32 and 64 filters on feature maps of
32x32, 16x16 and 8x8 (the first convolution of stages 2 and 3 has stride 2), then global
average pooling and a dense classifier: ``6n + 2`` weighted layers (n = 3 gives ResNet-20).
Every convolution is followed by batch normalization (Ioffe & Szegedy, 2015); convolutions
carry no bias and use He-normal initialization.

Shortcuts: the paper's CIFAR models use **option A** (parameter-free): identity when shapes
match; otherwise subsample the input with stride 2 and zero-pad the new channels. That is the
default here (``shortcut="A"``), and it gives ResNet-20 its 0.27M parameters. ``shortcut="B"``
uses a 1x1 convolution with stride 2 plus batch normalization on the shape-changing blocks
(the paper's option B, common in other reimplementations; about +2.8K parameters at width 16).

Padding: 3x3 convolutions pad by 1 on each side (as the paper's Torch/PyTorch
implementations do) rather than XLA's asymmetric ``"SAME"`` for stride 2, so output pixel
``i`` of a stride-2 convolution is centred on input pixel ``2i``: the same pixel the option-A
shortcut ``x[:, ::2, ::2]`` picks.

Reference: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, arXiv:1512.03385.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Shortcut = Literal["A", "B"]

_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual shortcut: ``relu(F(x) + shortcut(x))``.

    Attributes:
      features: output channels.
      strides: stride of the first convolution (and of the shortcut when it projects).
      shortcut: ``"A"`` (subsample + zero-pad channels) or ``"B"`` (1x1 conv + BN) when the
        shape changes; identity otherwise.
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    features: int
    strides: int = 1
    shortcut: Shortcut = "A"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block to ``x`` of shape ``(N, H, W, C)``."""
        conv = lambda feats, kernel, strides, padding, name: nn.Conv(
            feats,
            kernel_size=(kernel, kernel),
            strides=(strides, strides),
            padding=padding,
            use_bias=False,
            kernel_init=nn.initializers.kaiming_normal(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        norm = lambda name: nn.BatchNorm(
            use_running_average=not train,
            momentum=_BN_MOMENTUM,
            epsilon=_BN_EPSILON,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

        y = conv(self.features, 3, self.strides, 1, "conv_0")(x)
        y = nn.relu(norm("bn_0")(y))
        y = conv(self.features, 3, 1, 1, "conv_1")(y)
        y = norm("bn_1")(y)

        in_features = x.shape[-1]
        if self.strides != 1 or in_features != self.features:
            if self.shortcut == "A":
                x = x[:, :: self.strides, :: self.strides, :]
                extra = self.features - in_features
                if extra < 0:
                    raise ValueError(
                        f"option-A shortcut cannot reduce channels ({in_features} -> "
                        f"{self.features}); use shortcut='B'"
                    )
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
            else:
                x = conv(self.features, 1, self.strides, 0, "proj_conv")(x)
                x = norm("proj_bn")(x)
        return nn.relu(y + x.astype(y.dtype))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet with ``len(num_blocks)`` stages of basic blocks.

    Stage ``s`` has ``width * 2**s`` channels and ``num_blocks[s]`` blocks; every stage after
    the first starts with a stride-2 block. Depth is ``2 * sum(num_blocks) + 2``.

    Attributes:
      num_classes: number of output logits.
      width: channels of the stem and first stage (16 in the paper; 16/32/64 for the three
        stages are scaled by ``width / 16``).
      num_blocks: basic blocks per stage ((3, 3, 3) is ResNet-20).
      shortcut: ``"A"`` (parameter-free, the paper's CIFAR choice, default) or ``"B"``
        (1x1 projection) for shape-changing blocks.
      dtype: computation dtype (``None``: inferred from inputs and params).
      param_dtype: parameter dtype (float32 by default).

    BatchNorm statistics live in the ``batch_stats`` collection; they are used (not updated)
    when ``train=False`` and updated with momentum 0.9 when ``train=True`` (pass
    ``mutable=['batch_stats']``).
    """

    num_classes: int
    width: int = 16
    num_blocks: Sequence[int] = (3, 3, 3)
    shortcut: Shortcut = "A"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits of shape ``(N, num_classes)`` for images ``x`` of shape ``(N, H, W, C)``."""
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects (N, H, W, C) images; got {x.shape}")
        if self.shortcut not in ("A", "B"):
            raise ValueError(f"shortcut={self.shortcut!r}; allowed: 'A' or 'B'")
        x = nn.Conv(
            self.width,
            kernel_size=(3, 3),
            padding=1,
            use_bias=False,
            kernel_init=nn.initializers.kaiming_normal(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="stem_conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=_BN_MOMENTUM,
            epsilon=_BN_EPSILON,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="stem_bn",
        )(x)
        x = nn.relu(x)
        for stage, blocks in enumerate(self.num_blocks):
            for block in range(blocks):
                x = BasicBlock(
                    features=self.width * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    shortcut=self.shortcut,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"stage{stage}_block{block}",
                )(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head"
        )(x)


class ResNet20(CifarResNet):
    """ResNet-20 (He et al., 2016, CIFAR-10 table 6): three stages of 3 basic blocks.

    About 0.27M parameters at ``width=16`` with 10 classes and the default option-A
    shortcut. All attributes as in :class:`CifarResNet`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ResNet20(num_classes=10)
      >>> x = jnp.zeros((1, 32, 32, 3))
      >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only, fast
      >>> sorted(variables)
      ['batch_stats', 'params']
      >>> sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
      269722
    """


def ResNet(depth: int, num_classes: int, **kwargs: Any) -> CifarResNet:
    """Build the CIFAR ResNet of depth ``6n + 2`` (20, 32, 44, 56, 110, ...).

    Args:
      depth: number of weighted layers; must be ``6n + 2`` with ``n >= 1``.
      num_classes: number of output logits.
      **kwargs: other :class:`CifarResNet` attributes (``width``, ``shortcut``, ``dtype``,
        ``param_dtype``).

    Returns:
      A :class:`CifarResNet` with ``num_blocks = (n, n, n)``.

    Raises:
      ValueError: if ``depth`` is not of the form ``6n + 2``.
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"depth={depth!r}; allowed: 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110)"
        )
    n = (depth - 2) // 6
    return CifarResNet(num_classes=num_classes, num_blocks=(n, n, n), **kwargs)

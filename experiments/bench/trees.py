"""Model-shaped parameter pytrees of a requested size, and byte counting."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["model_like_shapes", "model_like_tree", "tree_nbytes"]

PyTree = Any

# Share of the parameter budget per layer, roughly a small conv net with a wide dense body:
# one large matrix, a medium one, a conv kernel, a narrow head, and small vectors.
_CONV_SHARE, _DENSE0_SHARE, _DENSE1_SHARE, _HEAD_SHARE = 0.10, 0.55, 0.30, 0.05
_HEAD_OUT = 10


def model_like_shapes(target: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """Leaf shapes of a model-like tree with about ``target`` float parameters.

    Leaves of mixed sizes and ranks (a 4-D conv kernel, two dense matrices, a head, biases,
    a norm scale), as optimizer updates see in practice: many small leaves cost dispatch and
    loop overhead that one flat vector would hide. The total is within a few percent of
    ``target`` (use :func:`num_params` for the exact count).
    """
    if target < 1:
        raise ValueError(f"target number of parameters must be >= 1, got {target}")
    conv_c = max(1, math.isqrt(int(_CONV_SHARE * target) // 9))
    d0 = max(1, math.isqrt(int(_DENSE0_SHARE * target)))
    d1 = max(1, math.isqrt(int(_DENSE1_SHARE * target)))
    head_in = max(1, int(_HEAD_SHARE * target) // _HEAD_OUT)
    return {
        "conv": {"kernel": (3, 3, conv_c, conv_c), "bias": (conv_c,)},
        "norm": {"scale": (conv_c,), "bias": (conv_c,)},
        "dense_0": {"kernel": (d0, d0), "bias": (d0,)},
        "dense_1": {"kernel": (d1, d1), "bias": (d1,)},
        "head": {"kernel": (head_in, _HEAD_OUT), "bias": (_HEAD_OUT,)},
    }


def model_like_tree(target: int, rng: np.random.Generator, *, scale: float = 1.0) -> PyTree:
    """A float32 pytree shaped by :func:`model_like_shapes`, filled with ``scale * N(0, 1)``.

    Drawn with NumPy and moved to the default device once: eager ``jax.random`` would
    compile one small program per distinct leaf shape.
    """
    shapes = model_like_shapes(target)
    return jax.block_until_ready(
        jax.tree.map(
            lambda shape: jnp.asarray(scale * rng.standard_normal(shape, dtype=np.float32)),
            shapes,
            is_leaf=lambda s: isinstance(s, tuple),
        )
    )


def tree_nbytes(tree: PyTree) -> int:
    """Sum of ``nbytes`` over all array leaves (0 for an empty state)."""
    return int(sum(_nbytes(leaf) for leaf in jax.tree.leaves(tree)))


def _nbytes(leaf: Any) -> int:
    return int(leaf.nbytes) if hasattr(leaf, "nbytes") else int(np.asarray(leaf).nbytes)

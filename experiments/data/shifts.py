"""Distribution shifts as pure data transforms: rotation, additive noise, a spurious feature.

Each function maps arrays to new arrays (inputs of shape ``(N, H, W, C)`` for the image
ones) and draws any randomness from an explicit ``np.random.Generator``; nothing is global.
They are meant for study hooks: ``prepare_data`` (a feature present in the training data)
and ``evaluators`` (shifted copies of the test set).
"""

from __future__ import annotations

import numpy as np

__all__ = ["add_noise", "border_pixels", "rotate_images", "stamp_spurious_feature"]


def rotate_images(x: np.ndarray, degrees: float, *, fill: float) -> np.ndarray:
    """Every image of ``x`` (``(N, H, W, C)``) rotated by ``degrees`` counter-clockwise about
    its centre (bilinear, same size); pixels rotated in from outside take ``fill`` (e.g. the
    standardized background value)."""
    from scipy import ndimage

    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, H, W, C), got {x.shape}.")
    out = ndimage.rotate(
        x, degrees, axes=(2, 1), reshape=False, order=1, mode="constant", cval=fill
    )
    return out.astype(x.dtype)


def add_noise(x: np.ndarray, std: float, *, rng: np.random.Generator) -> np.ndarray:
    """``x + std * N(0, 1)`` elementwise (i.i.d. Gaussian noise)."""
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std}.")
    return (x + std * rng.standard_normal(x.shape)).astype(x.dtype)


def border_pixels(height: int, width: int) -> np.ndarray:
    """``(P, 2)`` the (row, column) of every border pixel, clockwise from the top-left."""
    top = [(0, c) for c in range(width)]
    right = [(r, width - 1) for r in range(1, height)]
    bottom = [(height - 1, c) for c in range(width - 2, -1, -1)]
    left = [(r, 0) for r in range(height - 2, 0, -1)]
    return np.asarray(top + right + bottom + left, np.int64)


def stamp_spurious_feature(
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    correlation: float,
    value: float,
    rng: np.random.Generator,
    pixels_per_class: int = 2,
) -> np.ndarray:
    """Images with a class marker on their border, agreeing with the label with probability
    ``correlation``.

    Class ``c``'s marker is ``pixels_per_class`` consecutive border pixels (from
    :func:`border_pixels`, class ``c`` at positions ``c * pixels_per_class ...``) set to
    ``value`` in every channel. Each example carries the marker of its own label with
    probability ``correlation`` and otherwise that of a class drawn uniformly from all
    classes; ``correlation = 0`` gives a marker independent of the label (the correlation
    broken), ``1`` a marker that always reveals it.
    """
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, H, W, C), got {x.shape}.")
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must lie in [0, 1], got {correlation}.")
    border = border_pixels(x.shape[1], x.shape[2])
    if num_classes * pixels_per_class > len(border):
        raise ValueError(
            f"num_classes * pixels_per_class ({num_classes * pixels_per_class}) exceeds the "
            f"{len(border)} border pixels of a {x.shape[1]}x{x.shape[2]} image."
        )
    n = len(x)
    agree = rng.random(n) < correlation
    marker = np.where(agree, y, rng.integers(0, num_classes, n))
    out = x.copy()
    for k in range(pixels_per_class):
        rows, cols = border[marker * pixels_per_class + k].T
        out[np.arange(n), rows, cols, :] = value
    return out

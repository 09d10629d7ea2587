"""MNIST-1D generated locally (Greydanus, 2020), vectorized over examples.

MNIST-1D is a procedurally generated, harder-than-it-looks 1-D stand-in for MNIST
(S. Greydanus and D. Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024;
first released as S. Greydanus, "Scaling down deep learning", arXiv:2011.14439, 2020).
Each example starts from one of 10 hand-designed digit templates of length 12 and goes
through the official pipeline, with the official default arguments:

1. pad with ``p ~ U{padding[0], ..., padding[1]}`` zeros on the right (the template gets
   ``+1e-8`` first so it stays distinguishable from padding);
2. dilate: linearly interpolate the ``12 + p`` samples onto ``template_len + padding[1]``
   (= 72) evenly spaced points;
3. scale by ``1 + scale_coeff * (u - 1/2)``, ``u ~ U[0, 1)``;
4. translate: circular shift right by ``k ~ U{0, ..., max_translation - 1}``;
5. where the signal is exactly zero (padding), substitute correlated noise:
   ``corr_noise_scale * N(0, 1)`` smoothed by a Gaussian filter with sigma 2
   (``scipy.ndimage``; reflect boundary, truncate 4);
6. add iid noise ``iid_noise_scale * N(0, 1)`` everywhere;
7. shear: subtract ``shear_scale * (u - 1/2) * linspace(-1/2, 1/2, 72)``;
8. subsample: linearly interpolate onto ``final_seq_length`` (= 40) points.

``num_samples // 10`` examples per class are generated, shuffled, and the first
``train_split`` fraction becomes the training set.

Provenance and differences from the official data:

* The 10 templates below are the official ones, copied from ``get_templates`` in
  ``mnist1d/data.py`` of https://github.com/greydanus/mnist1d (each template is whitened,
  shifted to start at 0 and divided by 6, as there).
* All randomness comes from one explicit ``np.random.Generator(seed)`` and is drawn
  batch-wise (one vector per transformation), whereas the official code draws per example
  from NumPy's global legacy ``RandomState`` seeded with 42. The distribution is the same;
  the samples are NOT bitwise equal to the official ``mnist1d_data.pkl``, for any seed.
* The official code standardizes with statistics of the whole dataset; here, like every
  loader of this package, the inputs are standardized with TRAINING statistics only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experiments.data.dataset import Dataset, finalize

__all__ = ["TEMPLATE_VALUES", "generate_mnist1d", "load_mnist1d", "mnist1d_templates"]

# Official MNIST-1D digit templates (rows: digits 0..9), before normalization.
TEMPLATE_VALUES: np.ndarray = np.array(
    [
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ],
    dtype=np.float64,
)
TEMPLATE_VALUES.setflags(write=False)

_NUM_CLASSES = 10
_EPS = 1e-8  # keeps the template distinguishable from zero padding (official value)
_CORR_NOISE_SIGMA = 2.0


def mnist1d_templates() -> np.ndarray:
    """The 10 normalized templates, shape ``(10, 12)``: whitened, start at 0, divided by 6."""
    x = TEMPLATE_VALUES - TEMPLATE_VALUES.mean(axis=1, keepdims=True)
    x = x / x.std(axis=1, keepdims=True)
    x = x - x[:, :1]
    return x / 6.0


def _interpolate_rows(values: np.ndarray, lengths: np.ndarray, num_points: int) -> np.ndarray:
    """Linear interpolation of each row's first ``lengths[i]`` samples onto ``num_points``.

    Row ``i`` of ``values`` is read as a signal sampled at ``linspace(0, 1, lengths[i])``
    and evaluated at ``linspace(0, 1, num_points)`` (what ``scipy.interpolate.interp1d``
    with ``kind='linear'`` does, for all rows at once).
    """
    grid = np.linspace(0.0, 1.0, num_points)
    pos = grid[None, :] * (lengths[:, None] - 1)
    left = np.clip(np.floor(pos).astype(np.int64), 0, lengths[:, None] - 2)
    frac = pos - left
    v_left = np.take_along_axis(values, left, axis=1)
    v_right = np.take_along_axis(values, left + 1, axis=1)
    return v_left * (1.0 - frac) + v_right * frac


def generate_mnist1d(
    *,
    seed: int = 0,
    num_samples: int = 5000,
    template_len: int = 12,
    padding: Sequence[int] = (36, 60),
    scale_coeff: float = 0.4,
    max_translation: int = 48,
    corr_noise_scale: float = 0.25,
    iid_noise_scale: float = 2e-2,
    shear_scale: float = 0.75,
    final_seq_length: int = 40,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate shuffled MNIST-1D signals and labels (unsplit, unstandardized).

    See the module docstring for the pipeline. Deterministic for a given ``seed``.

    Args:
        seed: Non-negative seed of the single ``np.random.Generator`` used.
        num_samples: Total number of examples; ``num_samples // 10`` per class.
        template_len: Template length used to size the dilation grid
            (``template_len + padding[1]`` points), as in the official code.
        padding: ``(low, high)`` inclusive range of the number of zeros appended.
        scale_coeff: Amplitude of the random scaling.
        max_translation: Circular shifts are drawn from ``0 .. max_translation - 1``.
        corr_noise_scale: Scale of the smoothed noise that replaces the padding.
        iid_noise_scale: Scale of the white noise added everywhere.
        shear_scale: Amplitude of the random linear trend.
        final_seq_length: Length of the returned signals.

    Returns:
        ``(x, y)``: float64 array ``(N, final_seq_length)`` and int64 labels ``(N,)`` with
        ``N = 10 * (num_samples // 10)``.

    Raises:
        ValueError: On out-of-range arguments, naming the argument.
    """
    from scipy.ndimage import gaussian_filter1d

    templates = mnist1d_templates()
    low, high = (int(v) for v in padding)
    if num_samples < _NUM_CLASSES:
        raise ValueError(f"num_samples must be >= {_NUM_CLASSES}, got {num_samples}")
    if not 0 <= low <= high:
        raise ValueError(f"padding must satisfy 0 <= padding[0] <= padding[1], got {padding}")
    if template_len < 1:
        raise ValueError(f"template_len must be >= 1, got {template_len}")
    if max_translation < 1:
        raise ValueError(f"max_translation must be >= 1, got {max_translation}")
    if final_seq_length < 2:
        raise ValueError(f"final_seq_length must be >= 2, got {final_seq_length}")

    rng = np.random.default_rng(seed)
    per_class = num_samples // _NUM_CLASSES
    labels = np.repeat(np.arange(_NUM_CLASSES, dtype=np.int64), per_class)
    n = labels.size
    width = templates.shape[1]
    dilated_len = template_len + high

    # 1-2. pad with p zeros, then dilate onto `dilated_len` points.
    pad = rng.integers(low, high, endpoint=True, size=n)
    padded = np.zeros((n, width + high))
    padded[:, :width] = templates[labels] + _EPS
    x = _interpolate_rows(padded, width + pad, dilated_len)
    # 3. scale.
    x *= 1.0 + scale_coeff * (rng.random(n)[:, None] - 0.5)
    # 4. circular shift right by k: new[i] = old[(i - k) mod L].
    shift = rng.integers(0, max_translation, size=n)
    cols = (np.arange(dilated_len)[None, :] - shift[:, None]) % dilated_len
    x = np.take_along_axis(x, cols, axis=1)
    # 5-6. correlated noise where the signal is padding, then iid noise everywhere.
    corr = gaussian_filter1d(
        corr_noise_scale * rng.standard_normal((n, dilated_len)), _CORR_NOISE_SIGMA, axis=1
    )
    x = np.where(x != 0, x, corr)
    x += iid_noise_scale * rng.standard_normal((n, dilated_len))
    # 7. shear.
    x -= (shear_scale * (rng.random(n) - 0.5))[:, None] * np.linspace(-0.5, 0.5, dilated_len)
    # 8. subsample to the final length.
    x = _interpolate_rows(x, np.full(n, dilated_len), final_seq_length)

    order = rng.permutation(n)
    return x[order], labels[order]


def load_mnist1d(
    *,
    seed: int = 0,
    train_split: float = 0.8,
    max_train: int | None = None,
    max_test: int | None = None,
    **generator_kwargs: object,
) -> Dataset:
    """Generate MNIST-1D and split it into train/test.

    Args:
        seed: Seed of the generator (and of the optional subsampling).
        train_split: Fraction of the shuffled examples used for training, in ``(0, 1)``.
        max_train, max_test: Optional deterministic caps on the split sizes.
        **generator_kwargs: Passed to :func:`generate_mnist1d` (``num_samples``,
            ``padding``, ``shear_scale``, ...).

    Returns:
        A :class:`Dataset` with ``x`` of shape ``(N, final_seq_length, 1)``, 10 classes.
    """
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"train_split must be in (0, 1), got {train_split}")
    x, y = generate_mnist1d(seed=seed, **generator_kwargs)  # type: ignore[arg-type]
    split = int(len(y) * train_split)
    if split == 0 or split == len(y):
        raise ValueError(f"train_split={train_split} leaves an empty split of {len(y)} examples")
    x = x[..., None]
    return finalize(
        "mnist1d",
        x[:split],
        y[:split],
        x[split:],
        y[split:],
        _NUM_CLASSES,
        seed=seed,
        max_train=max_train,
        max_test=max_test,
    )

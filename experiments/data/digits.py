"""The offline default dataset: scikit-learn's 8x8 handwritten digits."""

from __future__ import annotations

import numpy as np

from experiments.data.dataset import Dataset, finalize

__all__ = ["load_digits"]


def load_digits(
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
    """Load the UCI optical-recognition digits shipped with scikit-learn, split by ``seed``.

    1,797 real 8x8 grey-level images (values 0..16) of the digits 0-9 (Alpaydin & Kaynak,
    1998). No file access beyond the scikit-learn wheel, no network.

    Args:
        seed: Non-negative integer; the stratified train/test split is a pure function of it
            (passed to scikit-learn as an integer ``random_state``; no global seeding).
        test_fraction: Fraction of examples in the test split, in ``(0, 1)``.
        max_train, max_test: Optional deterministic caps on the split sizes.

    Returns:
        A :class:`Dataset` with ``x`` of shape ``(N, 8, 8, 1)`` and 10 classes.

    Raises:
        ValueError: If ``test_fraction`` is outside ``(0, 1)``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[..., None]  # (N, 8, 8, 1)
    labels = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=int(seed), stratify=labels
    )
    return finalize(
        "digits",
        x_train,
        y_train,
        x_test,
        y_test,
        10,
        seed=seed,
        max_train=max_train,
        max_test=max_test,
    )

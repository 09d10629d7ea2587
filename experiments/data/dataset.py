"""The :class:`Dataset` container and the finishing steps shared by every loader.

Every loader ends in :func:`finalize`: optional deterministic subsampling, then
standardization with TRAIN statistics (per channel), then the dtype contract
(``x`` float32, ``y`` int32).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["TEST_SALT", "TRAIN_SALT", "Dataset", "finalize", "standardize", "subsample_indices"]

# Salts that make the train and test subsamples independent streams of the same seed.
TRAIN_SALT = 0
TEST_SALT = 1


class Dataset(NamedTuple):
    """An in-memory classification (or next-token prediction) dataset.

    Attributes:
        name: Registry name of the dataset (e.g. ``"digits"``).
        x_train: Training inputs, float32, standardized with the training set's per-channel
            mean and standard deviation. Images are NHWC ``(N, H, W, C)``; 1-D signals are
            ``(N, L, 1)``. Text (``"text"``) is int32 byte tokens ``(N, T)``.
        y_train: Training labels, int32, shape ``(N,)``, values in ``[0, num_classes)``;
            for text, the next byte at every position, ``(N, T)``.
        x_test: Test inputs, float32, standardized with the TRAINING statistics.
        y_test: Test labels, int32, shape ``(M,)``.
        num_classes: Number of classes of the task (not necessarily all present in a
            subsample).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def subsample_indices(n: int, max_n: int | None, *, seed: int, salt: int) -> np.ndarray:
    """Sorted indices of a deterministic subsample of ``min(n, max_n)`` out of ``n`` examples.

    Args:
        n: Number of available examples.
        max_n: Upper bound on the subsample size; ``None`` keeps all ``n`` examples.
        seed: Non-negative seed; the subsample is a pure function of ``(seed, salt, n, max_n)``.
        salt: Distinguishes independent streams (train vs. test) of the same seed.

    Returns:
        Sorted int64 index array.

    Raises:
        ValueError: If ``max_n`` is given and smaller than 1.
    """
    if max_n is None or max_n >= n:
        return np.arange(n)
    if max_n < 1:
        raise ValueError(f"max_train/max_test must be >= 1 or None, got {max_n}")
    rng = np.random.default_rng([seed, salt])
    return np.sort(rng.choice(n, size=max_n, replace=False))


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardize both arrays with the per-channel mean and std of ``x_train``.

    The channel is the last axis; statistics reduce over all other axes (examples and
    spatial positions) and are computed in float64. A channel with zero variance is only
    centred.

    Returns:
        ``(x_train, x_test)`` as float32 arrays.
    """
    x_train = np.asarray(x_train)
    axes = tuple(range(x_train.ndim - 1))
    mean = x_train.mean(axis=axes, dtype=np.float64)
    std = x_train.std(axis=axes, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    train = ((x_train - mean) / std).astype(np.float32)
    test = ((np.asarray(x_test) - mean) / std).astype(np.float32)
    return train, test


def finalize(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    *,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
    """Subsample (optionally), standardize with train statistics and cast to the contract.

    Args:
        name: Registry name stored in the result.
        x_train, y_train, x_test, y_test: Raw arrays; ``x`` already in NHWC / ``(N, L, 1)``.
        num_classes: Number of classes of the task.
        seed: Seed of the deterministic subsample (see :func:`subsample_indices`).
        max_train, max_test: Optional caps on the number of train / test examples.

    Returns:
        The finished :class:`Dataset`.
    """
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(
            f"inputs and labels disagree in length: train {len(x_train)} vs {len(y_train)}, "
            f"test {len(x_test)} vs {len(y_test)}"
        )
    train_idx = subsample_indices(len(y_train), max_train, seed=seed, salt=TRAIN_SALT)
    test_idx = subsample_indices(len(y_test), max_test, seed=seed, salt=TEST_SALT)
    x_tr, x_te = standardize(np.asarray(x_train)[train_idx], np.asarray(x_test)[test_idx])
    return Dataset(
        name=name,
        x_train=x_tr,
        y_train=np.asarray(y_train)[train_idx].astype(np.int32),
        x_test=x_te,
        y_test=np.asarray(y_test)[test_idx].astype(np.int32),
        num_classes=int(num_classes),
    )

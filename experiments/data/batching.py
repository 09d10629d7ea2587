"""Deterministic, checkpointable mini-batching of in-memory arrays."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from optlab.validation import check_int_in_range

__all__ = ["BatchIterator", "epoch_batches"]


class BatchIterator:
    """Infinite stream of mini-batches whose content is a pure function of ``(seed, step)``.

    Step ``s`` belongs to epoch ``e = s // steps_per_epoch`` and is slot
    ``i = s % steps_per_epoch`` of it. Epoch ``e`` visits the examples in the order
    ``np.random.default_rng([seed, e]).permutation(n)`` (``arange(n)`` when
    ``shuffle=False``), and step ``s`` takes positions ``[i * batch_size, (i + 1) *
    batch_size)`` of that order. With ``drop_remainder=True`` the ``n % batch_size``
    examples left at the end of an epoch are skipped (a different few each epoch when
    shuffling); otherwise the epoch's last batch is shorter.

    Iterating yields ``batch_at(position)`` and then increments ``position``. The position
    is the whole iterator state: save it in a checkpoint and assign it back to resume.

    Example:
        >>> it = BatchIterator(np.zeros((10, 2)), np.arange(10), 4, seed=0)
        >>> it.steps_per_epoch
        2
        >>> it.position = 5            # e.g. restored from a checkpoint
        >>> batch = next(it)           # == it.batch_at(5)
        >>> batch["x"].shape, it.position
        ((4, 2), 6)

    Args:
        x: Inputs, indexed along the first axis.
        y: Labels (or any per-example array), same first dimension as ``x``.
        batch_size: Examples per batch, in ``[1, n]``.
        seed: Non-negative integer seed of the per-epoch permutations.
        shuffle: Whether to permute each epoch.
        drop_remainder: Whether to skip an epoch's final incomplete batch.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_remainder: bool = True,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        self.x = x
        self.y = y
        self.num_examples = len(x)
        self.batch_size = check_int_in_range(
            "batch_size",
            batch_size,
            min_value=1,
            max_value=self.num_examples,
            note=" (the number of examples)",
        )
        self.seed = check_int_in_range("seed", seed, min_value=0)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self.position = 0
        self._cached_epoch = -1
        self._cached_order = np.arange(self.num_examples)

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches per epoch (floor or ceil of ``n / batch_size``)."""
        if self.drop_remainder:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the examples (cached per epoch)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        if epoch != self._cached_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cached_order = rng.permutation(self.num_examples)
            self._cached_epoch = epoch
        return self._cached_order

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """The batch of global step ``step >= 0``: ``{"x": ..., "y": ...}`` (copies)."""
        step = check_int_in_range("step", step, min_value=0)
        epoch, slot = divmod(step, self.steps_per_epoch)
        start = slot * self.batch_size
        indices = self.epoch_order(epoch)[start : start + self.batch_size]
        return {"x": self.x[indices], "y": self.y[indices]}

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.position)
        self.position += 1
        return batch


def epoch_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield every example once, in order, as ``{"x", "y"}`` batches (views, not copies).

    All batches have ``batch_size`` examples except possibly the last; meant for evaluation.

    Raises:
        ValueError: If lengths differ or ``batch_size`` is not a positive integer.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    batch_size = check_int_in_range("batch_size", batch_size, min_value=1)
    return _slices(x, y, batch_size)  # validated eagerly, iterated lazily


def _slices(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(x), batch_size):
        yield {"x": x[start : start + batch_size], "y": y[start : start + batch_size]}

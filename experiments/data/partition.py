"""Split a dataset's examples among workers / clients (iid and label-skewed).

Every function returns ``num_parts`` sorted int64 index arrays that together cover every
example exactly once. All randomness comes from the ``rng`` argument.
"""

from __future__ import annotations

import numpy as np

from optlab.validation import check_int_in_range

__all__ = ["partition_dirichlet", "partition_iid", "partition_k_classes"]


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    return labels


def _check_num_parts(num_parts: int, num_examples: int) -> int:
    return check_int_in_range(
        "num_parts",
        num_parts,
        min_value=1,
        max_value=num_examples,
        note=" (the number of examples)",
    )


def partition_iid(
    labels: np.ndarray, num_parts: int, *, rng: np.random.Generator
) -> list[np.ndarray]:
    """Uniformly random split into ``num_parts`` parts whose sizes differ by at most one.

    Args:
        labels: 1-D integer labels (only their number is used).
        num_parts: Number of parts, in ``[1, len(labels)]``.
        rng: Source of randomness.

    Returns:
        ``num_parts`` sorted index arrays covering ``range(len(labels))`` exactly once.
    """
    labels = _as_labels(labels)
    num_parts = _check_num_parts(num_parts, labels.size)
    perm = rng.permutation(labels.size)
    return [np.sort(part) for part in np.array_split(perm, num_parts)]


def partition_dirichlet(
    labels: np.ndarray,
    num_parts: int,
    alpha: float,
    *,
    rng: np.random.Generator,
    min_size: int = 1,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among the parts by Dirichlet(alpha) shares.

    For every class ``c`` independently, draw ``q_c ~ Dirichlet(alpha * 1_{num_parts})`` and
    give part ``j`` a random ``q_c[j]`` fraction of the class's examples (cut points
    ``floor(cumsum(q_c) * n_c)``). Small ``alpha`` concentrates each class on few parts;
    ``alpha -> inf`` approaches an iid split. The whole draw is repeated (up to
    ``max_retries`` times) while some part has fewer than ``min_size`` examples.

    This is the label-skew protocol introduced by Hsu, Qi & Brown, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification" (arXiv:1909.06335,
    2019), in the per-class form used by Yurochkin et al. (ICML 2019), Wang et al. (FedMA,
    ICLR 2020) and Li et al. (NIID-Bench, ICDE 2022), without NIID-Bench's extra rule that
    stops giving examples to parts already above the average size.

    Args:
        labels: 1-D integer class labels.
        num_parts: Number of parts, in ``[1, len(labels)]``.
        alpha: Dirichlet concentration, ``> 0`` (finite).
        rng: Source of randomness.
        min_size: Minimum examples per part, in ``[0, len(labels) // num_parts]``.
        max_retries: Maximum number of redraws, ``>= 1``.

    Returns:
        ``num_parts`` sorted index arrays covering ``range(len(labels))`` exactly once.

    Raises:
        ValueError: On invalid arguments, or if no draw met ``min_size`` within
            ``max_retries`` attempts (lower ``min_size`` or ``num_parts``, or raise ``alpha``).
    """
    labels = _as_labels(labels)
    n = labels.size
    num_parts = _check_num_parts(num_parts, n)
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite float > 0, got {alpha!r}")
    min_size = check_int_in_range(
        "min_size", min_size, min_value=0, max_value=n // num_parts, note=" (examples // num_parts)"
    )
    max_retries = check_int_in_range("max_retries", max_retries, min_value=1)

    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(max_retries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
        for idx in members:
            shares = rng.dirichlet(np.full(num_parts, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * idx.size).astype(np.int64)
            for part, chunk in enumerate(np.split(rng.permutation(idx), cuts)):
                buckets[part].append(chunk)
        parts = [np.sort(np.concatenate(b)) for b in buckets]
        if min(p.size for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"partition_dirichlet: no draw gave every one of num_parts={num_parts} parts at least "
        f"min_size={min_size} examples in max_retries={max_retries} attempts (alpha={alpha}, "
        f"{n} examples, {classes.size} classes); lower min_size or num_parts, or raise alpha"
    )


def _shards_per_class(counts: np.ndarray, num_shards: int) -> np.ndarray:
    """Split ``num_shards`` among classes: one each, the rest to the largest mean shard size."""
    shards = np.ones_like(counts)
    for _ in range(num_shards - counts.size):
        mean_size = np.where(shards < counts, counts / shards, -1.0)
        shards[int(np.argmax(mean_size))] += 1
    return shards


def partition_k_classes(
    labels: np.ndarray, num_parts: int, k: int, *, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-iid split: each part gets ``k`` label-sorted shards.

    Following McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data" (AISTATS 2017, arXiv:1602.05629): sort the examples by label, cut
    them into ``num_parts * k`` shards, and deal ``k`` random shards to each part. Here the
    cuts respect class boundaries (each class gets at least one shard, and the remaining
    shards go to the classes with the largest shards; a class's shards differ in size by at
    most one), so every shard holds a single class and every part sees at most ``k``
    distinct labels. (McMahan et al. cut the sorted sequence into equal shards, which can
    straddle two classes.) A part may receive two shards of the same class and then has
    fewer than ``k`` distinct labels; part sizes vary with the shard sizes.

    Args:
        labels: 1-D integer class labels.
        num_parts: Number of parts, ``>= 1``.
        k: Shards per part, ``>= 1``; ``num_parts * k`` must lie in
            ``[number of classes, len(labels)]``.
        rng: Source of randomness.

    Returns:
        ``num_parts`` sorted index arrays covering ``range(len(labels))`` exactly once.

    Raises:
        ValueError: On invalid arguments, naming the parameter and the allowed range.
    """
    labels = _as_labels(labels)
    n = labels.size
    num_parts = _check_num_parts(num_parts, n)
    k = check_int_in_range("k", k, min_value=1)
    classes, counts = np.unique(labels, return_counts=True)
    num_shards = num_parts * k
    if not classes.size <= num_shards <= n:
        raise ValueError(
            f"num_parts * k must be in [number of classes = {classes.size}, number of "
            f"examples = {n}], got num_parts={num_parts}, k={k} (num_parts * k = {num_shards})"
        )
    shards_per_class = _shards_per_class(counts, num_shards)
    shards: list[np.ndarray] = []
    for c, num in zip(classes, shards_per_class, strict=True):
        shards.extend(np.array_split(rng.permutation(np.flatnonzero(labels == c)), num))
    order = rng.permutation(num_shards)
    return [
        np.sort(np.concatenate([shards[s] for s in order[p * k : (p + 1) * k]]))
        for p in range(num_parts)
    ]

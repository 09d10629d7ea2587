"""``load_dataset``: one entry point, dispatching on the dataset's name."""

from __future__ import annotations

from typing import Any

from experiments.data.dataset import Dataset, finalize
from experiments.data.digits import load_digits
from experiments.data.mnist1d import load_mnist1d
from experiments.data.raw import load_raw
from experiments.data.text import load_text
from experiments.data.tfds_source import TFDS_DATASETS, load_tfds

__all__ = ["DATASET_NAMES", "load_dataset"]

LOCAL_DATASETS: tuple[str, ...] = ("digits", "mnist1d", "text")
DATASET_NAMES: tuple[str, ...] = LOCAL_DATASETS + TFDS_DATASETS


def load_dataset(
    name: str = "digits", *, seed: int = 0, data_dir: str | None = None, **kwargs: Any
) -> Dataset:
    """Load a dataset by name.

    * ``"digits"`` (default; offline): scikit-learn's 1,797 8x8 digits, ``x`` of shape
      ``(N, 8, 8, 1)``, stratified split fixed by ``seed`` (kwarg ``test_fraction=0.2``).
    * ``"mnist1d"`` (offline): MNIST-1D generated from ``seed``, ``x`` of shape
      ``(N, 40, 1)``; kwargs go to :func:`experiments.data.mnist1d.generate_mnist1d`
      (``num_samples=5000``, ``padding=(36, 60)``, ...) plus ``train_split=0.8``.
    * ``"text"`` (offline): byte-level language modelling, int32 windows ``x``/``y`` of
      shape ``(N, context)`` (``y`` is ``x`` shifted by one byte), 256 classes, from the
      Python standard library's source or ``text_file``; kwargs ``text_file``,
      ``context=64``, ``max_bytes=2**20``, ``test_fraction=0.1`` (see
      :mod:`experiments.data.text`). It has no ``max_train``/``max_test``: ``max_bytes``
      caps it.
    * ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"``: from raw files if
      ``data_dir`` holds them (see :mod:`experiments.data.raw`), else from a prepared TFDS
      ``array_record`` build in ``data_dir`` (TFDS default directory when ``None``). Never
      downloads: absent data raise :class:`DatasetNotFoundError` at once, with instructions.

    Every image/signal dataset accepts ``max_train`` / ``max_test`` (deterministic
    subsamples, a pure function of ``seed``); its inputs are float32 standardized per
    channel with train statistics. Labels are int32.

    Args:
        name: One of :data:`DATASET_NAMES`.
        seed: Non-negative integer fixing every random choice (split, generation,
            subsample). No global random state is used.
        data_dir: Directory with raw files or TFDS data (ignored by the local datasets).
        **kwargs: Dataset-specific options listed above.

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the known names).
        DatasetNotFoundError: If a file-backed dataset is absent.
        ImportError: If TFDS is needed but tensorflow-datasets is not installed.
    """
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if name == "digits":
        return load_digits(seed=seed, **kwargs)
    if name == "mnist1d":
        return load_mnist1d(seed=seed, **kwargs)
    if name == "text":
        return load_text(seed=seed, **kwargs)
    if name in TFDS_DATASETS:
        if data_dir is not None:
            raw = load_raw(name, data_dir)
            if raw is not None:
                return finalize(name, *raw, seed=seed, **kwargs)
        return load_tfds(name, seed=seed, data_dir=data_dir, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")

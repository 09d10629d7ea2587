"""TFDS-backed image datasets, read WITHOUT TensorFlow and never downloaded.

Reads ``array_record`` data through ``tfds.data_source`` (random access, pure Python +
NumPy). ``tfds.load`` / ``tfds.as_numpy`` would import TensorFlow, and an offline
``download_and_prepare`` hangs for minutes, so the builder's ``is_prepared()`` is checked
first and :class:`~experiments.data.errors.DatasetNotFoundError` is raised at once when the
data are absent, with instructions to prepare them elsewhere.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from experiments.data.dataset import TEST_SALT, TRAIN_SALT, Dataset, finalize, subsample_indices
from experiments.data.errors import DatasetNotFoundError
from experiments.data.raw import expected_raw_files

__all__ = ["TFDS_DATASETS", "load_tfds", "preparation_instructions"]

TFDS_DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10", "cifar100")

_DEFAULT_DATA_DIR_TEXT = "~/tensorflow_datasets"


def _import_tfds(name: str) -> ModuleType:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # also covers missing importlib_resources / array_record
        raise ImportError(
            f"Loading {name!r} through TFDS needs tensorflow-datasets (TensorFlow itself is "
            f'not needed): pip install "optlab[tfds]". Alternatively pass data_dir=DIR '
            f"holding the raw files: {expected_raw_files(name)}."
        ) from err
    return tfds


def _is_prepared(builder: Any) -> bool:
    """Whether the builder's data are generated on disk (the real, non-mocked check).

    A module-level function so that tests running under ``tfds.testing.mock_data`` (which
    mocks the data source but not ``is_prepared``) can monkeypatch it.
    """
    return bool(builder.is_prepared())


def preparation_instructions(name: str, data_dir: str | None) -> str:
    """The exact steps that make ``load_dataset(name, data_dir=...)`` work offline."""
    if data_dir is None:
        builder_args = f"'{name}'"
        copy_step = (
            f"then copy {_DEFAULT_DATA_DIR_TEXT}/{name} to the same place on this machine "
            "(or to DIR/" + name + " and pass data_dir=DIR)"
        )
    else:
        builder_args = f"'{name}', data_dir='{data_dir}'"
        copy_step = f"then copy the prepared {data_dir}/{name} to the same path on this machine"
    return (
        f"No download is attempted. To prepare {name!r}, either\n"
        "  (a) on a machine with internet access run\n"
        '      pip install tensorflow-datasets tensorflow && python -c "import '
        f"tensorflow_datasets as tfds; tfds.builder({builder_args})"
        ".download_and_prepare(file_format='array_record')\"\n"
        f"      {copy_step}; reading it needs no TensorFlow; or\n"
        "  (b) put the raw files in a directory DIR and pass data_dir=DIR: "
        f"{expected_raw_files(name)}."
    )


def _read_split(source: Any, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Plain indexing, one record at a time: `__getitems__` is broken under
    # tfds.testing.mock_data, and decoding dominates the cost anyway.
    images, labels = [], []
    for i in indices:
        record = source[int(i)]
        images.append(np.asarray(record["image"], dtype=np.uint8))
        labels.append(int(record["label"]))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_tfds(
    name: str,
    *,
    seed: int = 0,
    data_dir: str | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
    """Load a prepared TFDS image-classification dataset (``image`` + ``label`` features).

    Args:
        name: One of :data:`TFDS_DATASETS`.
        seed: Seed of the optional deterministic subsampling; only the selected records are
            read and decoded.
        data_dir: TFDS data directory (``None``: TFDS's default, ``~/tensorflow_datasets``).
        max_train, max_test: Optional caps on the split sizes.

    Returns:
        A :class:`Dataset` with NHWC images.

    Raises:
        ImportError: If tensorflow-datasets is not installed.
        DatasetNotFoundError: Immediately, if the dataset is not prepared in ``data_dir``
            or was prepared in a format without random access (e.g. TFRecord).
    """
    if name not in TFDS_DATASETS:
        raise ValueError(f"{name!r} is not a TFDS dataset here; known: {', '.join(TFDS_DATASETS)}")
    tfds = _import_tfds(name)
    builder = tfds.builder(name, data_dir=data_dir)
    if not _is_prepared(builder):
        raise DatasetNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. "
            + preparation_instructions(name, data_dir)
        )
    num_classes = int(builder.info.features["label"].num_classes)
    arrays: list[np.ndarray] = []
    for split, max_n, salt in (("train", max_train, TRAIN_SALT), ("test", max_test, TEST_SALT)):
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except NotImplementedError as err:  # prepared as TFRecord: no random access
            raise DatasetNotFoundError(
                f"TFDS dataset {name!r} in {builder.data_dir} is not in array_record format "
                f"({err}). " + preparation_instructions(name, data_dir)
            ) from err
        indices = subsample_indices(len(source), max_n, seed=seed, salt=salt)
        arrays.extend(_read_split(source, indices))
    x_train, y_train, x_test, y_test = arrays
    return finalize(name, x_train, y_train, x_test, y_test, num_classes, seed=seed)

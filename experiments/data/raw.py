"""Loaders for raw dataset files in a user-given directory (no TFDS, no network).

Supported layouts (``data_dir`` itself, or the listed sub-directories, are searched):

* MNIST / Fashion-MNIST: the four IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
  each optionally gzipped (``.gz``); ``.idx`` spelled with a dot (``train-images.idx3-ubyte``)
  is accepted too. Searched in ``data_dir``, ``data_dir/<name>``, ``data_dir/<name>/raw``
  and the torchvision folders ``data_dir/MNIST/raw`` / ``data_dir/FashionMNIST/raw``.
* CIFAR-10: the "python version" pickles ``data_batch_1`` .. ``data_batch_5`` and
  ``test_batch``, in ``data_dir`` or ``data_dir/cifar-10-batches-py``.
* CIFAR-100: the pickles ``train`` and ``test`` (``fine_labels`` are used), in ``data_dir``
  or ``data_dir/cifar-100-python``.

The CIFAR pickles are read with a restricted unpickler that only resolves the NumPy array
constructors, so a tampered file cannot run arbitrary code.
"""

from __future__ import annotations

import codecs
import gzip
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from experiments.data.errors import DatasetNotFoundError

__all__ = [
    "RAW_DATASETS",
    "expected_raw_files",
    "find_raw_files",
    "load_raw",
    "read_cifar_pickle",
    "read_idx",
]

_IDX_STEMS = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_SUBDIRS = {
    "mnist": ("", "mnist", "mnist/raw", "MNIST/raw"),
    "fashion_mnist": ("", "fashion_mnist", "fashion_mnist/raw", "FashionMNIST/raw"),
}
_CIFAR_FILES = {
    "cifar10": (tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",)),
    "cifar100": (("train",), ("test",)),
}
_CIFAR_SUBDIRS = {"cifar10": ("", "cifar-10-batches-py"), "cifar100": ("", "cifar-100-python")}
_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}

RAW_DATASETS: tuple[str, ...] = tuple(_NUM_CLASSES)

# IDX type codes (third byte of the magic number) -> NumPy big-endian dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def expected_raw_files(name: str) -> str:
    """Human-readable description of the raw files :func:`load_raw` accepts for ``name``."""
    if name in _IDX_SUBDIRS:
        files = ", ".join(_IDX_STEMS.values())
        return f"{files} (optionally .gz), in DIR or DIR/{'|'.join(_IDX_SUBDIRS[name][1:])}"
    if name in _CIFAR_FILES:
        train, test = _CIFAR_FILES[name]
        return (
            f"the python-version pickles {', '.join(train + test)}, "
            f"in DIR or DIR/{_CIFAR_SUBDIRS[name][1]}"
        )
    raise ValueError(f"no raw-file loader for {name!r}; known: {', '.join(RAW_DATASETS)}")


def _first_existing(directory: Path, stem: str) -> Path | None:
    variants = (stem, stem.replace("-idx", ".idx"))
    for base in variants:
        for candidate in (directory / base, directory / f"{base}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_raw_files(name: str, data_dir: str | Path) -> dict[str, list[Path]] | None:
    """Locate the raw files of ``name`` under ``data_dir``.

    Returns:
        ``{"train": [...], "test": [...]}`` for CIFAR, ``{"x_train": [path], ...}`` for the
        IDX datasets, or ``None`` when no raw file of the dataset is present at all.

    Raises:
        DatasetNotFoundError: If some, but not all, of the required files are present (a
            half-copied directory is an error, not a reason to fall back to TFDS).
    """
    root = Path(data_dir)
    if name in _IDX_SUBDIRS:
        for sub in _IDX_SUBDIRS[name]:
            found = {key: _first_existing(root / sub, stem) for key, stem in _IDX_STEMS.items()}
            present = {k: p for k, p in found.items() if p is not None}
            if len(present) == len(found):
                return {k: [p] for k, p in present.items()}
            if present:
                missing = [_IDX_STEMS[k] for k in found if found[k] is None]
                raise DatasetNotFoundError(
                    f"incomplete raw {name} files in {root / sub}: missing {', '.join(missing)} "
                    f"(expected {expected_raw_files(name)})"
                )
        return None
    if name in _CIFAR_FILES:
        train, test = _CIFAR_FILES[name]
        for sub in _CIFAR_SUBDIRS[name]:
            directory = root / sub
            present_files = [f for f in train + test if (directory / f).is_file()]
            if len(present_files) == len(train + test):
                return {
                    "train": [directory / f for f in train],
                    "test": [directory / f for f in test],
                }
            # CIFAR-100's "train"/"test" are generic names: only a complete set counts.
            if present_files and name == "cifar10":
                missing = [f for f in train + test if f not in present_files]
                raise DatasetNotFoundError(
                    f"incomplete raw {name} files in {directory}: missing {', '.join(missing)} "
                    f"(expected {expected_raw_files(name)})"
                )
        return None
    raise ValueError(f"no raw-file loader for {name!r}; known: {', '.join(RAW_DATASETS)}")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped if its name ends in ``.gz``.

    Raises:
        ValueError: If the header is malformed or the payload size disagrees with it.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the payload has "
            f"{len(data) - header} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # native byte order, writable copy


# The only globals a CIFAR batch references. `_reconstruct` is taken from NumPy itself, so
# pickles naming `numpy.core` (NumPy 1, the official files) and `numpy._core` (NumPy 2)
# both resolve without importing the deprecated module.
_reconstruct = np.zeros(0).__reduce__()[0]
_frombuffer = np.zeros(0).__reduce_ex__(5)[0]  # protocol-5 constructor
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only what a CIFAR batch needs (NumPy arrays, bytes)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a dataset pickle (only NumPy arrays "
                "are allowed)"
            ) from None


def read_cifar_pickle(path: str | Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python-version batch.

    Args:
        path: The pickle (e.g. ``data_batch_1``), written by Python 2 or 3.
        label_key: ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100).

    Returns:
        ``(images, labels)``: uint8 ``(N, 32, 32, 3)`` (NHWC) and int64 ``(N,)``.
    """
    with open(path, "rb") as f:
        batch = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: expected keys 'data' and {label_key!r}, got {sorted(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW-major
    return np.ascontiguousarray(images), np.asarray(batch[label_key], dtype=np.int64)


def load_raw(
    name: str, data_dir: str | Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None:
    """Load ``name`` from raw files under ``data_dir``, or return ``None`` if there are none.

    Returns:
        ``(x_train, y_train, x_test, y_test, num_classes)`` with uint8 NHWC images and int64
        labels, or ``None`` when ``data_dir`` holds no raw file of this dataset.
    """
    files = find_raw_files(name, data_dir)
    if files is None:
        return None
    if name in _IDX_SUBDIRS:
        x_train, y_train, x_test, y_test = (read_idx(files[k][0]) for k in _IDX_STEMS)
        if x_train.ndim == 3:
            x_train, x_test = x_train[..., None], x_test[..., None]
        return x_train, y_train, x_test, y_test, _NUM_CLASSES[name]
    label_key = "labels" if name == "cifar10" else "fine_labels"
    splits = []
    for split in ("train", "test"):
        parts = [read_cifar_pickle(p, label_key) for p in files[split]]
        splits.append(
            (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        )
    (x_train, y_train), (x_test, y_test) = splits
    return x_train, y_train, x_test, y_test, _NUM_CLASSES[name]

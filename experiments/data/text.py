"""Byte-level language-modelling data: the Python standard library's source, or any text file.

The offline default corpus is real text present on every machine that runs this code: the
``.py`` files of the interpreter's own standard library (``sysconfig.get_paths()["stdlib"]``,
without ``site-packages``/``dist-packages``, whose contents differ between machines), read in
sorted order of their relative paths and concatenated until a fixed byte budget is reached.
Nothing is downloaded. The corpus is a pure function of the standard library's files (the
same for one Python release, unless a distribution patches them) and of ``max_bytes``.
``text_file`` takes any file instead (its first ``max_bytes`` bytes).

Tokens are the bytes themselves (0..255, so 256 classes). The byte stream is split by
contiguous blocks: the first ``1 - test_fraction`` of it is the training split, the rest the
test split. Each split is cut into non-overlapping windows of ``context + 1`` bytes: an
example's input is the first ``context`` bytes and its labels the last ``context`` (the next
byte at every position). No byte belongs to two windows, so no text is shared between splits
(the study's validation split is the last contiguous block of the training windows; see
:func:`experiments.study.run_study`). A trailing remainder shorter than a window is dropped.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np

from experiments.data.dataset import Dataset
from experiments.data.errors import DatasetNotFoundError
from optlab.validation import check_int_in_range

__all__ = [
    "DEFAULT_CONTEXT",
    "DEFAULT_MAX_BYTES",
    "VOCAB_SIZE",
    "load_text",
    "read_corpus",
    "stdlib_files",
    "windows",
]

VOCAB_SIZE = 256
DEFAULT_CONTEXT = 64
DEFAULT_MAX_BYTES = 1 << 20  # 1 MiB: about 16k windows of 64 bytes; seconds to read
_MACHINE_SPECIFIC = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by their path relative to ``root``.

    Args:
        root: the standard-library directory (default ``sysconfig.get_paths()["stdlib"]``).

    Returns:
        Absolute paths, in the corpus order; installed third-party packages
        (``site-packages``, ``dist-packages``) are left out.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subfolders, names in os.walk(base):
        subfolders[:] = [d for d in subfolders if d not in _MACHINE_SPECIFIC]  # never entered
        for name in names:
            if name.endswith(".py"):
                path = Path(folder, name)
                found.append((path.relative_to(base).as_posix(), path))
    return [path for _, path in sorted(found)]


def read_corpus(text_file: str | os.PathLike | None = None, *, max_bytes: int) -> bytes:
    """The first ``max_bytes`` bytes of ``text_file``, or of the standard-library corpus.

    Raises:
        DatasetNotFoundError: If ``text_file`` does not exist or is not a file.
        ValueError: If ``max_bytes`` is not a positive integer.
    """
    max_bytes = check_int_in_range("max_bytes", max_bytes, min_value=1)
    if text_file:
        path = Path(text_file).expanduser()
        if not path.is_file():
            raise DatasetNotFoundError(
                f"text_file {str(path)!r} is not a readable file; pass a path to any text file "
                "(e.g. --config.text_file=/path/to/book.txt), or leave text_file empty for the "
                "offline default corpus (the Python standard library's source)."
            )
        with path.open("rb") as f:
            return f.read(max_bytes)
    chunks, size = [], 0
    for path in stdlib_files():
        data = path.read_bytes()[: max_bytes - size]
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return b"".join(chunks)


def windows(data: bytes | np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping next-byte windows: ``(x, y)`` int32 of shape ``(N, context)``.

    Window ``i`` covers bytes ``[i * (context + 1), (i + 1) * (context + 1))``; ``x`` holds
    its first ``context`` bytes and ``y`` its last ``context`` (``y[:, t] = x[:, t + 1]`` inside
    a window). The remainder that does not fill a window is dropped.

    Example:
        >>> x, y = windows(b"abcdefgh", context=3)
        >>> x.tolist(), y.tolist()
        ([[97, 98, 99], [101, 102, 103]], [[98, 99, 100], [102, 103, 104]])
    """
    context = check_int_in_range("context", context, min_value=1)
    tokens = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)
    n = len(tokens) // (context + 1)
    blocks = tokens[: n * (context + 1)].reshape(n, context + 1).astype(np.int32)
    return blocks[:, :-1], blocks[:, 1:]


def load_text(
    *,
    seed: int = 0,
    text_file: str | os.PathLike | None = None,
    context: int = DEFAULT_CONTEXT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    test_fraction: float = 0.1,
) -> Dataset:
    """Byte-level next-token windows of the standard-library corpus (or of ``text_file``).

    Args:
        seed: Accepted for the loader interface; the corpus, windows and split involve no
            randomness.
        text_file: A path to any file, read as bytes; ``None`` or ``""`` for the offline
            default corpus (see the module docstring).
        context: Bytes per example (the model's context length), ``>= 1``.
        max_bytes: The deterministic size cap: only the first ``max_bytes`` bytes of the
            corpus are used, ``>= 1``.
        test_fraction: Fraction of the bytes (the last ones) in the test split, in ``(0, 1)``.

    Returns:
        A :class:`Dataset` named ``"text"`` with int32 ``x``/``y`` of shape ``(N, context)``
        (tokens, not standardized) and ``num_classes=256``.

    Raises:
        ValueError: On a bad argument, or when a split would hold no window (the message
            says how many bytes are needed).
        DatasetNotFoundError: If ``text_file`` is not a file.
    """
    del seed  # nothing random
    context = check_int_in_range("context", context, min_value=1)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data = np.frombuffer(read_corpus(text_file, max_bytes=max_bytes), np.uint8)
    cut = round(len(data) * (1.0 - test_fraction))
    x_train, y_train = windows(data[:cut], context)
    x_test, y_test = windows(data[cut:], context)
    if not len(x_train) or not len(x_test):
        source = repr(str(text_file)) if text_file else "the standard-library corpus"
        need = int(np.ceil((context + 1) / min(test_fraction, 1.0 - test_fraction)))
        raise ValueError(
            f"text: {len(data)} bytes of {source} leave a split without a window of "
            f"context + 1 = {context + 1} bytes (test_fraction={test_fraction}); "
            f"give at least {need} bytes (max_bytes) or a shorter context."
        )
    return Dataset("text", x_train, y_train, x_test, y_test, VOCAB_SIZE)

"""Errors raised by the dataset loaders."""

from __future__ import annotations

__all__ = ["DatasetNotFoundError"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are absent (or unusable) and no download is attempted.

    Raised at once, before any network access, by :func:`experiments.data.load_dataset` for
    datasets that are not generated locally. The message says exactly how to prepare the data
    (a TFDS ``array_record`` build on a machine with internet access, or raw files in a
    directory passed as ``data_dir``).
    """

"""Data for the research harness: datasets, worker/client partitions, batching.

Offline by default (scikit-learn digits, locally generated MNIST-1D, byte-level text of
the Python standard library's source or any ``text_file``); MNIST,
Fashion-MNIST and CIFAR-10/100 come from raw files or a prepared TFDS ``array_record``
build, never from a download.
"""

from __future__ import annotations

from experiments.data.batching import BatchIterator, epoch_batches
from experiments.data.dataset import Dataset
from experiments.data.errors import DatasetNotFoundError
from experiments.data.partition import partition_dirichlet, partition_iid, partition_k_classes
from experiments.data.registry import DATASET_NAMES, load_dataset

__all__ = [
    "DATASET_NAMES",
    "BatchIterator",
    "Dataset",
    "DatasetNotFoundError",
    "epoch_batches",
    "load_dataset",
    "partition_dirichlet",
    "partition_iid",
    "partition_k_classes",
]

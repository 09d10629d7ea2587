"""Tests for experiments.data: loaders, partitions, batching."""

from __future__ import annotations

import gzip
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from experiments.data import (
    DATASET_NAMES,
    BatchIterator,
    Dataset,
    DatasetNotFoundError,
    epoch_batches,
    load_dataset,
    partition_dirichlet,
    partition_iid,
    partition_k_classes,
    tfds_source,
)
from experiments.data import mnist1d as mnist1d_module
from experiments.data import raw as raw_module

HYPOTHESIS = settings(deadline=None, max_examples=25)


def _check_contract(ds: Dataset, name: str, x_shape: tuple[int, ...], num_classes: int) -> None:
    assert ds.name == name
    assert ds.num_classes == num_classes
    assert ds.x_train.shape[1:] == x_shape
    assert ds.x_test.shape[1:] == x_shape
    assert ds.x_train.dtype == np.float32
    assert ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int32
    assert ds.y_test.dtype == np.int32
    assert len(ds.x_train) == len(ds.y_train)
    assert len(ds.x_test) == len(ds.y_test)
    assert ds.y_train.min() >= 0
    assert ds.y_train.max() < num_classes


def _assert_standardized(x: np.ndarray) -> None:
    axes = tuple(range(x.ndim - 1))
    np.testing.assert_allclose(x.mean(axis=axes), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=axes), 1.0, atol=1e-4)


# ----------------------------------------------------------------------------- digits


def test_digits_contract_and_standardization():
    ds = load_dataset("digits", seed=0)
    _check_contract(ds, "digits", (8, 8, 1), 10)
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert len(ds.y_test) == 360  # ceil(0.2 * 1797)
    _assert_standardized(ds.x_train)
    # Stratified: every class is in the test split at roughly its overall frequency.
    assert np.all(np.bincount(ds.y_test, minlength=10) >= 34)


def test_digits_split_is_fixed_by_seed():
    a, b, c = (load_dataset("digits", seed=s) for s in (3, 3, 4))
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.y_train, c.y_train)


def test_digits_options():
    ds = load_dataset("digits", seed=0, test_fraction=0.5, max_train=100, max_test=50)
    assert (len(ds.y_train), len(ds.y_test)) == (100, 50)
    _assert_standardized(ds.x_train)
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(info.value)


# ----------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_contract_determinism_and_balance():
    a = load_dataset("mnist1d", seed=0)
    _check_contract(a, "mnist1d", (40, 1), 10)
    assert (len(a.y_train), len(a.y_test)) == (4000, 1000)
    _assert_standardized(a.x_train)
    b = load_dataset("mnist1d", seed=0)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    c = load_dataset("mnist1d", seed=1)
    assert not np.allclose(a.x_train, c.x_train)
    for labels in (a.y_train, a.y_test):
        counts = np.bincount(labels, minlength=10)
        assert counts.min() > 0.7 * counts.mean()
        assert counts.max() < 1.3 * counts.mean()
    # 500 examples per class before the split.
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([a.y_train, a.y_test])), np.full(10, 500)
    )


def test_mnist1d_templates_are_distinct_and_start_at_zero():
    t = mnist1d_module.mnist1d_templates()
    assert t.shape == (10, 12)
    np.testing.assert_allclose(t[:, 0], 0.0)
    distances = np.linalg.norm(t[:, None] - t[None], axis=-1) + np.eye(10)
    assert distances.min() > 0.05


def test_mnist1d_generator_matches_per_example_reference():
    """The vectorized pipeline equals a per-example loop of the official transform."""
    from scipy.interpolate import interp1d
    from scipy.ndimage import gaussian_filter

    x, y = mnist1d_module.generate_mnist1d(
        seed=7,
        num_samples=30,
        template_len=12,
        padding=(36, 60),
        scale_coeff=0.4,
        max_translation=48,
        corr_noise_scale=0.25,
        iid_noise_scale=2e-2,
        shear_scale=0.75,
        final_seq_length=40,
    )

    # Same draws, same order as the generator; the transform itself is written per example.
    rng = np.random.default_rng(7)
    n, length = 30, 72
    labels = np.repeat(np.arange(10), 3)
    pad = rng.integers(36, 60, endpoint=True, size=n)
    scale_u = rng.random(n)
    shift = rng.integers(0, 48, size=n)
    corr = rng.standard_normal((n, length))
    iid = rng.standard_normal((n, length))
    shear_u = rng.random(n)
    order = rng.permutation(n)

    def interpolate(signal, num):
        return interp1d(np.linspace(0, 1, len(signal)), signal, kind="linear")(
            np.linspace(0, 1, num)
        )

    templates = mnist1d_module.mnist1d_templates()
    expected = []
    for i in range(n):
        s = np.concatenate([templates[labels[i]] + 1e-8, np.zeros(pad[i])])
        s = interpolate(s, length)
        s = s * (1 + 0.4 * (scale_u[i] - 0.5))
        k = shift[i]
        s = np.concatenate([s[-k:], s[:-k]]) if k else s
        mask = s != 0
        s = mask * s + (1 - mask) * gaussian_filter(0.25 * corr[i], 2)
        s = s + 2e-2 * iid[i]
        s = s - 0.75 * (shear_u[i] - 0.5) * np.linspace(-0.5, 0.5, length)
        expected.append(interpolate(s, 40))
    np.testing.assert_allclose(x, np.stack(expected)[order], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(y, labels[order])


# ----------------------------------------------------------------------------- partitions


def _assert_exact_cover(parts: list[np.ndarray], n: int, num_parts: int) -> None:
    assert len(parts) == num_parts
    for part in parts:
        assert part.ndim == 1
        assert np.issubdtype(part.dtype, np.integer)
        assert np.all(np.diff(part) > 0)  # sorted, no duplicates within a part
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def _labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=n)


@HYPOTHESIS
@given(
    n=st.integers(1, 200),
    num_classes=st.integers(1, 10),
    seed=st.integers(0, 2**16),
    num_parts=st.integers(1, 25),
)
def test_partition_iid_exact_cover(n, num_classes, seed, num_parts):
    assume(num_parts <= n)
    parts = partition_iid(_labels(n, num_classes, seed), num_parts, rng=np.random.default_rng(seed))
    _assert_exact_cover(parts, n, num_parts)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


@HYPOTHESIS
@given(
    n=st.integers(1, 200),
    num_classes=st.integers(1, 10),
    seed=st.integers(0, 2**16),
    num_parts=st.integers(1, 25),
    alpha=st.floats(1e-3, 1e3),
)
def test_partition_dirichlet_exact_cover(n, num_classes, seed, num_parts, alpha):
    assume(num_parts <= n)
    parts = partition_dirichlet(
        _labels(n, num_classes, seed), num_parts, alpha, rng=np.random.default_rng(seed), min_size=0
    )
    _assert_exact_cover(parts, n, num_parts)


@HYPOTHESIS
@given(
    n=st.integers(1, 200),
    num_classes=st.integers(1, 10),
    seed=st.integers(0, 2**16),
    num_parts=st.integers(1, 25),
    k=st.integers(1, 4),
)
def test_partition_k_classes_exact_cover_and_at_most_k_labels(n, num_classes, seed, num_parts, k):
    labels = _labels(n, num_classes, seed)
    assume(np.unique(labels).size <= num_parts * k <= n)
    parts = partition_k_classes(labels, num_parts, k, rng=np.random.default_rng(seed))
    _assert_exact_cover(parts, n, num_parts)
    for part in parts:
        assert part.size >= 1
        assert np.unique(labels[part]).size <= k


def test_partition_dirichlet_min_size_is_honoured():
    labels = np.repeat(np.arange(10), 50)
    parts = partition_dirichlet(labels, 8, 0.5, rng=np.random.default_rng(0), min_size=10)
    _assert_exact_cover(parts, 500, 8)
    assert min(p.size for p in parts) >= 10


def test_partition_dirichlet_alpha_controls_skew():
    labels = np.repeat(np.arange(10), 100)

    def counts(alpha: float) -> np.ndarray:  # (part, class) example counts
        parts = partition_dirichlet(labels, 10, alpha, rng=np.random.default_rng(1), min_size=0)
        return np.stack([np.bincount(labels[p], minlength=10) for p in parts])

    # Tiny alpha: each class lands (almost) entirely in a single part.
    assert np.all(counts(1e-3).max(axis=0) >= 95)
    # Huge alpha: every part holds about 1/10 of every class.
    np.testing.assert_allclose(counts(1e4), 10, atol=2)


def test_partition_dirichlet_gives_up_with_a_clear_error():
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(ValueError, match=r"min_size=1.*max_retries=5"):
        partition_dirichlet(labels, 20, 1e-4, rng=np.random.default_rng(0), max_retries=5)


def test_partition_k_classes_pathological_protocol():
    labels = np.repeat(np.arange(10), 60)
    parts = partition_k_classes(labels, 10, 2, rng=np.random.default_rng(0))
    _assert_exact_cover(parts, 600, 10)
    assert all(p.size == 60 for p in parts)  # 20 single-class shards of 30
    assert all(1 <= np.unique(labels[p]).size <= 2 for p in parts)


LABELS = np.repeat(np.arange(3), 4)  # 12 examples, 3 classes


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "pattern"),
    [
        (partition_iid, (0,), {}, r"num_parts must be an integer in \[1, 12\].*got 0"),
        (partition_iid, (13,), {}, r"num_parts .*got 13"),
        (partition_iid, (2.0,), {}, r"num_parts .*got 2\.0"),
        (partition_dirichlet, (0, 1.0), {}, r"num_parts .*got 0"),
        (partition_dirichlet, (2, 0.0), {}, r"alpha must be a finite float > 0, got 0\.0"),
        (partition_dirichlet, (2, -1.0), {}, r"alpha .*got -1\.0"),
        (partition_dirichlet, (2, float("inf")), {}, r"alpha .*got inf"),
        (partition_dirichlet, (2, 1.0), {"min_size": 7}, r"min_size .*\[0, 6\].*got 7"),
        (partition_dirichlet, (2, 1.0), {"max_retries": 0}, r"max_retries .*got 0"),
        (partition_k_classes, (0, 1), {}, r"num_parts .*got 0"),
        (partition_k_classes, (2, 0), {}, r"k must be an integer >= 1, got 0"),
        (partition_k_classes, (1, 2), {}, r"num_parts \* k .*number of classes = 3.*k=2"),
        (partition_k_classes, (5, 3), {}, r"num_parts \* k .*number of examples = 12"),
    ],
)
def test_partition_argument_errors_name_the_parameter(fn, args, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn(LABELS, *args, rng=np.random.default_rng(0), **kwargs)


def test_partition_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        partition_iid(np.zeros((3, 2), dtype=int), 1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="labels"):
        partition_iid(np.zeros(3), 1, rng=np.random.default_rng(0))


# ----------------------------------------------------------------------------- batching


def _toy(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n * 2, dtype=np.float32).reshape(n, 2), np.arange(n)


def test_batch_at_is_a_pure_function_of_seed_and_step():
    x, y = _toy()
    a, b = BatchIterator(x, y, 3, seed=5), BatchIterator(x, y, 3, seed=5)
    first = a.batch_at(7)
    a.batch_at(0), a.batch_at(100)  # visit other epochs: the cache must not leak
    for it in (a, b):
        again = it.batch_at(7)
        np.testing.assert_array_equal(again["x"], first["x"])
        np.testing.assert_array_equal(again["y"], first["y"])
    np.testing.assert_array_equal(first["x"][:, 0], 2 * first["y"])  # x and y stay paired
    other = BatchIterator(x, y, 3, seed=6)
    assert any(not np.array_equal(other.batch_at(s)["y"], a.batch_at(s)["y"]) for s in range(6))


def test_iteration_resumes_from_position():
    x, y = _toy()
    reference = BatchIterator(x, y, 4, seed=0)
    it = BatchIterator(x, y, 4, seed=0)
    it.position = 5
    for offset in range(6):
        np.testing.assert_array_equal(next(it)["y"], reference.batch_at(5 + offset)["y"])
    assert it.position == 11
    assert iter(it) is it


def test_epochs_cover_every_example_once_and_differ():
    x, y = _toy(10)
    it = BatchIterator(x, y, 3, seed=0, drop_remainder=False)
    assert it.steps_per_epoch == 4
    orders = []
    for epoch in range(3):
        batches = [next(it)["y"] for _ in range(it.steps_per_epoch)]
        assert [b.size for b in batches] == [3, 3, 3, 1]
        order = np.concatenate(batches)
        np.testing.assert_array_equal(np.sort(order), np.arange(10))
        np.testing.assert_array_equal(order, np.random.default_rng([0, epoch]).permutation(10))
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])


def test_drop_remainder_and_no_shuffle():
    x, y = _toy(10)
    it = BatchIterator(x, y, 3, seed=0)
    assert it.steps_per_epoch == 3
    epoch = np.concatenate([it.batch_at(s)["y"] for s in range(3)])
    assert epoch.size == 9
    assert np.unique(epoch).size == 9
    ordered = BatchIterator(x, y, 4, seed=0, shuffle=False, drop_remainder=False)
    np.testing.assert_array_equal(ordered.batch_at(2)["y"], [8, 9])
    np.testing.assert_array_equal(ordered.batch_at(3)["y"], [0, 1, 2, 3])


@pytest.mark.parametrize("batch_size", [0, 11, 2.5])
def test_batch_size_is_validated(batch_size):
    x, y = _toy(10)
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, 10\]"):
        BatchIterator(x, y, batch_size, seed=0)


def test_batch_iterator_other_errors():
    x, y = _toy(10)
    with pytest.raises(ValueError, match="same length"):
        BatchIterator(x, y[:5], 2, seed=0)
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(x, y, 2, seed=-1)
    with pytest.raises(ValueError, match="step"):
        BatchIterator(x, y, 2, seed=0).batch_at(-1)


def test_epoch_batches_in_order():
    x, y = _toy(10)
    batches = list(epoch_batches(x, y, 4))
    assert [b["y"].size for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    assert [b["y"].size for b in epoch_batches(x, y, 64)] == [10]
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batches(x, y, 0)  # eager, before iteration


# ----------------------------------------------------------------------------- TFDS


@pytest.mark.parametrize(("name", "shape"), [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_path_under_mock_data(monkeypatch, tmp_path, name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    # mock_data mocks the data source but not `is_prepared`.
    monkeypatch.setattr(tfds_source, "_is_prepared", lambda builder: True)
    with tfds.testing.mock_data(num_examples=6):
        ds = load_dataset(name, seed=0, data_dir=str(tmp_path))
        small = load_dataset(name, seed=0, data_dir=str(tmp_path), max_train=4, max_test=2)
    _check_contract(ds, name, shape, 10)
    assert (len(ds.y_train), len(ds.y_test)) == (6, 6)
    _assert_standardized(ds.x_train)
    assert (len(small.y_train), len(small.y_test)) == (4, 2)


@pytest.mark.parametrize("name", ["mnist", "cifar100"])
def test_absent_tfds_data_fails_fast_with_instructions(tmp_path, name):
    pytest.importorskip("tensorflow_datasets")
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, data_dir=str(tmp_path))
    assert time.monotonic() - start < 20  # no download attempt
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert f"tfds.builder('{name}', data_dir='{tmp_path}')" in message
    assert "download_and_prepare(file_format='array_record')" in message
    assert "pip install tensorflow-datasets tensorflow" in message
    assert "data_dir=DIR" in message  # the raw-file alternative


def test_missing_tfds_package_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "optlab\[tfds\]"'):
        load_dataset("mnist", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- raw files


def _write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_raw_idx_loader(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (5, 4, 4)), "t10k": rng.integers(0, 256, (3, 4, 4))}
    labels = {"train": np.array([0, 1, 2, 9, 4]), "t10k": np.array([3, 3, 7])}
    folder = tmp_path / "MNIST" / "raw"  # torchvision layout
    folder.mkdir(parents=True)
    for split in ("train", "t10k"):
        _write_idx(folder / f"{split}-images-idx3-ubyte", images[split], compress=compress)
        _write_idx(folder / f"{split}-labels-idx1-ubyte", labels[split], compress=compress)
    suffix = ".gz" if compress else ""
    np.testing.assert_array_equal(
        raw_module.read_idx(folder / f"train-images-idx3-ubyte{suffix}"), images["train"]
    )
    ds = load_dataset("mnist", data_dir=str(tmp_path))
    _check_contract(ds, "mnist", (4, 4, 1), 10)
    np.testing.assert_array_equal(ds.y_train, labels["train"])
    np.testing.assert_array_equal(ds.y_test, labels["t10k"])
    _assert_standardized(ds.x_train)
    mean, std = images["train"].mean(), images["train"].std()
    np.testing.assert_allclose(ds.x_test[..., 0], (images["t10k"] - mean) / std, rtol=1e-5)


def test_raw_idx_incomplete_directory_is_an_error(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 4, 4)))
    with pytest.raises(DatasetNotFoundError, match="missing train-labels-idx1-ubyte"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


def test_read_idx_rejects_garbage(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        raw_module.read_idx(bad)


def _cifar_batch(rng: np.random.Generator, n: int, label_key: bytes) -> dict:
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, 10, n)],
        b"batch_label": b"test",
    }


def test_raw_cifar10_loader(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f"data_batch_{i}": _cifar_batch(rng, 2, b"labels") for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(rng, 3, b"labels")
    for fname, batch in batches.items():
        (folder / fname).write_bytes(pickle.dumps(batch, protocol=2))
    images, labels = raw_module.read_cifar_pickle(folder / "data_batch_1", "labels")
    data = batches["data_batch_1"][b"data"]
    # Row layout is R plane, G plane, B plane, each 32x32 row-major.
    assert images.shape == (2, 32, 32, 3)
    assert images[1, 5, 7, 2] == data[1, 2 * 1024 + 5 * 32 + 7]
    np.testing.assert_array_equal(labels, batches["data_batch_1"][b"labels"])
    ds = load_dataset("cifar10", data_dir=str(tmp_path))
    _check_contract(ds, "cifar10", (32, 32, 3), 10)
    assert (len(ds.y_train), len(ds.y_test)) == (10, 3)
    _assert_standardized(ds.x_train)
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])


def test_raw_cifar100_loader(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for fname, n in (("train", 4), ("test", 2)):
        batch = _cifar_batch(rng, n, b"fine_labels")
        batch[b"coarse_labels"] = [0] * n
        (folder / fname).write_bytes(pickle.dumps(batch))  # default protocol (NumPy 2 names)
    ds = load_dataset("cifar100", data_dir=str(tmp_path))
    _check_contract(ds, "cifar100", (32, 32, 3), 100)
    assert (len(ds.y_train), len(ds.y_test)) == (4, 2)


def test_cifar_pickle_refuses_arbitrary_globals(tmp_path):
    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps({"data": print, "labels": []}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load builtins\.print"):
        raw_module.read_cifar_pickle(path, "labels")

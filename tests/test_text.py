"""Tests for experiments.data.text and the study's handling of the "text" dataset.

The byte-level corpus (the standard library's source, or ``text_file``), the next-byte
windows, the contiguous train/validation/test blocks, iid partitions for 8 workers, the
``--config.text_file`` override, and one study run of the transformer end to end.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from experiments import study as st
from experiments.cli import UsageError, apply_overrides, check_task_overrides
from experiments.data import DatasetNotFoundError, load_dataset
from experiments.data.text import read_corpus, stdlib_files, windows
from experiments.errors import ConfigError
from experiments.optimizers import make_optimizer
from experiments.train.metrics import read_metrics


def _fake_stdlib(root: Path) -> None:
    for relative, text in {
        "b.py": "b",
        "a/z.py": "az",
        "a/__init__.py": "a-init",
        "notes.txt": "not python",
        "site-packages/pkg/mod.py": "installed, machine-specific",
        "a/dist-packages/x.py": "installed too",
    }.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


def test_stdlib_corpus_order_exclusions_budget_and_determinism(tmp_path):
    _fake_stdlib(tmp_path)
    relative = [p.relative_to(tmp_path).as_posix() for p in stdlib_files(tmp_path)]
    assert relative == ["a/__init__.py", "a/z.py", "b.py"]  # sorted, .py only, no installs

    real = stdlib_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert {"os.py", "json/__init__.py"} <= {p.relative_to(stdlib).as_posix() for p in real}
    assert not any("site-packages" in p.parts for p in real)
    # The corpus is the concatenation of those files, in that order, cut at the budget.
    expected = b"".join(p.read_bytes() for p in real[:3])[:5000]
    assert len(expected) == 5000, "the first three stdlib files are assumed >= 5000 bytes"
    corpus = read_corpus(max_bytes=5000)
    assert corpus == expected == read_corpus(max_bytes=5000)


def test_text_file_windows_and_splits_share_no_byte(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=1000, dtype=np.uint8).tobytes()
    path = tmp_path / "book.txt"
    path.write_bytes(data)
    ds = load_dataset("text", text_file=str(path), context=7, max_bytes=900, test_fraction=0.25)
    assert (ds.name, ds.num_classes, ds.x_train.dtype, ds.y_test.dtype) == (
        "text",
        256,
        np.int32,
        np.int32,
    )
    # Independent restatement: non-overlapping 8-byte blocks of bytes [0, 675) and [675, 900).
    stream = np.frombuffer(data, np.uint8).astype(np.int32)
    for (x, y), (start, stop) in (
        ((ds.x_train, ds.y_train), (0, 675)),
        ((ds.x_test, ds.y_test), (675, 900)),
    ):
        n = (stop - start) // 8
        assert x.shape == y.shape == (n, 7)
        for i in range(n):
            block = stream[start + 8 * i : start + 8 * (i + 1)]
            np.testing.assert_array_equal(x[i], block[:-1])
            np.testing.assert_array_equal(y[i], block[1:])  # the next byte at every position
    assert ds.x_test[-1, 0] == stream[675 + 8 * 27]  # the last test window ends at byte 899
    np.testing.assert_array_equal(windows(data[:16], 7)[0], ds.x_train[:2])


def test_bad_text_arguments(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="text_file"):
        load_dataset("text", text_file=str(tmp_path / "absent.txt"))
    with pytest.raises(ValueError, match="context"):
        load_dataset("text", context=0, max_bytes=100)
    with pytest.raises(ValueError, match="max_bytes"):
        load_dataset("text", max_bytes=0)
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("text", test_fraction=1.0, max_bytes=100)
    with pytest.raises(ValueError, match="at least 650 bytes"):
        load_dataset("text", context=64, max_bytes=600)  # the test split holds no window


def _text_task(**fields) -> st.Task:
    defaults = dict(batch_size=4, steps=4, log_every=2, text_context=16, text_bytes=4000)
    return st.Task("text", "text", "transformer_lm_tiny", **{**defaults, **fields})


def _study(task: st.Task) -> st.Study:
    return st.Study(
        name="lm",
        claim="a byte-level transformer learns",
        tasks=(task,),
        methods=(st.Method("adam", {"optimizer": "adam", "learning_rate": 1e-2}),),
        seeds=(0,),
        make_tx=lambda spec, ctx: make_optimizer(spec, steps=ctx.steps),
    )


def test_study_text_task_splits_partitions_and_refusals():
    data = st._load(_text_task(workers=8, validation_fraction=0.2), 1, {})
    full = load_dataset("text", context=16, max_bytes=4000)
    n = len(full.x_train)
    n_val = round(0.2 * n)
    # Validation is the last contiguous block of the training windows: no shared text.
    np.testing.assert_array_equal(data.dataset.x_train, full.x_train[: n - n_val])
    np.testing.assert_array_equal(data.x_val, full.x_train[n - n_val :])
    np.testing.assert_array_equal(data.y_val, full.y_train[n - n_val :])
    # iid worker partitions of the training windows, each window exactly once.
    assert len(data.partitions) == 8
    np.testing.assert_array_equal(np.sort(np.concatenate(data.partitions)), np.arange(n - n_val))
    assert max(map(len, data.partitions)) - min(map(len, data.partitions)) <= 1

    with pytest.raises(ValueError, match="partition must be 'iid'"):
        _study(_text_task(workers=8, partition="dirichlet"))
    with pytest.raises(ValueError, match="text_file applies to the 'text' dataset only"):
        _study(st.Task("digits", "digits", "mlp", batch_size=8, steps=1, text_file="a.txt"))
    with pytest.raises(ValueError, match="model must be one of"):
        _study(st.Task("text", "text", "mlp", batch_size=8, steps=1))
    with pytest.raises(ValueError, match="model must be a classifier"):
        _study(st.Task("digits", "digits", "transformer_lm", batch_size=8, steps=1))
    with pytest.raises(ValueError, match="text_context must be >= 0"):
        _study(_text_task(text_context=-1))
    with pytest.raises(ConfigError, match="batch_size"):
        st._load(_text_task(batch_size=10_000), 1, {})


@pytest.mark.parametrize("variant", ["smoke", "quick"])
def test_baselines_text_task_and_cli_overrides_reach_the_task(tmp_path, variant):
    from experiments.configs.baselines import get_config
    from experiments.runners import baselines

    config = get_config(variant)
    path = str(tmp_path / "book.txt")
    overrides = ["--config.task_names=digits,text", f"--config.text_file={path}"]
    assert apply_overrides(config, [*overrides, "--config.tasks.text.text_context=32"])
    digits, text = st.tasks_from_config(config)
    assert (text.dataset, text.text_file, text.text_context) == ("text", path, 32)
    assert text.model in ("transformer_lm", "transformer_lm_tiny")
    assert (digits.text_file, digits.text_context) == ("", 0)  # text options: text tasks only
    baselines.validate(config)  # the whole study builds
    # A top-level default the text task sets itself is refused only when the task runs.
    with pytest.raises(UsageError, match=r"set --config\.tasks\.text\.batch_size instead"):
        check_task_overrides(config, ["batch_size"])
    config.task_names = ("digits",)
    check_task_overrides(config, ["batch_size"])
    with pytest.raises(ValueError, match="text_file set, but no task that runs uses"):
        st.tasks_from_config(config)  # the text_file override would have no effect
    config.task_names = ("digits", "text")
    config.tasks.digits.text_file = path  # but set on a digits task itself: refused
    with pytest.raises(ValueError, match=r"tasks\.digits\.text_file applies to the 'text'"):
        baselines.validate(config)


def test_study_trains_the_transformer_on_text(tmp_path):
    """End to end through ``run_study``: the loss falls, and the test and train splits report
    perplexity = exp(loss) and bits = loss / ln 2. (One group, no validation split: every
    extra evaluator or worker axis costs seconds of compilation; the splits and worker
    partitions are checked above, on the data alone.)"""
    study = _study(_text_task(batch_size=16, steps=30, log_every=10, validation_fraction=0.0))
    results = st.run_study(study, tmp_path, progress=False)
    (run,) = results["runs"]
    for split in ("train", "test"):
        loss = run[f"{split}_loss"]
        assert 0.0 < loss < math.log(256)  # below the uniform guess
        assert run[f"{split}_perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
        assert run[f"{split}_bits_per_token"] == pytest.approx(loss / math.log(2), rel=1e-5)
        assert 0.0 <= run[f"{split}_accuracy"] <= 1.0
    curve = [r["train_loss"] for r in read_metrics(tmp_path / "text" / "metrics.jsonl")[:3]]
    assert curve[2] < curve[0] - 0.5  # mean training loss of steps 21-30 vs 1-10
    header = "| method | point | test_accuracy | val_accuracy | train_loss | test_perplexity |"
    assert header in (tmp_path / "results.md").read_text()  # added for a language model

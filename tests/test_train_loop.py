"""The training loop: exact resume, the non-finite stop, metrics, data parallelism."""

import json

import jax
import numpy as np
import optax
import pytest

from experiments.data import BatchIterator, load_dataset
from experiments.models import make_model
from experiments.train import (
    Checkpointer,
    MetricsWriter,
    NonFiniteLossError,
    classification_loss,
    make_evaluator,
    read_metrics,
    train,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", max_train=256, max_test=128)


def _train(digits, run_dir, steps, *, tx=None, batches=None, devices=1, model="mlp", **kw):
    model = make_model(model, num_classes=digits.num_classes)
    params, model_state = model.init(jax.random.key(0), digits.x_train[:1])
    return train(
        loss_fn=classification_loss(model),
        tx=tx or optax.adam(1e-2),
        params=params,
        model_state=model_state,
        batches=batches or BatchIterator(digits.x_train, digits.y_train, 32, seed=0),
        steps=steps,
        seed=0,
        run_dir=run_dir,
        evaluators={"test": make_evaluator(model, digits.x_test, digits.y_test)},
        metrics=MetricsWriter(run_dir / "metrics.jsonl", method="m", seed=0),
        log_every=5,
        eval_every=kw.pop("eval_every", 10),
        checkpoint_every=kw.pop("checkpoint_every", 10),
        devices=devices,
        progress=False,
        **kw,
    )


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


@pytest.mark.parametrize("model", ["mlp", "resnet20"])
def test_resumed_run_is_bitwise_equal_to_uninterrupted(digits, tmp_path, model):
    steps = 30 if model == "mlp" else 10  # half-way is on the log grid (log_every=5)
    kw = {} if model == "mlp" else {"checkpoint_every": 5}
    if model == "resnet20":  # BatchNorm state and momentum state both checkpointed
        kw["tx"] = optax.sgd(0.05, momentum=0.9)
    full = _train(digits, tmp_path / "a", steps, model=model, **kw)
    _train(digits, tmp_path / "b", steps // 2, model=model, **kw)  # "interrupted" half-way
    resumed = _train(digits, tmp_path / "b", steps, model=model, **kw)
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert full.final == resumed.final
    # The metrics read as if the run had never stopped: no duplicate or missing records.
    assert _without_time(read_metrics(tmp_path / "a" / "metrics.jsonl")) == _without_time(
        read_metrics(tmp_path / "b" / "metrics.jsonl")
    )


def test_finished_run_is_not_retrained(digits, tmp_path):
    first = _train(digits, tmp_path, 10)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    again = _train(digits, tmp_path, 10)
    assert again.final == first.final
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines


class _NanAt:
    """Batches of a real iterator, except one poisoned step."""

    def __init__(self, inner, bad_step):
        self.inner, self.bad_step = inner, bad_step

    def batch_at(self, step):
        batch = self.inner.batch_at(step)
        if step == self.bad_step:
            batch = {"x": np.full_like(batch["x"], np.nan), "y": batch["y"]}
        return batch


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(digits, tmp_path):
    batches = _NanAt(BatchIterator(digits.x_train, digits.y_train, 32, seed=0), bad_step=23)
    with pytest.raises(NonFiniteLossError, match="non-finite at step 23") as info:
        _train(digits, tmp_path, 60, batches=batches)
    assert info.value.step == 23
    assert info.value.last_checkpoint == 20
    assert "last good checkpoint (step 20)" in str(info.value)
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.latest_step() == 20
    restored = checkpointer.restore(like=_train_state_like(digits))
    checkpointer.close()
    assert int(restored.step) == 20
    assert int(restored.first_nonfinite_step) == -1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def _train_state_like(digits):
    from experiments.train import init_train_state

    model = make_model("mlp", num_classes=digits.num_classes)
    params, model_state = model.init(jax.random.key(0), digits.x_train[:1])
    return init_train_state(params, model_state, optax.adam(1e-2), jax.random.key(0))


def test_metrics_records(digits, tmp_path):
    _train(digits, tmp_path, 20)
    records = read_metrics(tmp_path / "metrics.jsonl", method="m", seed=0)
    steps = [r["step"] for r in records if not r.get("final")]
    assert steps == [5, 10, 15, 20]
    assert all("train_loss" in r and "train_accuracy" in r for r in records[:-1])
    assert "test_accuracy" in records[1]  # eval_every=10
    final = records[-1]
    assert final["final"]
    assert final["step"] == 20
    assert 0 <= final["test_accuracy"] <= 1


def test_torn_last_metrics_line_is_dropped(tmp_path):
    writer = MetricsWriter(tmp_path / "m.jsonl", method="x", seed=0)
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": 1.0})
    with (tmp_path / "m.jsonl").open("a") as f:
        f.write('{"method": "x", "seed": 0, "st')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3]
    writer.truncate_after(2)
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_truncate_after_keeps_other_runs(tmp_path):
    a = MetricsWriter(tmp_path / "m.jsonl", method="a", seed=0)
    b = MetricsWriter(tmp_path / "m.jsonl", method="b", seed=0)
    for step in (1, 2, 3):
        a.write({"step": step})
        b.write({"step": step})
    a.truncate_after(1)
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl", method="a")] == [1]
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl", method="b")] == [1, 2, 3]


def test_data_parallel_loop_matches_single_device(digits, tmp_path):
    one = _train(digits, tmp_path / "one", 10, tx=optax.sgd(0.1, momentum=0.9))
    four = _train(digits, tmp_path / "four", 10, tx=optax.sgd(0.1, momentum=0.9), devices=4)
    for a, b in zip(
        jax.tree.leaves(one.state.params), jax.tree.leaves(four.state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    assert abs(one.final["test_accuracy"] - four.final["test_accuracy"]) <= 1 / 128


def test_records_of_a_run_killed_before_its_first_checkpoint_are_dropped(digits, tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl", method="m", seed=0)
    writer.write({"step": 5, "train_loss": 123.0})  # left by a run killed at step 7
    _train(digits, tmp_path, 10)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 10]
    assert records[0]["train_loss"] != 123.0


def test_eval_between_log_steps_keeps_the_log_windows(digits, tmp_path):
    _train(digits, tmp_path, 20, eval_every=4)  # log_every=5
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if not r.get("final")]
    assert [r["step"] for r in records if "train_loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in records if "test_accuracy" in r] == [4, 8, 12, 16]

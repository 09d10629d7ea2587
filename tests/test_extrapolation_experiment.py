"""The `extrapolation` experiment: a smallest sweep, divergence handling, schedules, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.cli import main
from experiments.configs.extrapolation import get_config
from experiments.runners import extrapolation as runner
from experiments.train.step import TrainState

SMALLEST = [
    "--no-progress",
    "--config.seeds=0",
    "--config.epochs=2",
    "--config.warmup_epochs=1",
    "--config.log_points=2",
    "--config.batch_sizes=64,0",
    "--config.method_names=sgd,extrap_sgd",
]


def test_smallest_sweep_writes_tables_plot_and_verdicts(capsys, tmp_path):
    workdir = tmp_path / "w"
    assert main(["run", "extrapolation", "--workdir", str(workdir), *SMALLEST]) == 0
    out = capsys.readouterr().out
    for name in ("results.md", "results.json", "accuracy_vs_batch_size.png", "b64/curves.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "b1437" / "metrics.jsonl").exists()  # 0 = the whole training set
    assert "| method | b=64 | b=1437 |" in out
    assert "[batch 64] extrap_sgd >= sgd in test accuracy" in out
    assert "[batch 1437] extrap_sgd >= sgd in test accuracy" in out
    assert "extrap_sgd loses less test accuracy than sgd from batch 64 to batch 1437" in out
    results = json.loads((workdir / "results.json").read_text())
    assert results["batch_sizes"] == [64, 1437]
    runs = {(r["batch_size"], r["method"]): r for r in results["runs"]}
    assert set(runs) == {(b, m) for b in (64, 1437) for m in ("sgd", "extrap_sgd")}
    # Equal epochs: 2 * (1437 // b) steps; linear scaling of the base rate 0.01 per 32.
    assert runs[(64, "sgd")]["steps"] == 2 * (1437 // 64)
    assert runs[(1437, "sgd")]["steps"] == 2
    assert runs[(1437, "extrap_sgd")]["learning_rate"] == pytest.approx(0.01 * 1437 / 32)
    assert not any(r["diverged"] for r in results["runs"])
    assert len(results["verdicts"]) == 3


def test_a_diverged_run_is_recorded_and_not_retrained(capsys, tmp_path):
    workdir = tmp_path / "w"
    argv = [
        "run",
        "extrapolation",
        "--workdir",
        str(workdir),
        *SMALLEST,
        "--config.batch_sizes=0",
        "--config.epochs=4",
        "--config.methods.extrap_sgd.learning_rate=1e4",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(1/1 diverged)" in out
    marker = workdir / "b1437" / "runs" / "extrap_sgd" / "seed0" / "diverged.json"
    record = json.loads(marker.read_text())
    assert record["diverged"]
    assert record["test_accuracy"] == pytest.approx(0.1)  # chance level
    results = json.loads((workdir / "results.json").read_text())
    sgd = next(r for r in results["runs"] if r["method"] == "sgd")
    assert not sgd["diverged"]  # the other method of the same suite call still finished
    assert sgd["test_accuracy"] > 0.5

    # Resuming reads the marker (the diverged run is not trained again): same results.
    assert main(argv) == 0
    again = json.loads((workdir / "results.json").read_text())

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rs]

    assert strip(again["runs"]) == strip(results["runs"])


def test_schedules_warm_up_then_decay():
    cosine = runner.lr_schedule(2.0, steps=100, warmup_steps=10, kind="warmup_cosine")
    assert float(cosine(0)) == 0.0
    assert float(cosine(10)) == pytest.approx(2.0)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-6)
    step = runner.lr_schedule(
        2.0, steps=100, warmup_steps=10, kind="warmup_step", decay_fractions=(0.5, 0.75)
    )
    assert [float(step(t)) for t in (0, 5, 10, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.0, 1.0, 2.0, 2.0, 0.2, 0.2, 0.02, 0.02]
    )
    no_warmup = runner.lr_schedule(1.0, steps=1, warmup_steps=5, kind="warmup_step")
    assert float(no_warmup(0)) == 1.0  # a one-step run is not all warm-up


def test_batch_config_keeps_epochs_and_scales_the_rate():
    config = get_config("quick")
    config.extrapolation_stop_epoch = 3
    cfg = runner.batch_config(config, 128, 1437, methods=["sgd", "extrap_past"], seeds=[0, 1])
    assert cfg.steps == config.epochs * (1437 // 128)
    spec = cfg.methods.extrap_past
    assert spec.learning_rate == pytest.approx(config.methods.sgd.learning_rate * 128 / 32)
    assert spec.warmup_steps == config.warmup_epochs * (1437 // 128)
    assert spec.stop_after == 3 * (1437 // 128)
    assert cfg.checkpoint_every % cfg.log_every == 0


def test_gamma_follows_the_schedule_and_eval_params_undo_the_offset():
    """gamma_t = ratio * lr_t (0 during the first warm-up step); the past variant's loop
    params are x + offset and eval_params returns x."""
    spec = {
        "optimizer": "sgd",
        "learning_rate": 0.5,
        "transform": "extrapolation",
        "direction": "past",
        "gamma_ratio": 0.2,
        "warmup_steps": 2,
        "schedule": "warmup_cosine",
    }
    tx = runner.make_tx("extrap_past", spec, 10)
    lr = runner.lr_schedule(0.5, steps=10, warmup_steps=2, kind="warmup_cosine")
    x = {"w": jnp.array([1.0, -2.0])}
    y, state = x, tx.init(x)
    for t in range(3):
        g = jax.tree.map(lambda p: 2 * p, y)  # gradient of |p|^2 at the loop's params
        updates, state = tx.update(g, state, y)
        lr_t = lr(t)
        x = jax.tree.map(lambda p, gi, lr_t=lr_t: p - lr_t * gi, x, g)  # SGD on the true x
        y = optax.apply_updates(y, updates)
        np.testing.assert_allclose(y["w"] - x["w"], -0.2 * lr(t + 1) * g["w"], rtol=1e-5)
        train_state = TrainState(0, y, {}, state, jnp.zeros(2, jnp.uint32), -1)
        np.testing.assert_allclose(runner.eval_params(train_state)["w"], x["w"], rtol=1e-5)
    sgd_state = TrainState(0, x, {}, optax.sgd(0.1).init(x), jnp.zeros(2, jnp.uint32), -1)
    assert runner.eval_params(sgd_state) is x


def test_full_variant_validates():
    runner.validate(get_config("full"))


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (["--config.epochs=0"], "epochs must be >= 1"),
        (["--config.warmup_epochs=30"], "warmup_epochs must lie in [0, epochs=30)"),
        (["--config.batch_sizes=-1"], "batch_sizes must be >= 1"),
        (["--config.batch_sizes=5000"], "batch_sizes must be in [1, 1437]"),
        (["--config.schedule=cosine"], "schedule must be one of"),
        (["--config.decay_fractions=0.5,1.5"], "decay_fractions must lie in (0, 1)"),
        (["--config.extrapolation_stop_epoch=31"], "extrapolation_stop_epoch must lie in"),
        (["--config.methods.extrap_sgd.direction=sideways"], "methods.extrap_sgd.direction"),
        (["--config.methods.extrap_sgd.gamma_ratio=-1.0"], "gamma_ratio must be >= 0"),
        (["--config.methods.sgd.optimizer=adam"], "methods.sgd.optimizer must be one of"),
        (["--config.method_names=extrap_sgd,sgd"], "must start with the SGD baseline"),
        (["--config.model=vgg"], "model must be one of"),
    ],
)
def test_config_errors_are_one_line_usage_errors(capsys, tmp_path, monkeypatch, override, pattern):
    def no_training(*args, **kwargs):
        raise AssertionError("an invalid config must be refused before any training")

    monkeypatch.setattr(runner, "run_suite", no_training)
    assert main(["run", "extrapolation", "--workdir", str(tmp_path / "w"), *override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert "Traceback" not in err, err
    assert pattern in err, err
    assert not (tmp_path / "w").exists()

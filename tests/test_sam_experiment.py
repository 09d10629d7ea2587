"""The `sam` experiment: a smallest end-to-end run, its sharpness measurement, its errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from experiments.cli import main
from experiments.configs.sam import get_config
from experiments.data import load_dataset
from experiments.models import make_model
from experiments.runners import sam as runner

SMALLEST = [
    "--no-progress",
    "--config.seeds=0",
    "--config.steps=20",
    "--config.task_steps=()",
    "--config.log_every=10",
    "--config.checkpoint_every=10",
    "--config.datasets=digits",
    "--config.models=mlp",
    "--config.method_names=sgd,sam_rho0p05",
    "--config.sharpness.num_examples=64",
    "--config.sharpness.iters=3",
    "--config.sharpness.trace_samples=2",
]


def test_smallest_run_writes_results_verdicts_and_resumes(capsys, tmp_path):
    workdir = tmp_path / "w"
    assert main(["run", "sam", "--workdir", str(workdir), *SMALLEST]) == 0
    out = capsys.readouterr().out
    for name in ("results.md", "results.json", "sharpness_vs_accuracy.png", "digits/curves.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert "| sam_tuned |" in out
    assert "[digits/mlp] sam_tuned >= sgd in test accuracy" in out
    assert "[digits/mlp] sam_tuned finds a flatter minimum than sgd" in out
    results = json.loads((workdir / "results.json").read_text())
    task = results["tasks"]["digits"]
    assert task["tuned"] == {"sam": "sam_rho0p05"}
    assert {(r["method"], r["seed"]) for r in task["runs"]} == {("sgd", 0), ("sam_rho0p05", 0)}
    for r in task["runs"]:
        for key in ("hessian_top_eigenvalue", "hessian_trace"):
            assert np.isfinite(r[key]), (r["method"], key, r[key])
            assert r[key] > 0, (r["method"], key, r[key])
        assert 0.0 <= r["val_accuracy"] <= 1.0
    assert len(results["verdicts"]) == 2
    assert all(v["claim"].startswith("[digits/mlp]") for v in results["verdicts"])

    # Re-running the same command resumes: nothing is retrained, the numbers are the same.
    assert main(["run", "sam", "--workdir", str(workdir), *SMALLEST]) == 0
    again = json.loads((workdir / "results.json").read_text())["tasks"]["digits"]["runs"]
    keys = ("test_accuracy", "hessian_top_eigenvalue", "val_accuracy")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in task["runs"]]


def test_sharpness_hook_matches_the_dense_hessian():
    """On a softmax regression (convex: the top eigenvalue is the largest in magnitude) the
    hook's numbers equal the eigenvalues and trace of the explicitly formed Hessian."""
    data = load_dataset("digits", max_train=80)
    data = data._replace(x_train=data.x_train[:, ::2, ::2], x_test=data.x_test[:, ::2, ::2])
    model = make_model("mlp", num_classes=10, hidden=())
    params, state = model.init(jax.random.key(1), data.x_train[:1])
    params = jax.tree.map(lambda p: p + 0.1, params)
    x_val, y_val = data.x_test[:20], data.y_test[:20]
    hook = runner.make_final_metrics(
        model, data, x_val, y_val, num_examples=50, iters=300, trace_samples=400
    )
    out = hook("m", params, state, data)

    flat, unravel = ravel_pytree(params)

    def loss(v):
        logits, _ = model.apply(unravel(v), state, data.x_train[:50], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, data.y_train[:50]).mean()

    hessian = np.asarray(jax.hessian(loss)(flat), np.float64)
    eigenvalues = np.linalg.eigvalsh(hessian)
    assert out["hessian_top_eigenvalue"] == pytest.approx(eigenvalues[-1], rel=1e-3)
    assert out["hessian_trace"] == pytest.approx(np.trace(hessian), rel=0.1)
    logits, _ = model.apply(params, state, x_val, train=False)
    assert out["val_accuracy"] == pytest.approx(float(jnp.mean(logits.argmax(-1) == y_val)))


def test_validation_split_is_disjoint_and_deterministic():
    data = load_dataset("digits")
    reduced, x_val, y_val = runner.split_validation(data, 0.15, seed=0)
    again, x_val2, _ = runner.split_validation(data, 0.15, seed=0)
    assert len(reduced.x_train) + len(x_val) == len(data.x_train)
    assert len(x_val) == round(0.15 * len(data.x_train))
    np.testing.assert_array_equal(x_val, x_val2)
    np.testing.assert_array_equal(reduced.x_train, again.x_train)
    rows = {r.tobytes() for r in reduced.x_train.reshape(len(reduced.x_train), -1)}
    assert not any(r.tobytes() in rows for r in x_val.reshape(len(x_val), -1))
    assert len(y_val) == len(x_val)


def test_tuned_member_is_the_best_on_validation_not_on_test():
    summary = {
        "a": {"val_accuracy": {"mean": 0.90}, "test_accuracy": {"mean": 0.99}},
        "b": {"val_accuracy": {"mean": 0.95}, "test_accuracy": {"mean": 0.80}},
    }
    assert runner.select_tuned(summary, {"g": ["a", "b"]}) == {"g": "b"}


def test_every_quick_method_builds_and_steps():
    config = get_config("quick")
    runner.validate(config)
    p = {"w": jnp.ones(3)}

    def grad_fn(q):
        return jax.grad(lambda v: jnp.sum(jnp.cos(v["w"])))(q)

    for method in config.method_names:
        tx = runner.make_tx(method, config.methods[method], config.steps)
        updates, _ = optax.with_extra_args_support(tx).update(
            grad_fn(p), tx.init(p), p, grad_fn=grad_fn
        )
        assert np.all(np.isfinite(updates["w"])), method
        assert np.any(updates["w"] != 0), method


def test_full_variant_validates():
    runner.validate(get_config("full"))


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (["--config.validation_fraction=0.6"], "validation_fraction must lie in (0, 0.5)"),
        (["--config.models=mlp"], "models must give one model per dataset"),
        (["--config.datasets=digits,digits", "--config.models=mlp,mlp"], "must be distinct"),
        (
            ["--config.datasets=imagenet", "--config.models=mlp", "--config.task_steps=()"],
            "datasets: 'imagenet' is not one of",
        ),
        (["--config.task_steps=500"], "task_steps must give one number of steps per dataset"),
        (["--config.task_steps=500,0"], "steps must be >= 1"),
        (["--config.sharpness.iters=0"], "sharpness.iters must be >= 1"),
        (["--config.sharpness.trace_samples=-1"], "sharpness.trace_samples must be >= 0"),
        (["--config.methods.sam_rho0p05.rho=-1.0"], "methods.sam_rho0p05: rho"),
        (["--config.methods.asam.transform=adam"], "methods.asam.transform must be one of"),
        (["--config.method_names=sam_rho0p05,sgd"], "must start with the baseline"),
        (["--config.steps=0"], "steps must be >= 1"),
    ],
)
def test_config_errors_are_one_line_usage_errors(capsys, tmp_path, monkeypatch, override, pattern):
    def no_training(*args, **kwargs):
        raise AssertionError("an invalid config must be refused before any training")

    monkeypatch.setattr(runner, "run_suite", no_training)
    assert main(["run", "sam", "--workdir", str(tmp_path / "w"), *override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert "Traceback" not in err, err
    assert pattern in err, err
    assert not (tmp_path / "w").exists()

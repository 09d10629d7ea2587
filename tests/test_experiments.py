"""The four experiments: each smoke variant end to end, the runners' own pieces, the configs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import optlab
from experiments import cli
from experiments import study as st
from experiments.cli import main
from experiments.registry import EXPERIMENTS

NAMES = sorted(EXPERIMENTS)


@pytest.fixture(autouse=True)
def _no_compilation_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTLAB_CACHE_DIR", str(tmp_path / "jax_cache"))
    monkeypatch.setattr(cli, "use_compilation_cache", lambda: None)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_smoke_variant_runs_end_to_end_and_resumes(capsys, tmp_path, name):
    workdir = tmp_path / "w"
    argv = ["run", name, "--variant", "smoke", "--workdir", str(workdir), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "## Verdicts" in out
    results = json.loads((workdir / "results.json").read_text())
    config = EXPERIMENTS[name].config_module().get_config("smoke")
    tasks = st.tasks_from_config(config)
    methods = st.methods_from_config(config)
    expected = len(tasks) * sum(len(st.points(m)) for m in methods) * len(config.seeds)
    assert len(results["runs"]) == expected
    assert results["verdicts"], "the smoke variant checks at least one claim"
    for v in results["verdicts"]:
        assert v["outcome"] in ("held", "inconclusive", "did not hold")
    for plot in results["plots"]:
        assert (workdir / plot).read_bytes()[:4] == b"\x89PNG"
    assert (workdir / "config.json").exists()
    # Resuming a finished study trains nothing and gives the same records.
    assert main(argv) == 0
    again = json.loads((workdir / "results.json").read_text())
    assert again["provenance"]["groups"] == 0
    assert again["runs"] == results["runs"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("variant", ["smoke", "quick", "full"])
def test_every_variant_builds_a_valid_study(name, variant):
    experiment = EXPERIMENTS[name]
    assert variant in experiment.variants
    config = experiment.config_module().get_config(variant)
    runner = experiment.runner_module()
    runner.validate(config)
    assert "runs" in runner.plan(config)
    study = runner.build_study(config)
    assert study.claims, "every experiment checks claims"
    if variant == "quick":
        assert len(study.seeds) >= 5


def test_every_quick_method_builds_and_steps():
    """Each method of every quick config makes one step on a tiny problem (no NaN)."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    loss = lambda p: jnp.sum(jnp.tanh(jnp.ones(3) @ p["w"] + p["b"]) ** 2)
    for name in NAMES:
        config = EXPERIMENTS[name].config_module().get_config("quick")
        runner = EXPERIMENTS[name].runner_module()
        study = runner.build_study(config)
        for method in study.methods:
            for point in st.points(method):
                ctx = st.TxContext(study.tasks[0], 100, None, 10, 32)
                tx = optax.with_extra_args_support(study.make_tx({**method.spec, **point}, ctx))
                grads = jax.grad(loss)(params)
                updates, _ = tx.update(grads, tx.init(params), params, grad_fn=jax.grad(loss))
                assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates)), (
                    name,
                    method.name,
                    point,
                )


# --- lookahead ---------------------------------------------------------------------------------


def test_lookahead_methods_are_evaluated_on_their_slow_weights():
    from experiments.configs.lookahead import get_config
    from experiments.runners import lookahead

    study = lookahead.build_study(get_config("quick"))
    assert study.eval_params(study.method("sgd")) is None
    assert study.eval_params(study.method("la_sgd")) is lookahead.slow_weights
    sens = [c for c in study.claims if c.aggregate == "sensitivity"]
    assert {(c.method, c.baseline) for c in sens} == {("la_sgd", "sgd"), ("ml2_sgd", "la_sgd")}


def test_lookahead_bad_levels_are_one_line_errors(capsys, tmp_path):
    argv = [
        "run",
        "lookahead",
        "--variant",
        "smoke",
        "--workdir",
        str(tmp_path / "w"),
        "--config.methods.la_sgd.lookahead.levels=((5, 0.5, 1),)",
    ]
    assert main(argv) == 2
    assert "levels[0] must be a (k, alpha) pair" in capsys.readouterr().err


# --- sam ---------------------------------------------------------------------------------------


def test_sam_sharpness_hook_matches_the_dense_hessian():
    """On softmax regression the hook's eigenvalue and trace equal the dense Hessian's."""
    from experiments.data import load_dataset
    from experiments.models import make_model
    from experiments.runners import sam

    data = load_dataset("digits", max_train=80)
    data = data._replace(x_train=data.x_train[:, ::2, ::2], x_test=data.x_test[:, ::2, ::2])
    task = st.Task("t", "digits", "mlp", batch_size=8, steps=1)
    task_data = st.TaskData(task, data, data.x_test[:5], data.y_test[:5], (), 1, 8)
    model = make_model("mlp", num_classes=10, hidden=())
    params, state = model.init(jax.random.key(1), data.x_train[:1])
    params = jax.tree.map(lambda p: p + 0.1, params)
    hook = sam.sharpness_fn(task_data, model, num_examples=50, iters=300, trace_samples=400)
    out = hook(jax.tree.map(lambda p: p[None], params), jax.tree.map(lambda p: p[None], state))
    flat, unravel = ravel_pytree(params)

    def loss(v):
        logits, _ = model.apply(unravel(v), state, data.x_train[:50], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, data.y_train[:50]).mean()

    hessian = np.asarray(jax.hessian(loss)(flat), np.float64)
    eigenvalues = np.linalg.eigvalsh(hessian)
    assert float(out["hessian_top_eigenvalue"][0]) == pytest.approx(eigenvalues[-1], rel=1e-3)
    assert float(out["hessian_trace"][0]) == pytest.approx(np.trace(hessian), rel=0.1)


def test_sam_footing_is_equal():
    """Same L2 in every loss; momentum methods vs sgd, momentum-free ones vs sgd_plain."""
    from experiments.configs.sam import get_config
    from experiments.runners import sam

    study = sam.build_study(get_config("quick"))
    assert {t.l2 for t in study.tasks} == {5e-4}
    for method in study.methods:
        spec = method.spec
        assert "weight_decay" not in spec
        plain = spec["transform"] == "sa_sam" or method.name.endswith("_plain")
        assert (spec.get("optimizer") == "sgd") == plain, method.name
    for claim in study.claims:
        m = study.method(claim.method).spec
        b = study.method(claim.baseline).spec
        assert (m.get("optimizer") == "sgd") == (b.get("optimizer") == "sgd"), claim
    # ASAM runs with optlab's default (official) normalisation: no mask in the spec.
    assert "adaptive_mask" not in study.method("asam").spec


# --- extrapolation ------------------------------------------------------------------------------


def test_extrapolation_schedule_warms_up_then_decays():
    from experiments.runners.extrapolation import lr_schedule

    cosine = lr_schedule(1.0, steps=100, warmup_steps=10, kind="warmup_cosine")
    assert float(cosine(0)) == 0.0
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(99)) < 0.01
    step = lr_schedule(
        1.0, steps=100, warmup_steps=10, kind="warmup_step", decay_fractions=(0.5, 0.75)
    )
    assert [float(step(t)) for t in (5, 20, 60, 80)] == pytest.approx([0.5, 1.0, 0.1, 0.01])


def test_extrapolation_scales_the_rate_with_the_batch_and_ties_gamma_to_it():
    """lr = base * b / base_b, gamma_t = ratio * lr_t; eval params undo the past offset."""
    from experiments.runners import extrapolation as ex

    spec = {
        "optimizer": "sgd",
        "learning_rate": 0.01,
        "base_batch_size": 32,
        "warmup_epochs": 0,
        "schedule": "warmup_step",
        "decay_fractions": (),
        "transform": "extrapolation",
        "direction": "past",
        "gamma_ratio": 0.5,
    }
    task = st.Task("t", "digits", "mlp", batch_size=128, epochs=2)
    tx = ex.make_tx(spec, st.TxContext(task, 20, None, 10, 128))
    params = jnp.zeros(3)
    state = tx.init(params)
    g = jnp.ones(3)
    updates, state = tx.update(g, state, params)
    params = params + updates
    # lr = 0.01 * 128 / 32 = 0.04; x_1 = -0.04 g; the loop's params also carry the offset.
    true = optlab.extrapolation_eval_params(params, state)
    np.testing.assert_allclose(np.asarray(true), -0.04 * np.ones(3), rtol=1e-6)
    assert not np.allclose(np.asarray(params), np.asarray(true))


# --- divebatch and width -----------------------------------------------------------------------


def test_epoch_tracker_target_metrics_and_censoring():
    """Epochs/steps/examples/time at the first epoch reaching the target; else one epoch past."""
    from experiments.runners.divebatch import EpochTracker

    tracker = object.__new__(EpochTracker)  # the bookkeeping alone, without data or models
    tracker.target = 0.9
    entry = lambda e, acc, b: {"epoch": e, "step": 10 * e, "examples": 100 * e, "time": 2.0 * e,
                               "accuracy": acc, "batch_size": b}  # fmt: skip
    tracker.log = [
        [entry(1, 0.5, 16), entry(2, 0.95, 32), entry(3, 0.99, 64)],
        [entry(1, 0.5, 16), entry(2, 0.6, 16)],  # never reaches 0.9: censored at epoch 3
    ]
    out = tracker.metrics()
    np.testing.assert_array_equal(out["epochs_to_target"], [2, 3])
    np.testing.assert_array_equal(out["steps_to_target"], [20, 30])
    np.testing.assert_array_equal(out["examples_to_target"], [200, 300])
    np.testing.assert_array_equal(out["time_to_target_s"], [4.0, 6.0])
    np.testing.assert_array_equal(out["reached_target"], [1, 0])
    np.testing.assert_array_equal(out["final_batch_size"], [64, 16])


def test_width_tolerated_batch_and_mlp_shapes():
    from experiments.models import make_model, param_count
    from experiments.runners.width import tolerated_batch

    tasks = [st.Task(f"b{b}", "digits", "mlp", b, epochs=5) for b in (8, 32, 128)]
    epochs = {  # (method, lr) -> epochs to target per batch size, for seeds 0 and 1
        ("wide", 0.1): {8: (2, 2), 32: (2, 3), 128: (3, 4)},
        ("wide", 0.01): {8: (4, 4), 32: (2, 2), 128: (9, 9)},
        ("deep", 0.1): {8: (2, 2), 32: (3, 3), 128: (6, 6)},
    }
    records = [
        {"method": m, "task": f"b{b}", "point": {"learning_rate": lr}, "seed": s,
         "epochs_to_target": e[s]}
        for (m, lr), by in epochs.items() for b, e in by.items() for s in (0, 1)
    ]  # fmt: skip
    lines = tolerated_batch(records, tasks)
    # wide: batch 8 fastest at lr 0.1 (2, 2); batch 32 at lr 0.01 (2, 2); 128 at lr 0.1 (3, 4).
    assert lines[1].startswith("wide:")
    assert "per seed [32, 32]" in lines[1]
    assert lines[0].startswith("deep:")
    assert "per seed [8, 8]" in lines[0]
    model = make_model("mlp_70x4", num_classes=10)
    params, _ = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 64))), jax.random.key(0))
    assert param_count(params) == 64 * 70 + 70 + 3 * (70 * 70 + 70) + 70 * 10 + 10

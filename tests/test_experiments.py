"""The four experiments: each smoke variant end to end, the runners' own pieces, the configs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
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
        # Worker-mode studies build their transforms on the worker axis, with the task's
        # number of workers (a ring of gossip needs at least 3).
        workers = study.tasks[0].workers
        axis = "workers" if workers else None
        for method in study.methods:
            # Worker mode compiles each point: its first one (the rest differ in floats only
            # and are built by build_study's validation).
            for point in st.points(method)[: 1 if axis else None]:
                ctx = st.TxContext(study.tasks[0], 100, axis, 10, 32)
                tx = optax.with_extra_args_support(study.make_tx({**method.spec, **point}, ctx))
                grads = jax.grad(loss)(params)

                def one(p, g, tx=tx):
                    return tx.update(g, tx.init(p), p, grad_fn=jax.grad(loss))[0]

                if axis is None:
                    updates = one(params, grads)
                else:  # jitted: eager op-by-op under vmap is slow
                    scale = jnp.arange(1.0, workers + 1)
                    stacked = jax.tree.map(
                        lambda a: scale.reshape((-1,) + (1,) * a.ndim) * a, (params, grads)
                    )
                    updates = jax.jit(jax.vmap(one, axis_name=axis))(*stacked)
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


# --- geometry -----------------------------------------------------------------------------------


def test_geometry_shape_test_and_window_medians():
    """Warm-up, plateau, decay passes the shape test; a monotone decay has no warm-up."""
    from experiments.configs.geometry import get_config
    from experiments.runners import geometry

    steps = np.arange(200.0)
    bump = np.minimum(steps / 40, 1) * np.where(steps > 150, (200 - steps) / 50, 1) + 0.05
    noisy = bump + np.random.default_rng(0).normal(0, 0.01, 200) * (steps % 7 == 0)
    shape = geometry.lr_shape(np.stack([noisy, np.linspace(1.0, 0.1, 200)]), windows=10)
    assert shape["lr_start"][0] < 0.5
    assert shape["lr_end"][0] < 0.5
    assert 0 < shape["lr_peak_at"][0] < 1
    assert shape["lr_start"][1] == pytest.approx(1.0)
    assert shape["lr_peak_at"][1] == 0
    medians = geometry.window_medians(np.arange(10.0)[None], 3)
    np.testing.assert_allclose(medians, [[1.5, 5.0, 8.0]])
    config = get_config("smoke")
    config.methods.sgd.axes = {"learning_rate": (0.1, 0.2)}
    with pytest.raises(ValueError, match="one point per method"):
        geometry.build_study(config)
    config = get_config("smoke")
    config.l2 = 1e-4
    with pytest.raises(ValueError, match="l2 and workers must be 0"):
        geometry.build_study(config)


# --- ood ----------------------------------------------------------------------------------------


def test_ood_matched_id_interpolates_the_baseline_curve():
    from experiments.runners.ood import matched_id

    def rec(method, seed, test, rotated, diverged=None):
        return {
            "task": "t",
            "method": method,
            "seed": seed,
            "test_accuracy": test,
            "rotated_accuracy": rotated,
            "diverged_at_step": diverged,
        }

    records = [
        rec("sgd", 0, 0.8, 0.5),
        rec("sgd", 0, 0.9, 0.6),
        rec("sgd", 0, 0.1, 0.1, diverged=3),  # left out
        rec("adam", 0, 0.85, 0.5),  # baseline interpolates to 0.55: -0.05
        rec("adam", 0, 0.95, 0.9),  # outside the baseline's ID range: left out
        rec("sgd", 1, 0.7, 0.4),
        rec("sgd", 1, 0.9, 0.4),
        rec("adam", 1, 0.8, 0.5),  # +0.1
    ]
    diffs, matched = matched_id(records, "t", "rotated", "adam", "sgd", (0, 1, 2))
    np.testing.assert_allclose(diffs[:2], [-0.05, 0.1])
    assert np.isnan(diffs[2])
    assert matched == 2


def test_ood_spurious_task_marks_train_and_id_test_and_breaks_it_out_of_distribution():
    from experiments.configs.ood import get_config
    from experiments.data import load_dataset
    from experiments.data.shifts import border_pixels
    from experiments.runners import ood

    config = get_config("smoke")
    hooks = ood._Hooks(config)
    data = load_dataset("digits", max_train=400, max_test=300)
    task = st.Task("spurious", "digits", "mlp", batch_size=8, steps=1)
    prepared = hooks.prepare_data(
        st.TaskData(task, data, data.x_test[:50], data.y_test[:50], (), 1, 8)
    )
    border = border_pixels(8, 8)
    value = float(data.x_train.max())

    def agreement(x, y):
        on = x[:, border[:, 0], border[:, 1], 0] == value
        return np.mean(on.reshape(len(x), 10 + 4, 2)[np.arange(len(x)), y].all(-1))

    ds = prepared.dataset
    assert agreement(ds.x_train, ds.y_train) > 0.85
    assert agreement(ds.x_test, ds.y_test) > 0.85
    assert agreement(prepared.x_val, prepared.y_val) > 0.8
    assert agreement(hooks.sets["spurious"]["spurious"], ds.y_test) < 0.25
    assert set(ood.shifts_of(config, "digits")) == {"rotated", "noisy"}


# --- local_sgd ----------------------------------------------------------------------------------


def test_local_sgd_comm_rounds_match_the_transforms_syncs():
    """comm_rounds counts the steps after which two workers with different gradients hold
    equal params (a sync), on the transforms themselves, for every method of the quick
    config (H = 8 there; 40 steps, so post-local SGD and PALSGD's warm-up of 10 and 2)."""
    from experiments.configs.local_sgd import get_config
    from experiments.runners import local_sgd

    study = local_sgd.build_study(get_config("quick"))
    steps = 40
    for method in study.methods:
        spec = method.spec
        tx = local_sgd.make_tx(spec, st.TxContext(study.tasks[0], steps, "w", 10, 16))

        @jax.jit
        def run(params, tx=tx):
            state = jax.vmap(tx.init)(params)

            def body(carry, _):
                params, state = carry
                # Worker w's gradient: params - (w + 1): different on every worker.
                grads = params - jnp.arange(1.0, 3.0)[:, None]
                upd, state = jax.vmap(lambda g, s, p: tx.update(g, s, p), axis_name="w")(
                    grads, state, params
                )
                params = params + upd
                return (params, state), params[0, 0] == params[1, 0]

            return jax.lax.scan(body, (params, state), None, length=steps)[1]

        equal = np.asarray(run(jnp.zeros((2, 1))))
        expected = [local_sgd.comm_rounds(spec, t, steps) for t in range(steps + 1)]
        # PALSGD's pull steps keep workers apart too; only a sync makes them equal.
        assert np.cumsum(equal).tolist() == expected[1:], method.name


def test_local_sgd_curves_and_times_to_target():
    """Cumulative gradient evaluations, rounds and times from hand-made logged records."""
    from experiments.runners import local_sgd

    spec = {"algorithm": "diloco", "sync_period": 4}
    rows = [
        {"step": 10, "train_grad_evals": 0.5, "train_time_s": 9.0, "val_accuracy": 0.4},
        {"step": 20, "train_grad_evals": 1.0, "train_time_s": 10.0, "val_accuracy": 0.8},
        {"step": 30, "train_grad_evals": 0.8, "train_time_s": 13.0, "val_accuracy": 0.9},
        {"step": 30, "final": True, "test_accuracy": 0.9},
    ]
    c = local_sgd.curve(spec, rows, 30, comm_cost=2.0)
    np.testing.assert_allclose(c["grad_evals"], [5, 15, 23, 23])
    np.testing.assert_allclose(c["comm_rounds"], [2, 5, 7, 7])
    np.testing.assert_allclose(c["model_time"], [9, 25, 37, 37])
    # The first window (the compile) is replaced by the median of the others: (1 + 3) / 2.
    np.testing.assert_allclose(c["measured_time_s"], [2, 3, 6, 6])
    dp = local_sgd.curve({"algorithm": "dp"}, rows[:1], 30, comm_cost=2.0)
    assert dp["comm_rounds"].tolist() == [10]
    config = ml_collections.ConfigDict({"cost": {"comm_cost": 2.0, "target_val_accuracy": 0.75}})
    hook = local_sgd.history_metrics(config)
    task = st.Task("t", "digits", "mlp", batch_size=8, steps=30)
    out = hook(st.TaskData(task, None, None, None, (), 30, 1), None, spec, [rows, rows[:1]])
    assert out["model_time_to_target"][0] == 25
    assert np.isnan(out["model_time_to_target"][1])  # never reached: NaN, counted as missing
    assert out["comm_rounds"] == [7, 2]
    # A per-task target overrides the default one (the language model's accuracy is low).
    config.cost.task_targets = {"t": 0.85}
    out = local_sgd.history_metrics(config)(
        st.TaskData(task, None, None, None, (), 30, 1), None, spec, [rows]
    )
    assert out["model_time_to_target"] == [37]


# --- continual ---------------------------------------------------------------------------------


def _toy_task_data(steps: int) -> st.TaskData:
    from experiments.data.dataset import Dataset

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2, 2, 1)).astype(np.float32)
    y = np.arange(40) % 4
    data = Dataset("toy", x[:24], y[:24], x[24:32], y[24:32], 4)
    task = st.Task("toy", "digits", "mlp", batch_size=4, steps=steps)
    return st.TaskData(task, data, x[32:], y[32:], (), steps, 4)


def test_continual_streams_are_the_declared_shifts():
    """permuted: pixels permuted per task (task 0 the identity); label_flip: labels mapped
    through a permutation per task; class_incremental: task k holds every class seen so far.
    The test and validation sets in place are the last task's."""
    from experiments.runners.continual import build_stream

    data = _toy_task_data(12)
    x, y = data.dataset.x_train, data.dataset.y_train
    permuted, stream = build_stream(data, "permuted", 3, seed=0)
    assert stream.steps_per_task == 4
    assert [len(b) for b in stream.blocks] == [24, 24, 24]
    np.testing.assert_array_equal(permuted.dataset.x_train[:24], x)
    last = permuted.dataset.x_train[48:].reshape(24, -1)
    perm = np.argsort(np.argsort(last[0]))  # x has distinct values: recover the permutation
    order = np.argsort(x[0].ravel())[perm]
    np.testing.assert_array_equal(last, x.reshape(24, -1)[:, order])
    np.testing.assert_array_equal(permuted.dataset.x_test, stream.tests[-1][0])
    np.testing.assert_array_equal(
        permuted.x_val.reshape(8, -1), data.x_val.reshape(8, -1)[:, order]
    )

    flipped, stream = build_stream(data, "label_flip", 2, seed=0)
    np.testing.assert_array_equal(flipped.dataset.x_train[24:], x)
    mapping = {int(a): int(b) for a, b in zip(y, flipped.dataset.y_train[24:], strict=True)}
    assert sorted(mapping.values()) == [0, 1, 2, 3]  # a permutation of the labels
    np.testing.assert_array_equal(flipped.y_val, [mapping[int(v)] for v in data.y_val])

    _, stream = build_stream(data, "class_incremental", 2, seed=0)
    first, both = (set(y[b].tolist()) for b in stream.blocks)
    assert len(first) == 2
    assert both == {0, 1, 2, 3}
    assert set(stream.tests[0][1].tolist()) == first
    with pytest.raises(ValueError, match="num_tasks"):
        build_stream(data, "class_incremental", 3, seed=0)


def test_continual_accuracy_after_each_task_reads_the_boundaries():
    from experiments.runners.continual import accuracy_after_each_task

    rows = [
        {"method": "sgd", "point": "", "seed": 0, "step": 5, "task0_accuracy": 0.9},
        {"method": "sgd", "point": "", "seed": 0, "step": 7, "task0_accuracy": 0.1},
        {"method": "sgd", "point": "", "seed": 0, "step": 10, "task1_accuracy": 0.8},
        {"method": "sgd", "point": "", "seed": 1, "step": 10, "task1_accuracy": None},
    ]
    out = accuracy_after_each_task(rows, steps_per_task=5, num_tasks=2)
    assert out[("sgd", "", 0)] == [0.9, 0.8]
    assert np.isnan(out[("sgd", "", 1)]).all()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.streams.permuted.kind=rotated", "streams.permuted.kind must be one of"),
        ("--config.tasks.permuted.steps=11", "must be a multiple of streams.permuted.num_tasks"),
        ("--config.methods.spectral.regularizer=dropout", "regularizer must be one of"),
    ],
)
def test_continual_bad_config_is_a_one_line_error(capsys, tmp_path, override, message):
    argv = ["run", "continual", "--variant", "smoke", "--workdir", str(tmp_path / "w"), override]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


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

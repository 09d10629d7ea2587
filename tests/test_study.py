"""The study runner: statistics, validation, selection, divergence, verdicts, resume, outputs."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import optax
import pytest

from experiments import results as rs
from experiments import stats
from experiments import study as st
from experiments.optimizers import make_optimizer

# --- statistics -------------------------------------------------------------------------------


def test_paired_interval_is_the_t_interval_of_the_differences():
    from scipy import stats as sps

    a = np.array([0.91, 0.88, 0.93, 0.90, 0.89])
    b = np.array([0.90, 0.86, 0.91, 0.88, 0.87])
    result = stats.paired(a, b)
    d = a - b
    half = sps.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    assert result.mean_diff == pytest.approx(d.mean())
    assert (result.low, result.high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert result.outcome == stats.HELD  # the whole interval is above 0


def test_outcomes_and_direction():
    assert stats.paired([1, 2, 3], [0, 1, 2.5]).outcome == stats.HELD
    assert stats.paired([0, 1, 2.5], [1, 2, 3]).outcome == stats.NOT_HELD
    assert stats.paired([1, 0, 2], [0, 1, 2]).outcome == stats.INCONCLUSIVE
    # Lower is better (a loss, a sharpness): the same numbers flip.
    assert stats.paired([0, 1, 2.5], [1, 2, 3], higher_is_better=False).outcome == stats.HELD
    # Equal values: no difference is not a win.
    assert stats.paired([1.0, 1.0], [1.0, 1.0]).outcome == stats.INCONCLUSIVE


def test_missing_values_are_dropped_and_counted():
    result = stats.paired([1.0, math.nan, 3.0, 4.0], [0.0, 1.0, 2.0, 2.5])
    assert (result.n, result.dropped) == (3, 1)
    assert stats.paired([math.nan], [1.0]).outcome == stats.INCONCLUSIVE
    one = stats.paired([0.9], [0.1])  # a single seed: no interval, no verdict
    assert one.outcome == stats.INCONCLUSIVE
    assert (one.low, one.high) == (-math.inf, math.inf)


def test_a_uniformly_worse_method_is_not_less_sensitive():
    less_spread = stats.paired([1.0, 1.1, 0.9], [5.0, 5.2, 4.9], higher_is_better=False)
    worse_worst = stats.paired([0.1, 0.12, 0.11], [0.5, 0.52, 0.49])
    fine_mean = stats.paired([0.5, 0.4, 0.6], [0.5, 0.6, 0.4])
    assert less_spread.outcome == stats.HELD
    assert stats.combine(less_spread, [worse_worst, fine_mean]) == stats.NOT_HELD
    assert stats.combine(less_spread, [fine_mean]) == stats.HELD


# --- a tiny study on digits --------------------------------------------------------------------


def _make_tx(spec, ctx):
    return make_optimizer(spec, steps=ctx.steps)


def _study(**overrides) -> st.Study:
    fields = dict(
        name="tiny",
        claim="a claim",
        tasks=(
            st.Task(
                "digits",
                "digits",
                "mlp",
                batch_size=32,
                steps=30,
                log_every=10,
                eval_every=10,
                checkpoint_every=10,
            ),
        ),
        methods=(
            st.Method(
                "sgd",
                {"optimizer": "sgd", "learning_rate": 0.1},
                axes={"learning_rate": (0.03, 0.1, 1e30)},
            ),
            st.Method(
                "adam",
                {"optimizer": "adam", "learning_rate": 1e-3},
                axes={"learning_rate": (1e-3, 1e-2)},
                tune=("learning_rate",),
            ),
        ),
        seeds=(0, 1, 2),
        make_tx=_make_tx,
        claims=(
            st.Claim("adam", "sgd"),
            st.Claim("adam", "sgd", metric="test_loss", higher_is_better=False),
            st.Claim("sgd", "sgd", over="learning_rate", aggregate="spread"),
        ),
    )
    fields.update(overrides)
    return st.Study(**fields)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    results = st.run_study(_study(), workdir, progress=False)
    return workdir, results


def test_runs_records_and_outputs(tiny):
    workdir, results = tiny
    assert len(results["runs"]) == (3 + 2) * 3
    for name in (
        "results.json",
        "results.md",
        "curves_digits.png",
        "learning_rate_digits.png",
        "digits/metrics.jsonl",
    ):
        assert (workdir / name).stat().st_size > 0, name
    on_disk = json.loads((workdir / "results.json").read_text())  # strict JSON (no NaN)
    assert set(on_disk) >= {
        "config",
        "provenance",
        "runs",
        "summaries",
        "selections",
        "verdicts",
        "notes",
        "tasks",
    }
    assert (
        on_disk["provenance"]["git"]["commit"] is None
        or len(on_disk["provenance"]["git"]["commit"]) == 40
    )
    assert on_disk["provenance"]["wall_time_s"] > 0


def test_divergence_policy(tiny):
    """lr 1e30 blows up: recorded with its step, scored at chance, NaN written as null."""
    _, results = tiny
    bad = [r for r in results["runs"] if r["point"].get("learning_rate") == 1e30]
    assert len(bad) == 3
    for r in bad:
        assert isinstance(r["diverged_at_step"], int)
        assert 0 <= r["diverged_at_step"] < 30
        assert r["test_accuracy"] == pytest.approx(0.1)  # chance: 10 classes
        assert r["test_loss"] is None  # NaN -> null
    good = [r for r in results["runs"] if r["point"].get("learning_rate") == 0.1]
    assert all(r["diverged_at_step"] is None for r in good)


def test_tuned_axis_is_selected_on_validation_and_the_test_choice_disclosed(tiny):
    _, results = tiny
    selection = results["selections"]["digits/adam"]
    rows = {
        lr: [
            r
            for r in results["runs"]
            if r["method"] == "adam" and r["point"]["learning_rate"] == lr
        ]
        for lr in (1e-3, 1e-2)
    }
    val = {lr: np.mean([r["val_accuracy"] for r in rs]) for lr, rs in rows.items()}
    test = {lr: np.mean([r["test_accuracy"] for r in rs]) for lr, rs in rows.items()}
    assert selection["point"]["learning_rate"] == max(val, key=val.get)
    assert selection["test_best_point"]["learning_rate"] == max(test, key=test.get)
    # Untuned axes report the spec's own value.
    assert results["selections"]["digits/sgd"]["point"] == {"learning_rate": 0.1}


def test_verdicts_are_paired_over_seeds(tiny):
    _, results = tiny
    runs = results["runs"]
    chosen = results["selections"]["digits/adam"]["point"]
    a = [
        r["test_accuracy"]
        for r in sorted(runs, key=lambda r: r["seed"])
        if r["method"] == "adam" and r["point"] == chosen
    ]
    b = [
        r["test_accuracy"]
        for r in sorted(runs, key=lambda r: r["seed"])
        if r["method"] == "sgd" and r["point"] == {"learning_rate": 0.1}
    ]
    verdict = results["verdicts"][0]
    assert verdict["outcome"] == stats.paired(a, b).outcome
    assert verdict["detail"]["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    md = (tiny[0] / "results.md").read_text()
    assert "3 comparisons" in md
    assert "the test set would have picked" in md


def test_rerun_reads_records_and_trains_nothing(tiny, tmp_path):
    workdir, results = tiny
    again = st.run_study(_study(), workdir, progress=False)
    assert again["provenance"]["groups"] == 0
    assert again["runs"] == results["runs"]


def test_an_interrupted_group_resumes_from_its_checkpoint(tiny, tmp_path):
    """Records of a group lost, its checkpoints kept: the group restores and re-evaluates."""
    workdir, results = tiny
    done = workdir / "digits" / "sgd" / "default" / "records.json"
    done.unlink()
    again = st.run_study(_study(), workdir, progress=False)
    assert again["provenance"]["trained_steps"] == 0  # restored at the final step
    key = lambda r: (r["method"], json.dumps(r["point"]), r["seed"])
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_time_s"}
    assert sorted(map(strip, again["runs"]), key=key) == sorted(
        map(strip, results["runs"]), key=key
    )


def test_task_claim_drop_and_sensitivity_aggregates():
    """Claims over an axis aggregate per seed, then pair over seeds (hand-made records)."""
    study = _study(
        claims=(st.Claim("adam", "sgd", over="learning_rate", aggregate="sensitivity"),),
        methods=(
            st.Method(
                "sgd",
                {"optimizer": "sgd", "learning_rate": 0.1},
                axes={"learning_rate": (0.1, 1.0)},
            ),
            st.Method(
                "adam",
                {"optimizer": "adam", "learning_rate": 0.1},
                axes={"learning_rate": (0.1, 1.0)},
            ),
        ),
    )
    records = []
    acc = {
        ("sgd", 0.1): [0.9, 0.92, 0.91],
        ("sgd", 1.0): [0.5, 0.4, 0.45],
        ("adam", 0.1): [0.6, 0.62, 0.61],
        ("adam", 1.0): [0.58, 0.6, 0.6],
    }
    for (m, lr), values in acc.items():
        for seed, v in zip((0, 1, 2), values, strict=True):
            records.append(
                {
                    "task": "digits",
                    "method": m,
                    "point": {"learning_rate": lr},
                    "seed": seed,
                    "test_accuracy": v,
                }
            )
    selection = rs.select(study, records)
    (verdict,) = rs.verdicts(study, records, selection)
    # adam's spread is far smaller, but its worst accuracy is not worse (0.58 > 0.45) while
    # its mean is worse (0.60 vs 0.68): the guard makes it "did not hold".
    assert verdict["detail"]["outcome"] == stats.HELD
    assert verdict["guards"]["mean"]["outcome"] == stats.NOT_HELD
    assert verdict["outcome"] == stats.NOT_HELD


def test_one_sample_claims_against_a_bound():
    """A claim with a bound pairs the method with that constant on every seed."""
    study = _study(
        claims=(
            st.Claim("sgd", "", metric="fraction", bound=0.9),
            st.Claim("sgd", "", metric="fraction", bound=0.99),
            st.Claim("sgd", "", metric="peak", bound=0.5, higher_is_better=False),
        ),
    )
    fractions, peaks = [0.95, 0.97, 0.96], [0.2, 0.6, 0.4]
    records = [
        {"task": "digits", "method": "sgd", "point": {"learning_rate": 0.1}, "seed": s}
        | {"fraction": f, "peak": p}
        for s, f, p in zip(study.seeds, fractions, peaks, strict=True)
    ]
    above, below, peak = rs.verdicts(study, records, rs.select(study, records))
    assert above["claim"] == "digits: sgd: fraction above 0.9"
    assert (above["outcome"], below["outcome"], peak["outcome"]) == (
        stats.HELD,
        stats.NOT_HELD,
        stats.INCONCLUSIVE,
    )
    expected = stats.paired(fractions, [0.9] * 3)
    assert above["detail"]["low"] == pytest.approx(expected.low)
    assert above["baseline_value"]["mean"] == 0.9
    with pytest.raises(ValueError, match="a baseline method or a bound, not both"):
        _study(claims=(st.Claim("sgd", "adam", bound=0.5),))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"seeds": ()}, "seeds must name at least one seed"),
        ({"seeds": (0, 0)}, "seeds must not repeat"),
        (
            {"tasks": (st.Task("x", "nope", "mlp", batch_size=8, steps=1),)},
            "tasks.x.dataset must be one of",
        ),
        (
            {"tasks": (st.Task("x", "digits", "vgg", batch_size=8, steps=1),)},
            "tasks.x.model must be one of",
        ),
        (
            {"tasks": (st.Task("x", "digits", "mlp", batch_size=8),)},
            "set steps >= 1 or epochs >= 1",
        ),
        (
            {
                "tasks": (
                    st.Task("x", "digits", "mlp", batch_size=8, steps=1, log_every=4, eval_every=6),
                )
            },
            "eval_every must be a non-negative multiple of log_every",
        ),
        (
            {"methods": (st.Method("m", {"learning_rate": 0.5}, axes={"learning_rate": (0.1,)}),)},
            "must contain the method's own learning_rate",
        ),
        ({"methods": (st.Method("m", {}, tune=("rho",)),)}, "'rho' is not one of its axes"),
        ({"claims": (st.Claim("adam", "sgd", aggregate="median"),)}, "aggregate must be one of"),
        ({"claims": (st.Claim("adam", "sgd", over="rho"),)}, "has no axis 'rho'"),
    ],
)
def test_invalid_studies_fail_at_construction(change, pattern):
    with pytest.raises(ValueError, match=pattern.replace("(", r"\(")):
        _study(**change)


def test_overrides_reach_the_tasks():
    config = st.study_config(
        batch_size=16,
        tasks={"a": {"dataset": "digits", "epochs": 2}, "b": {"dataset": "mnist1d", "steps": 7}},
    )
    config.tasks.a.batch_size = 8
    a, b = st.tasks_from_config(config)
    assert (a.batch_size, a.epochs, b.batch_size, b.steps, b.epochs) == (8, 2, 16, 7, 0)
    with pytest.raises(ValueError, match="unknown fields"):
        st.tasks_from_config(st.study_config(tasks={"a": {"dataset": "digits", "epoch": 1}}))


def test_worker_mode_task_trains_workers_and_evaluates_their_mean(tmp_path):
    """A task with workers: each worker gets a partition; mean_gradients keeps them equal."""
    import optlab

    def make_tx(spec, ctx):
        return optax.chain(optlab.mean_gradients(ctx.axis_name), optax.sgd(spec["learning_rate"]))

    study = _study(
        tasks=(
            st.Task(
                "digits",
                "digits",
                "mlp",
                batch_size=16,
                steps=10,
                log_every=5,
                workers=4,
                partition="dirichlet",
                partition_alpha=1.0,
            ),
        ),
        methods=(st.Method("sgd", {"learning_rate": 0.1}),),
        claims=(),
        seeds=(0,),
        make_tx=make_tx,
    )
    results = st.run_study(study, tmp_path, progress=False)
    (record,) = results["runs"]
    assert record["test_accuracy"] > 0.2
    assert "4 workers (dirichlet)" in (tmp_path / "results.md").read_text()


def test_a_stream_of_shifted_tasks_through_the_hooks(tmp_path):
    """prepare_data builds two pixel-permuted copies; make_plan trains them one after the other."""
    from experiments.train.plans import TaskStreamPlan

    def prepare(data: st.TaskData) -> st.TaskData:
        x, y = data.dataset.x_train, data.dataset.y_train
        flat = x.reshape(len(x), -1)
        perm = np.random.default_rng(1).permutation(flat.shape[1])
        shifted = flat[:, perm].reshape(x.shape)
        dataset = data.dataset._replace(
            x_train=np.concatenate([x, shifted]), y_train=np.concatenate([y, y])
        )
        return dataclasses.replace(data, dataset=dataset)

    def plan(data: st.TaskData, method: st.Method) -> TaskStreamPlan:
        n = len(data.dataset.x_train) // 2
        blocks = [np.arange(n), np.arange(n, 2 * n)]
        return TaskStreamPlan(blocks, steps_per_task=data.steps // 2, batch_size=32)

    study = _study(
        tasks=(st.Task("digits", "digits", "mlp", batch_size=32, steps=40, log_every=10),),
        methods=(st.Method("sgd", {"optimizer": "sgd", "learning_rate": 0.1}),),
        claims=(),
        seeds=(0,),
        prepare_data=prepare,
        make_plan=plan,
    )
    (stream,) = st.run_study(study, tmp_path / "stream", progress=False)["runs"]
    plain = dataclasses.replace(study, prepare_data=None, make_plan=None)
    (alone,) = st.run_study(plain, tmp_path / "plain", progress=False)["runs"]
    # The second half trained on the permuted task: the unpermuted test set got forgotten.
    assert stream["test_accuracy"] < alone["test_accuracy"] - 0.1

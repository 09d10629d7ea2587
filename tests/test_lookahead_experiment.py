"""The `lookahead` experiment: a smallest end-to-end run, resume, divergence, validation."""

import json

import jax
import pytest

from experiments import reporting
from experiments.cli import main
from experiments.configs.lookahead import get_config
from experiments.data import load_dataset
from experiments.models import make_model
from experiments.runners import lookahead as runner
from experiments.train import make_evaluator

SMALL = [
    "--config.seeds=0",
    "--config.steps=20",
    "--config.log_every=5",
    "--config.eval_every=10",
    "--config.checkpoint_every=10",
    "--config.datasets=digits",
    "--config.method_names=sgd,la_sgd,ml2_sgd",
    # lr x 10000 = 1000 diverges: scored at chance, remembered across resumes.
    "--config.sweep.methods=sgd,la_sgd",
    "--config.sweep.factors=1,10000",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def _no_compilation_cache(monkeypatch):
    # The runner turns on JAX's persistent compilation cache, a process-wide setting; keep
    # it out of the test session.
    monkeypatch.setattr(runner, "use_compilation_cache", lambda path: None)


def test_smallest_run_writes_results_verdicts_and_resumes(capsys, tmp_path):
    workdir = tmp_path / "w"
    argv = ["run", "lookahead", "--workdir", str(workdir), *SMALL]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in (
        "config.json",
        "results.json",
        "results.md",
        "sensitivity_digits.png",
        "digits/curves.png",
        "digits/metrics.jsonl",
    ):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "digits/curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (workdir / "mnist1d").exists()

    results = json.loads((workdir / "results.json").read_text())
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"digits/sgd", "digits/la_sgd", "digits/ml2_sgd"}

    # ml2's top level syncs every 25 steps: after 20 it was never moved, so evaluating the
    # slowest weights (not the params) gives exactly the initial model's accuracy.
    data = load_dataset("digits", seed=0)
    model = make_model("mlp", num_classes=data.num_classes)
    params, state = jax.jit(model.init)(jax.random.key(0), data.x_train[:1])
    initial = make_evaluator(model, data.x_test, data.y_test)(params, state)
    assert runs["digits/ml2_sgd"]["test_accuracy"] == pytest.approx(initial["accuracy"])
    assert runs["digits/la_sgd"]["test_accuracy"] > initial["accuracy"] + 0.2

    sweep = {r["method"]: r for r in results["sweep_runs"]}
    assert set(sweep) == {f"{m}@lr{lr}" for m in ("sgd", "la_sgd") for lr in ("0_1", "1e+03")}
    assert sweep["sgd@lr0_1"]["test_accuracy"] == runs["digits/sgd"]["test_accuracy"]  # reused
    diverged = sweep["sgd@lr1e+03"]
    assert diverged["diverged_at_step"] is not None
    assert diverged["test_accuracy"] == pytest.approx(1 / data.num_classes)
    assert (workdir / "digits/sweep/diverged/sgd@lr1e+03-seed0.json").exists()

    md = (workdir / "results.md").read_text()
    assert "## Learning-rate sensitivity: digits" in md
    assert "test_accuracy_range" in md
    assert "## Verdicts" in md
    claims = [v["claim"] for v in results["verdicts"]]
    assert len(claims) == 3  # la >= sgd, ml2 >= la (ml3 is not run), la's sensitivity
    for needle in (
        "digits: la_sgd >= sgd in final test accuracy",
        "digits: ml2_sgd >= la_sgd in final test accuracy",
        "digits: la_sgd is no more sensitive to the learning rate than sgd",
    ):
        assert sum(needle in c for c in claims) == 1, needle
        line = next(x for x in md.splitlines() if needle in x)
        assert line.startswith(("- **HELD**", "- **DID NOT HOLD**")), line
    assert "sgd@lr1e+03 seed 0" in md  # the divergence note
    assert "| digits/la_sgd |" in out

    # Same command again: every run is finished (or known to diverge); same numbers.
    assert main(argv) == 0
    again = json.loads((workdir / "results.json").read_text())
    assert again["runs"] == results["runs"] or all(
        a["test_accuracy"] == b["test_accuracy"]
        for a, b in zip(again["runs"], results["runs"], strict=True)
    )
    assert [r["test_accuracy"] for r in again["sweep_runs"]] == [
        r["test_accuracy"] for r in results["sweep_runs"]
    ]


def _error(capsys, tmp_path, overrides, pattern):
    argv = ["run", "lookahead", "--workdir", str(tmp_path / "w"), *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert "Traceback" not in err, err
    assert pattern in err, err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["--config.datasets=digits,imagenet"], "datasets: 'imagenet' is not one of"),
        (["--config.datasets=digits,digits"], "datasets must not repeat a name"),
        (["--config.per_dataset.digits.model=vgg"], "model must be one of"),
        (["--config.per_dataset.mnist1d.steps=0"], "steps must be >= 1, got 0"),
        (
            ["--config.methods.la_sgd.lookahead.levels=((5,1.5),)"],
            "methods.la_sgd.lookahead: alpha",
        ),
        (
            ["--config.methods.ml2_sgd.lookahead.levels=((5,0.5),(0,0.5))"],
            "methods.ml2_sgd.lookahead: levels[1][0] (k)",
        ),
        (["--config.methods.la_sgd.lookahead.levels=()"], "lookahead.levels must be"),
        (
            ["--config.methods.la_sgd.lookahead.momentum=pull"],
            "methods.la_sgd.lookahead: momentum must be one of",
        ),
        (
            ["--config.methods.la_sgd.lookahead.momentum=reset"],
            "needs an inner optimizer with a first-moment buffer",
        ),
        (["--config.methods.la_sgd.learning_rate=-1"], "methods.la_sgd.learning_rate must be > 0"),
        (["--config.comparisons=(('la_sgd','sdg'),)"], "comparisons: 'sdg' is not in methods"),
        (["--config.comparisons=(('la_sgd','la_sgd'),)"], "must be a (method, baseline) pair"),
        (["--config.sweep.methods=sgd,nope"], "sweep.methods: 'nope' is not in methods"),
        (["--config.sweep.factors=1"], "sweep.factors must hold at least two distinct"),
        (["--config.sweep.factors=1,-1"], "sweep.factors must be > 0"),
        (["--config.sweep.datasets=digits,cifar"], "sweep.datasets: 'cifar' is not one of"),
        (["--config.model=mlp"], "unknown config key 'model'"),
    ],
)
def test_invalid_config_is_a_one_line_error(capsys, tmp_path, overrides, pattern):
    _error(capsys, tmp_path, overrides, pattern)


def test_configs_are_valid_and_full_follows_the_paper():
    runner.validate(get_config("quick"))
    full = get_config("full")
    runner.validate(full)
    assert full.datasets == ("cifar10", "cifar100")
    assert full.batch_size == 128
    sgd = full.methods.sgd
    assert (sgd.optimizer, sgd.learning_rate, sgd.momentum, sgd.weight_decay) == (
        "momentum",
        0.1,
        0.9,
        5e-4,
    )
    assert runner.lookahead_levels(full.methods.la_sgd) == ((5, 0.8),)
    with pytest.raises(ValueError, match="variant"):
        get_config("huge")


def test_grid_spread_is_per_seed_max_minus_min():
    runs = [
        {"method": f"m@{i}", "seed": s, "test_accuracy": acc}
        for s, accs in ((0, (0.5, 0.9, 0.7)), (1, (0.6, 0.6, 0.8)))
        for i, acc in enumerate(accs)
    ]
    records = reporting.grid_spread(runs, {"m": ["m@0", "m@1", "m@2"]})
    assert [r["seed"] for r in records] == [0, 1]
    assert [r["test_accuracy_range"] for r in records] == pytest.approx([0.4, 0.2])
    assert [r["test_accuracy_grid_min"] for r in records] == pytest.approx([0.5, 0.6])
    assert [r["test_accuracy_grid_mean"] for r in records] == pytest.approx([0.7, 2 / 3])
    summary = reporting.summarize(records, metrics=("test_accuracy_range",))
    assert summary["m"]["test_accuracy_range"]["mean"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="at least two points"):
        reporting.grid_spread(runs, {"m": ["m@0"]})
    with pytest.raises(ValueError, match="no seed"):
        reporting.grid_spread(runs, {"m": ["m@0", "absent"]})
    table = reporting.markdown_grid(
        summary, {"m": ["m", None]}, ["a", "b"], metric="test_accuracy_range"
    )
    assert table.splitlines()[2] == "| m | 30.00 ± 14.14 | - |"

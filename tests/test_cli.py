"""``python -m experiments``: errors, list, dry-run, provenance and resume, a smallest
end-to-end run, SIGKILL and resume.

Most CLI behaviour is checked on a fake experiment (a runner that trains nothing), so that
the tests take milliseconds; the real runners are exercised with tiny overrides.
"""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import cli
from experiments.cli import main
from experiments.registry import EXPERIMENTS, Experiment

REPO = Path(__file__).resolve().parents[1]
_USE_COMPILATION_CACHE = cli.use_compilation_cache  # the fixture below stubs it in-process
SMALL = [
    "--config.seeds=0",
    "--config.tasks.digits.epochs=0",
    "--config.tasks.digits.steps=20",
    "--config.log_every=5",
    "--config.eval_every=10",
    "--config.checkpoint_every=10",
    "--no-progress",
]


def _one_line_error(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert "Traceback" not in err, err
    assert err.startswith("error:"), err
    assert pattern in err, err


@pytest.fixture(autouse=True)
def _compilation_cache(monkeypatch, tmp_path):
    """Subprocesses cache compilations under tmp_path; in-process runs leave JAX's cache off
    (the setting is process-wide and only read at the first compilation)."""
    monkeypatch.setenv("OPTLAB_CACHE_DIR", str(tmp_path / "jax_cache"))
    monkeypatch.setattr(cli, "use_compilation_cache", lambda: None)


def _fake_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant not in ("smoke", "quick"):
        raise ValueError(f"no variant {variant!r}")
    return ml_collections.ConfigDict(
        {
            "steps": 10 if variant == "quick" else 2,
            "seeds": (0, 1),
            "lr": 0.1,
            "dataset": "digits",
            "tasks": {
                "a": {"dataset": "digits", "steps": 5, "opt": {"lr": 0.5}},
                "b": {"dataset": "mnist1d"},
            },
        }
    )


@pytest.fixture
def fake(monkeypatch):
    """A registered experiment ``fake`` whose runner trains nothing and records its calls.

    ``run`` "loads" each task's dataset (ValueError for an unknown name, KeyError for
    ``"keyerror"``), calls ``on_ready``, then writes results.md and a ``trained`` file
    counting the runs in that workdir; ``fail_after_ready`` makes it raise afterwards.
    """
    calls: list[dict] = []
    runner = types.ModuleType("fake_runner")

    def validate(config):
        if config.steps < 1:
            raise ValueError(f"steps must be >= 1, got {config.steps}.")

    def plan(config):
        return f"plan: {len(config.tasks)} tasks x {len(config.seeds)} seeds = 4 runs"

    def run(config, workdir, *, devices, progress, on_ready=None):
        workdir = Path(workdir)
        for task in config.tasks.values():
            if task.dataset == "keyerror":
                raise KeyError(task.dataset)
            if task.dataset not in ("digits", "mnist1d"):
                raise ValueError(f"unknown dataset {task.dataset!r}; known: digits, mnist1d")
        calls.append({"progress": progress, "devices": devices, "before": workdir.exists()})
        on_ready()
        if runner.fail_after_ready:
            raise ValueError("a bug in training")
        counter = workdir / "trained"
        counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
        (workdir / "results.md").write_text("# fake results\n")
        return {}

    runner.validate, runner.plan, runner.run = validate, plan, run
    runner.fail_after_ready = False
    config_module = types.ModuleType("fake_config")
    config_module.get_config = _fake_config
    monkeypatch.setitem(sys.modules, "fake_runner", runner)
    monkeypatch.setitem(sys.modules, "fake_config", config_module)
    monkeypatch.setitem(
        EXPERIMENTS,
        "fake",
        Experiment("fake", "fake_runner", "fake_config", "a claim", ("smoke", "quick"), "1 s"),
    )
    return types.SimpleNamespace(runner=runner, calls=calls)


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["run", "nope"], "unknown experiment 'nope'; known: baselines"),
        (["run", "baselines", "--config.nope=1"], "unknown config key 'nope'"),
        (
            ["run", "baselines", "--config.methods.sgd.nope=1"],
            "unknown config key 'methods.sgd.nope'",
        ),
        (
            ["run", "baselines", "--config.steps=abc"],
            "--config.steps: expected a value of type int",
        ),
        (["run", "baselines", "--config.steps=1.5"], "expected a value of type int"),
        (["run", "baselines", "--config.tasks.digits.epochs=0"], "set steps >= 1 or epochs >= 1"),
        (["run", "baselines", "--config.steps=5"], "set --config.tasks.digits.epochs instead"),
        (
            ["run", "baselines", "--config.tasks.digits.steps=5"],
            "add --config.tasks.digits.epochs=0",
        ),
        (
            ["run", "baselines", "--config.methods.sgd.learning_rate=-1"],
            "methods.sgd.learning_rate must be > 0",
        ),
        (["run", "baselines", "--config.model=vgg"], "model must be one of"),
        (["run", "baselines", "--config.method_names=sgd,lion"], "'lion' is not in methods"),
        (["run", "baselines", "--config.methods=1"], "is a group"),
        (
            ["run", "baselines", "--config.batch_size=100000"],
            "batch_size must be in [1, 1221] (the training split",
        ),
        (["run", "baselines", "--variant", "huge"], "unknown variant 'huge' of baselines"),
        (["run", "baselines", "--devices", "0"], "--devices must be >= 1"),
        (["run", "baselines", "--devices", "64"], "only 8 devices are visible"),
        (["run", "baselines", "stray"], "unrecognized argument 'stray'"),
        (["list", "--x"], "unrecognized arguments: --x"),
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, tmp_path, argv, pattern):
    _one_line_error(capsys, [*argv, "--workdir", str(tmp_path / "w")], pattern)


def test_missing_dataset_explains_how_to_get_it(capsys, tmp_path):
    workdir = tmp_path / "w"
    argv = [
        "run",
        "baselines",
        "--config.tasks.digits.dataset=cifar10",
        f"--config.data_dir={tmp_path / 'd'}",
        "--workdir",
        str(workdir),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:")
    assert "Traceback" not in err
    assert "download_and_prepare(file_format='array_record')" in err
    assert "data_batch_1" in err
    assert not workdir.exists()  # nothing half-made is left behind


def test_list_shows_name_variants_runtime_and_claim(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("baselines  (variants: smoke, quick, full)")
    flat = " ".join(out.split())
    for experiment in EXPERIMENTS.values():
        assert f"{experiment.name} (variants: {', '.join(experiment.variants)})" in flat
        assert f"runtime: {experiment.runtime}" in flat
        assert f"claim: {experiment.claim}" in flat
    assert "Reference numbers" in out


def test_list_imports_neither_jax_nor_the_runners():
    code = (
        "import sys; from experiments.cli import main; assert main(['list']) == 0; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', "
        "'optax', 'ml_collections') or m.startswith(('experiments.runners', "
        "'experiments.configs'))); print('IMPORTED', bad, file=sys.stderr); "
        "sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "lookahead" in proc.stdout


def test_registry_claims_are_the_runners_claims():
    for experiment in EXPERIMENTS.values():
        runner = experiment.runner_module()
        assert experiment.claim == runner.CLAIM, experiment.name
        assert experiment.variants, experiment.name
        assert set(experiment.variants) <= {"smoke", "quick", "full"}
        config_module = experiment.config_module()
        for variant in experiment.variants:  # every listed variant exists
            assert config_module.get_config(variant) is not None


def test_variant_must_be_one_the_experiment_lists(capsys, tmp_path, fake):
    workdir = tmp_path / "w"
    _one_line_error(
        capsys,
        ["run", "fake", "--variant", "full", "--workdir", str(workdir)],
        "unknown variant 'full' of fake; known: smoke, quick",
    )
    assert main(["run", "fake", "--variant", "smoke", "--workdir", str(workdir)]) == 0
    record = json.loads((workdir / "config.json").read_text())
    assert record["variant"] == "smoke"
    assert record["config"]["steps"] == 2


def test_dry_run_prints_config_and_plan_and_writes_nothing(capsys, tmp_path, fake):
    workdir = tmp_path / "w"
    argv = ["run", "fake", "--dry-run", "--config.lr=0.3", "--workdir", str(workdir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    config_text, plan = out.rsplit("}\n", 1)
    config = json.loads(config_text + "}")
    assert config["lr"] == 0.3
    assert config["tasks"]["b"] == {"dataset": "mnist1d"}
    assert plan.strip() == "plan: 2 tasks x 2 seeds = 4 runs"
    assert not workdir.exists()
    assert fake.calls == []  # the runner did not run


def test_dry_run_without_plan_prints_only_the_config(capsys, tmp_path, fake):
    del fake.runner.plan
    assert main(["run", "fake", "--dry-run", "--workdir", str(tmp_path / "w")]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 10
    assert not (tmp_path / "w").exists()


def test_dry_run_of_a_real_experiment(capsys, tmp_path):
    workdir = tmp_path / "w"
    argv = ["run", "baselines", "--dry-run", "--config.tasks.digits.epochs=7"]
    assert main([*argv, "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[: out.rindex("}") + 1])["tasks"]["digits"]["epochs"] == 7
    assert "task digits: digits / mlp, 7 epochs of batch 64" in out
    assert "study baselines: 15 runs (5 seeds each)" in out
    assert not workdir.exists()
    _one_line_error(
        capsys,
        ["run", "baselines", "--dry-run", "--config.tasks.digits.epochs=0"],
        "set steps >= 1 or epochs >= 1",
    )


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--config.tasks.b.dataset=nope"], "invalid config: unknown dataset 'nope'"),
        (["--config.tasks.b.dataset=keyerror"], "invalid config: unknown key 'keyerror'"),
        (["--config.steps=0", "--config.tasks.a.steps=1"], "invalid config: steps must be >= 1"),
    ],
)
def test_errors_before_on_ready_leave_nothing_and_the_fixed_rerun_works(
    capsys, tmp_path, fake, args, pattern
):
    workdir = tmp_path / "w"
    _one_line_error(capsys, ["run", "fake", *args, "--workdir", str(workdir)], pattern)
    assert not workdir.exists()
    assert main(["run", "fake", "--workdir", str(workdir)]) == 0  # not refused
    assert (workdir / "trained").read_text() == "1"


def test_errors_after_on_ready_are_not_hidden(tmp_path, fake):
    fake.runner.fail_after_ready = True
    with pytest.raises(ValueError, match="a bug in training"):
        main(["run", "fake", "--workdir", str(tmp_path / "w")])


def _bad_dataset(config: ml_collections.ConfigDict) -> str:
    if "tasks" in config:
        return f"--config.tasks.{next(iter(config.tasks))}.dataset=nope"
    if "datasets" in config:
        return "--config.datasets=nope"
    return "--config.dataset=nope"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_unknown_dataset_is_one_line_in_every_experiment(capsys, tmp_path, name):
    config = EXPERIMENTS[name].config_module().get_config("quick")
    workdir = tmp_path / "w"
    _one_line_error(
        capsys, ["run", name, _bad_dataset(config), "--workdir", str(workdir)], "'nope'"
    )
    assert not workdir.exists()


def test_changed_config_in_same_workdir_is_refused_and_fresh_starts_over(capsys, tmp_path, fake):
    workdir = tmp_path / "w"
    assert main(["run", "fake", "--workdir", str(workdir)]) == 0
    (workdir / "stale").write_text("from the first run")
    capsys.readouterr()
    changed = ["run", "fake", "--workdir", str(workdir), "--config.lr=0.2"]
    _one_line_error(capsys, changed, "differs in: lr); pass --fresh to delete it and start over")
    _one_line_error(
        capsys,
        ["run", "fake", "--workdir", str(workdir), "--config.tasks.a.opt.lr=1.0"],
        "differs in: tasks.a.opt.lr)",
    )
    # --fresh deletes only once the data is loaded: a bad dataset leaves the old workdir as is
    _one_line_error(capsys, [*changed, "--fresh", "--config.tasks.b.dataset=nope"], "'nope'")
    assert (workdir / "stale").exists()
    assert main([*changed, "--fresh"]) == 0
    assert not (workdir / "stale").exists()
    assert (workdir / "trained").read_text() == "1"
    assert json.loads((workdir / "config.json").read_text())["config"]["lr"] == 0.2
    assert fake.calls[-1]["before"]  # the runner was handed the old workdir: deleted later


def test_fresh_refuses_to_delete_a_directory_that_is_not_a_workdir(capsys, tmp_path, fake):
    (tmp_path / "precious.txt").write_text("keep me")
    _one_line_error(
        capsys,
        ["run", "fake", "--fresh", "--workdir", str(tmp_path)],
        "holds no config.json (not a workdir)",
    )
    assert (tmp_path / "precious.txt").exists()


def test_workdir_records_provenance_and_resume_reports_differences(capsys, tmp_path, fake):
    workdir = tmp_path / "w"
    assert main(["run", "fake", "--workdir", str(workdir)]) == 0
    record = json.loads((workdir / "config.json").read_text())
    assert set(record) == {"experiment", "variant", "config", "provenance"}
    assert record["experiment"] == "fake"
    assert record["provenance"]["devices"]["used"] == 1
    capsys.readouterr()

    assert main(["run", "fake", "--workdir", str(workdir)]) == 0  # same code: no note
    assert "note:" not in capsys.readouterr().err
    assert (workdir / "trained").read_text() == "2"

    record["provenance"]["versions"]["jax"] = "0.0.1"
    record["provenance"]["git"]["commit"] = "0123abc"
    record["provenance"]["start_time"] = "2000-01-01T00:00:00Z"
    (workdir / "config.json").write_text(json.dumps(record))
    assert main(["run", "fake", "--workdir", str(workdir)]) == 0
    err = capsys.readouterr().err
    assert "written by other code, versions or devices" in err
    assert "  jax version: 0.0.1 -> " in err
    assert "  git commit: 0123abc -> " in err
    assert "time" not in err.replace("Results, plots", "")
    assert (workdir / "trained").read_text() == "3"  # resumed all the same

    del record["provenance"]
    (workdir / "config.json").write_text(json.dumps(record))
    assert main(["run", "fake", "--workdir", str(workdir)]) == 0
    assert "records no provenance" in capsys.readouterr().err


def test_overriding_a_key_a_task_sets_itself_names_the_key_to_set(capsys, tmp_path, fake):
    workdir = str(tmp_path / "w")
    _one_line_error(
        capsys,
        ["run", "fake", "--config.steps=3", "--workdir", workdir],
        "--config.steps is only a default, and task a sets steps/epochs itself; "
        "set --config.tasks.a.steps instead",
    )
    _one_line_error(
        capsys,
        ["run", "fake", "--config.dataset=mnist1d", "--workdir", workdir],
        "tasks a, b set dataset itself; set --config.tasks.a.dataset, --config.tasks.b.dataset",
    )
    assert not Path(workdir).exists()
    # Allowed: a key no task sets, and a shared default once the shadowing task is set too.
    assert main(["run", "fake", "--config.lr=0.3", "--dry-run"]) == 0
    argv = ["run", "fake", "--config.steps=3", "--config.tasks.a.steps=4", "--dry-run"]
    assert main(argv) == 0


def test_check_task_overrides_on_nested_keys():
    config = _fake_config()
    cli.check_task_overrides(config, ["lr", "seeds", "tasks.a.opt.lr"])
    config.opt = {"lr": 1.0}
    with pytest.raises(cli.UsageError, match=r"set --config\.tasks\.a\.opt\.lr instead"):
        cli.check_task_overrides(config, ["opt.lr"])
    cli.check_task_overrides(ml_collections.ConfigDict({"steps": 1}), ["steps"])  # no tasks


class _Terminal:
    def __init__(self, stream):
        self._stream = stream

    def isatty(self) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self._stream, name)


def test_progress_bars_only_on_a_terminal(monkeypatch, tmp_path, fake):
    assert main(["run", "fake", "--workdir", str(tmp_path / "a")]) == 0
    assert fake.calls[-1]["progress"] is False  # captured stderr: plain lines
    monkeypatch.setattr(sys, "stderr", _Terminal(sys.stderr))
    assert main(["run", "fake", "--workdir", str(tmp_path / "b")]) == 0
    assert fake.calls[-1]["progress"] is True
    assert main(["run", "fake", "--no-progress", "--workdir", str(tmp_path / "c")]) == 0
    assert fake.calls[-1]["progress"] is False


def test_cache_dir_follows_optlab_then_xdg_then_home(monkeypatch, tmp_path):
    assert cli.cache_dir({"OPTLAB_CACHE_DIR": "/x/y", "XDG_CACHE_HOME": "/z"}) == Path("/x/y")
    assert cli.cache_dir({"XDG_CACHE_HOME": "/z"}) == Path("/z/optlab/jax")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli.cache_dir({}) == tmp_path / ".cache" / "optlab" / "jax"


def test_a_configured_compilation_cache_is_left_alone(monkeypatch):
    import jax

    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", "/somewhere/else")
    try:
        assert _USE_COMPILATION_CACHE() is None
        assert jax.config.jax_compilation_cache_dir == "/somewhere/else"
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_smallest_baselines_run_writes_all_outputs(capsys, tmp_path):
    workdir = tmp_path / "w"
    assert main(["run", "baselines", "--workdir", str(workdir), *SMALL, "--config.seeds=0,1"]) == 0
    out = capsys.readouterr().out
    assert "| sgd |" in out
    assert "| adam |" in out
    for name in ("config.json", "digits/metrics.jsonl", "results.json", "results.md",
                 "curves_digits.png"):  # fmt: skip
        assert (workdir / name).stat().st_size > 0, name
    results = json.loads((workdir / "results.json").read_text())
    assert {(r["method"], r["seed"]) for r in results["runs"]} == {
        (m, s) for m in ("sgd", "momentum", "adam") for s in (0, 1)
    }
    adam = next(s for s in results["summaries"] if s["method"] == "adam")
    assert adam["test_accuracy"]["n"] == 2
    assert len(results["verdicts"]) == 2
    assert {v["outcome"] for v in results["verdicts"]} <= {"held", "inconclusive", "did not hold"}
    assert results["provenance"]["versions"]["jax"]
    record = json.loads((workdir / "config.json").read_text())
    assert record["config"]["tasks"]["digits"]["steps"] == 20
    assert record["provenance"]["versions"]["jax"]
    assert (workdir / "curves_digits.png").read_bytes()[:4] == b"\x89PNG"


def test_no_traceback_from_the_real_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "run", "nope"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    from experiments.registry import EXPERIMENTS

    known = ", ".join(sorted(EXPERIMENTS))
    assert "lookahead" in known
    assert proc.stderr.strip() == f"error: unknown experiment 'nope'; known: {known}"


@pytest.mark.slow
def test_real_entry_point_caches_compilations_and_prints_no_bars(tmp_path):
    """A subprocess (stderr not a terminal): persistent cache in $OPTLAB_CACHE_DIR, no tqdm
    bars, provenance naming this checkout's commit."""
    cache = tmp_path / "cache"
    workdir = tmp_path / "w"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments",
            "run",
            "baselines",
            "--workdir",
            str(workdir),
            "--config.method_names=sgd",
            "--config.seeds=0",
            "--config.tasks.digits.epochs=0",
            "--config.tasks.digits.steps=4",
            "--config.log_every=2",
            "--config.eval_every=0",
            "--config.checkpoint_every=2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OPTLAB_CACHE_DIR": str(cache)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(cache.iterdir()), "nothing in the persistent compilation cache"
    assert "it/s" not in proc.stderr, proc.stderr[-2000:]
    assert "\r" not in proc.stderr, proc.stderr[-2000:]
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    provenance = json.loads((workdir / "config.json").read_text())["provenance"]
    if git.returncode == 0:
        assert provenance["git"]["commit"] == git.stdout.strip()


def _final_params(workdir: Path, steps: int) -> list[np.ndarray]:
    path = workdir / "digits" / "sgd" / "default" / "checkpoints" / str(steps) / "default"
    tree = ocp.StandardCheckpointer().restore(path)
    return [np.asarray(x) for x in __import__("jax").tree.leaves(tree)]


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_is_bitwise_equal(tmp_path):
    steps = 8_000  # long enough to be killed mid-training (1 run: ~0.1 ms a step)
    args = [
        sys.executable,
        "-m",
        "experiments",
        "run",
        "baselines",
        "--no-progress",
        "--config.method_names=sgd",
        "--config.seeds=0",
        "--config.tasks.digits.epochs=0",
        f"--config.tasks.digits.steps={steps}",
        "--config.log_every=10",
        "--config.eval_every=0",
        "--config.checkpoint_every=50",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    killed = tmp_path / "killed"
    ckpt_dir = killed / "digits" / "sgd" / "default" / "checkpoints"
    proc = subprocess.Popen(
        [*args, "--workdir", str(killed)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = [p for p in ckpt_dir.glob("*") if p.name.isdigit()] if ckpt_dir.exists() else []
        if done:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = sorted(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit())
    assert saved, "no checkpoint was finished before the kill"
    assert max(saved) < steps, saved  # killed mid-training

    resumed = subprocess.run(
        [*args, "--workdir", str(killed)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    clean = tmp_path / "clean"
    straight = subprocess.run(
        [*args, "--workdir", str(clean)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    for a, b in zip(_final_params(killed, steps), _final_params(clean, steps), strict=True):
        np.testing.assert_array_equal(a, b)
    ra = json.loads((killed / "results.json").read_text())["runs"][0]
    rb = json.loads((clean / "results.json").read_text())["runs"][0]
    assert ra["test_accuracy"] == rb["test_accuracy"]
    assert ra["train_loss"] == rb["train_loss"]
    steps_logged = [
        json.loads(line)["step"]
        for line in (killed / "digits" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps_logged == [*range(10, steps + 1, 10), steps]  # no gaps, no duplicates

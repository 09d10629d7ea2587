"""``python -m experiments``: errors, a smallest end-to-end run, SIGKILL and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "--config.seeds=0",
    "--config.steps=20",
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
        (["run", "baselines", "--config.steps=0"], "steps must be >= 1, got 0"),
        (
            ["run", "baselines", "--config.methods.sgd.learning_rate=-1"],
            "methods.sgd.learning_rate must be > 0",
        ),
        (["run", "baselines", "--config.model=vgg"], "model must be one of"),
        (["run", "baselines", "--config.method_names=sgd,lion"], "'lion' is not in methods"),
        (["run", "baselines", "--config.methods=1"], "is a group"),
        (["run", "baselines", "--config.batch_size=100000"], "batch_size must be in [1, 1437]"),
        (["run", "baselines", "--variant", "huge"], "invalid choice: 'huge'"),
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
        "--config.dataset=cifar10",
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


def test_changed_config_in_same_workdir_is_refused(capsys, tmp_path):
    workdir = str(tmp_path / "w")
    assert (
        main(["run", "baselines", "--workdir", workdir, *SMALL, "--config.method_names=sgd"]) == 0
    )
    capsys.readouterr()
    _one_line_error(
        capsys,
        ["run", "baselines", "--workdir", workdir, *SMALL, "--config.method_names=adam"],
        "differs in: method_names",
    )


def test_list_names_each_experiment_and_claim(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("baselines")
    assert "Reference numbers" in out


def test_smallest_baselines_run_writes_all_outputs(capsys, tmp_path):
    workdir = tmp_path / "w"
    assert main(["run", "baselines", "--workdir", str(workdir), *SMALL, "--config.seeds=0,1"]) == 0
    out = capsys.readouterr().out
    assert "| sgd |" in out
    assert "| adam |" in out
    for name in ("config.json", "metrics.jsonl", "results.json", "results.md", "curves.png"):
        assert (workdir / name).stat().st_size > 0, name
    results = json.loads((workdir / "results.json").read_text())
    assert {(r["method"], r["seed"]) for r in results["runs"]} == {
        (m, s) for m in ("sgd", "momentum", "adam") for s in (0, 1)
    }
    assert results["summary"]["adam"]["test_accuracy"]["n"] == 2
    assert len(results["verdicts"]) == 2
    assert json.loads((workdir / "config.json").read_text())["config"]["steps"] == 20
    assert (workdir / "curves.png").read_bytes()[:4] == b"\x89PNG"


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


def _final_params(workdir: Path, steps: int) -> list[np.ndarray]:
    path = workdir / "runs" / "sgd" / "seed0" / "checkpoints" / str(steps) / "default"
    tree = ocp.StandardCheckpointer().restore(path)
    return [np.asarray(x) for x in __import__("jax").tree.leaves(tree)]


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_is_bitwise_equal(tmp_path):
    steps = 3000
    args = [
        sys.executable,
        "-m",
        "experiments",
        "run",
        "baselines",
        "--no-progress",
        "--config.method_names=sgd",
        "--config.seeds=0",
        f"--config.steps={steps}",
        "--config.log_every=10",
        "--config.eval_every=0",
        "--config.checkpoint_every=50",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    killed = tmp_path / "killed"
    ckpt_dir = killed / "runs" / "sgd" / "seed0" / "checkpoints"
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
        json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps_logged == [*range(10, steps + 1, 10), steps]  # no gaps, no duplicates

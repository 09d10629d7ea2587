"""The `extrapolation` experiment: does extrapolation keep accuracy at large batch sizes?

For every batch size b of ``config.batch_sizes`` (one resumable suite per b, in
``workdir/b<b>/``) every (method, seed) trains for the same number of epochs with the
linearly scaled, warmed-up learning rate; extrapolation methods tie ``gamma`` to that
schedule (see ``experiments/configs/extrapolation.py``). A run whose loss becomes
non-finite is recorded as diverged (``diverged.json`` in its run directory, so a resumed
sweep does not train it again) and counts at chance accuracy in the means.

Outputs: ``results.md`` (accuracy and training loss per batch size, verdicts),
``results.json``, ``accuracy_vs_batch_size.png`` and per-batch training curves.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import optax

import optlab
from experiments import reporting
from experiments.data import Dataset, load_dataset
from experiments.distributed import is_main_process
from experiments.errors import ConfigError
from experiments.models import model_names
from experiments.optimizers import validate_spec
from experiments.registry import get_experiment
from experiments.suite import run_suite, suite_config
from experiments.train import NonFiniteLossError
from experiments.train.step import TrainState

NAME = "extrapolation"
CLAIM = get_experiment(NAME).claim

TRANSFORMS = ("none", "extrapolation")
DIRECTIONS = ("gradient", "past", "noise")
BASE_OPTIMIZERS = ("sgd", "momentum", "nesterov")
SCHEDULES = ("warmup_cosine", "warmup_step")


# --- schedules and methods ------------------------------------------------------------------


def lr_schedule(
    peak: float,
    *,
    steps: int,
    warmup_steps: int,
    kind: str,
    decay_fractions: Sequence[float] = (),
) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine or step decay."""
    warmup_steps = min(warmup_steps, steps - 1) if steps > 1 else 0
    if kind == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, max(warmup_steps, 1), max(steps, warmup_steps + 1)
        )
    if kind == "warmup_step":
        # join_schedules hands the decay schedule the steps counted from the warm-up's end.
        boundaries: dict[int, float] = {}
        for f in decay_fractions:
            at = int(f * steps) - warmup_steps
            if 0 < at < steps - warmup_steps:
                boundaries[at] = boundaries.get(at, 1.0) * 0.1
        decay = optax.piecewise_constant_schedule(peak, boundaries)
        if not warmup_steps:
            return decay
        warmup = optax.linear_schedule(0.0, peak, warmup_steps)
        return optax.join_schedules([warmup, decay], [warmup_steps])
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}.")


def make_tx(method: str, spec: Mapping[str, Any], steps: int) -> optax.GradientTransformation:
    """One method at one batch size: ``spec`` carries the scaled rate and the schedule."""
    del method
    lr = lr_schedule(
        spec["learning_rate"],
        steps=steps,
        warmup_steps=spec.get("warmup_steps", 0),
        kind=spec.get("schedule", "warmup_cosine"),
        decay_fractions=spec.get("decay_fractions", ()),
    )
    name = spec["optimizer"]
    momentum = None if name == "sgd" else spec.get("momentum", 0.9)
    base = optax.sgd(lr, momentum=momentum, nesterov=name == "nesterov")
    if spec.get("weight_decay", 0.0):  # coupled L2, as in the paper's SGD
        base = optax.chain(optax.add_decayed_weights(spec["weight_decay"]), base)
    if spec.get("transform", "none") == "none":
        return base
    ratio = spec.get("gamma_ratio", 1.0)
    stop = spec.get("stop_after", 0)
    return optlab.extrapolation(
        base,
        lambda count: ratio * lr(count),
        direction=spec.get("direction", "gradient"),
        stop_after=stop or None,
    )


def eval_params(state: TrainState) -> Any:
    """The true iterate: past/noise extrapolation keeps ``x + offset`` as the loop's params."""
    try:
        return optlab.extrapolation_eval_params(state.params, state.opt_state)
    except ValueError:  # no ExtrapolationState: plain SGD
        return state.params


# --- config ----------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict) -> None:
    """Range checks; ``ValueError`` names the offending key."""
    if config.model not in model_names():
        raise ValueError(f"model must be one of {model_names()}, got {config.model!r}.")
    if not config.seeds or any((not isinstance(s, int)) or s < 0 for s in config.seeds):
        raise ValueError(
            f"seeds must be non-negative integers, at least one, got {config.seeds!r}."
        )
    for key in ("epochs", "base_batch_size", "log_points"):
        if config[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {config[key]!r}.")
    if config.warmup_epochs < 0 or config.warmup_epochs >= config.epochs:
        raise ValueError(
            f"warmup_epochs must lie in [0, epochs={config.epochs}), got {config.warmup_epochs}."
        )
    if not config.batch_sizes or any(b < 0 for b in config.batch_sizes):
        raise ValueError(
            f"batch_sizes must be >= 1 (0: the whole training set), at least one, got "
            f"{config.batch_sizes!r}."
        )
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}.")
    if any(not 0.0 < f < 1.0 for f in config.decay_fractions):
        raise ValueError(f"decay_fractions must lie in (0, 1), got {config.decay_fractions!r}.")
    if not 0 <= config.extrapolation_stop_epoch <= config.epochs:
        raise ValueError(
            f"extrapolation_stop_epoch must lie in [0, epochs={config.epochs}] (0: never), got "
            f"{config.extrapolation_stop_epoch}."
        )
    if not config.method_names:
        raise ValueError("method_names must name at least one method, got ().")
    for method in config.method_names:
        if method not in config.methods:
            raise ValueError(
                f"method_names: {method!r} is not in methods (known: {sorted(config.methods)})."
            )
        spec = config.methods[method]
        validate_spec(method, spec)
        if spec.optimizer not in BASE_OPTIMIZERS:
            raise ValueError(
                f"methods.{method}.optimizer must be one of {BASE_OPTIMIZERS} (linear LR "
                f"scaling is an SGD rule), got {spec.optimizer!r}."
            )
        transform = spec.get("transform", "none")
        if transform not in TRANSFORMS:
            raise ValueError(
                f"methods.{method}.transform must be one of {TRANSFORMS}, got {transform!r}."
            )
        if transform == "extrapolation":
            if spec.get("direction", "gradient") not in DIRECTIONS:
                raise ValueError(
                    f"methods.{method}.direction must be one of {DIRECTIONS}, got "
                    f"{spec.get('direction')!r}."
                )
            ratio = spec.get("gamma_ratio", 1.0)
            if not (isinstance(ratio, int | float) and math.isfinite(ratio) and ratio >= 0):
                raise ValueError(f"methods.{method}.gamma_ratio must be >= 0, got {ratio!r}.")
    if config.methods[config.method_names[0]].get("transform", "none") != "none":
        raise ValueError(
            f"method_names must start with the SGD baseline (transform 'none'), got "
            f"{config.method_names[0]!r}."
        )


def resolve_batch_sizes(config: ml_collections.ConfigDict, n: int) -> list[int]:
    """The sweep's batch sizes, ascending, with 0 read as ``n`` (the whole training set)."""
    sizes = sorted({b or n for b in config.batch_sizes})
    if sizes[-1] > n:
        raise ConfigError(
            f"batch_sizes must be in [1, {n}] (the training set; 0 means all of it), got "
            f"{sizes[-1]}."
        )
    return sizes


def batch_config(
    config: ml_collections.ConfigDict,
    batch_size: int,
    n: int,
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
) -> ml_collections.ConfigDict:
    """The suite config of one batch size: equal epochs, linearly scaled rates.

    Each method spec gets the scaled ``learning_rate`` and the schedule in steps
    (``warmup_steps``, ``schedule``, ``decay_fractions``, ``stop_after``), read by
    :func:`make_tx`.
    """
    steps_per_epoch = n // batch_size
    steps = config.epochs * steps_per_epoch
    log_every = max(1, steps // config.log_points)
    specs = {}
    for method in methods:
        spec = dict(config.methods[method].to_dict())
        spec.update(
            learning_rate=spec["learning_rate"] * batch_size / config.base_batch_size,
            warmup_steps=config.warmup_epochs * steps_per_epoch,
            schedule=config.schedule,
            decay_fractions=tuple(config.decay_fractions),
            stop_after=config.extrapolation_stop_epoch * steps_per_epoch,
        )
        specs[method] = spec
    return suite_config(
        dataset=config.dataset,
        data_dir=config.data_dir,
        data_seed=config.data_seed,
        model=config.model,
        seeds=tuple(seeds),
        steps=steps,
        batch_size=batch_size,
        log_every=log_every,
        eval_every=0,
        checkpoint_every=log_every * max(1, config.log_points // 2),
        method_names=tuple(methods),
        methods=specs,
    )


# --- the run ---------------------------------------------------------------------------------


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    devices: int = 1,
    progress: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    validate(config)
    dataset = load_dataset(config.dataset, seed=config.data_seed, data_dir=config.data_dir or None)
    n = len(dataset.x_train)
    sizes = resolve_batch_sizes(config, n)
    for b in sizes:
        if b % devices:
            raise ConfigError(f"batch size {b} must be divisible by devices ({devices}).")
    if on_ready is not None:  # config and data are good; nothing is written before this
        on_ready()
    runs: list[dict[str, Any]] = []
    for b in sizes:
        runs += train_batch_size(
            config, dataset, b, Path(workdir) / f"b{b}", devices=devices, progress=progress
        )
    if not is_main_process():
        return {"runs": runs}
    return write_report(config, workdir, runs, sizes, dataset, time.perf_counter() - t0)


def _marker(workdir: Path, method: str, seed: int) -> Path:
    return workdir / "runs" / method / f"seed{seed}" / "diverged.json"


def train_batch_size(
    config: ml_collections.ConfigDict,
    dataset: Dataset,
    batch_size: int,
    workdir: Path,
    *,
    devices: int,
    progress: bool,
) -> list[dict[str, Any]]:
    """Every (method, seed) at one batch size, one record each, in config order.

    One suite call trains the methods without a diverged run on record (the data, model
    and evaluators are then built once); if a run diverges, or a method already has a
    diverged seed, its runs go one suite call each (finished runs only re-evaluate), and
    a diverged run is recorded in ``diverged.json`` instead of raising.
    """
    n = len(dataset.x_train)
    methods, seeds = list(config.method_names), list(config.seeds)
    clean = [m for m in methods if not any(_marker(workdir, m, s).exists() for s in seeds)]
    found: dict[tuple[str, int], dict[str, Any]] = {}
    if clean:
        cfg = batch_config(config, batch_size, n, methods=clean, seeds=seeds)
        try:
            for r in _suite(cfg, dataset, workdir, devices=devices, progress=progress):
                found[(r["method"], r["seed"])] = r
        except NonFiniteLossError:
            pass  # retried one run at a time below
    records = []
    for method in methods:
        for seed in seeds:
            record = found.get((method, seed))
            if record is None:
                record = _train_one(
                    config, dataset, batch_size, method, seed, workdir, devices, progress
                )
            records.append(record)
    return records


def _suite(
    cfg: ml_collections.ConfigDict, dataset: Dataset, workdir: Path, *, devices: int, progress: bool
) -> list[dict[str, Any]]:
    runs = run_suite(
        cfg,
        workdir,
        dataset=dataset,
        tx_factory=make_tx,
        devices=devices,
        progress=progress,
        eval_params=eval_params,
    )
    return [
        {
            **r,
            "diverged": False,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.methods[r["method"]].learning_rate,
        }
        for r in runs
    ]


def _train_one(
    config: ml_collections.ConfigDict,
    dataset: Dataset,
    batch_size: int,
    method: str,
    seed: int,
    workdir: Path,
    devices: int,
    progress: bool,
) -> dict[str, Any]:
    """One run alone; a diverged run is recorded (and remembered) instead of raising."""
    marker = _marker(workdir, method, seed)
    if marker.exists():
        return json.loads(marker.read_text())
    cfg = batch_config(config, batch_size, len(dataset.x_train), methods=[method], seeds=[seed])
    try:
        (record,) = _suite(cfg, dataset, workdir, devices=devices, progress=progress)
    except NonFiniteLossError as error:
        record = {
            "method": method,
            "seed": seed,
            "diverged": True,
            "diverged_at_step": error.step,
            "test_accuracy": 1.0 / dataset.num_classes,
            "test_loss": math.nan,
            "train_accuracy": math.nan,
            "train_loss": math.nan,
            "steps": cfg.steps,
            "batch_size": batch_size,
            "learning_rate": cfg.methods[method].learning_rate,
        }
        if is_main_process():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(record))
    return record


# --- report ----------------------------------------------------------------------------------


def _paired_drop(
    runs: Sequence[Mapping[str, Any]], method: str, small: int, large: int
) -> list[float]:
    """Per seed: test accuracy at the smallest batch minus that at the largest."""
    acc = {(r["batch_size"], r["seed"]): r["test_accuracy"] for r in runs if r["method"] == method}
    seeds = sorted({s for (_, s) in acc})
    return [
        acc[(small, s)] - acc[(large, s)] for s in seeds if (small, s) in acc and (large, s) in acc
    ]


def write_report(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    runs: Sequence[Mapping[str, Any]],
    sizes: Sequence[int],
    dataset: Dataset,
    wall_time_s: float,
) -> dict[str, Any]:
    workdir = Path(workdir)
    methods = list(config.method_names)
    baseline = methods[0]
    by_size = {
        b: reporting.summarize(
            [r for r in runs if r["batch_size"] == b], ("test_accuracy", "train_loss")
        )
        for b in sizes
    }
    diverged = {
        (b, m): sum(1 for r in runs if r["batch_size"] == b and r["method"] == m and r["diverged"])
        for b in sizes
        for m in methods
    }
    small, large = sizes[0], sizes[-1]
    drops = {m: reporting.mean_std(_paired_drop(runs, m, small, large)) for m in methods}
    verdicts = []
    for b in sizes:
        for m in methods[1:]:
            verdicts.append(
                reporting.compare(
                    by_size[b], m, baseline, claim=f"[batch {b}] {m} >= {baseline} in test accuracy"
                )
            )
    if len(sizes) > 1:
        summary_drop = {m: {"accuracy_drop": drops[m]} for m in methods}
        for m in methods[1:]:
            verdicts.append(
                reporting.compare(
                    summary_drop,
                    m,
                    baseline,
                    metric="accuracy_drop",
                    higher_is_better=False,
                    claim=f"{m} loses less test accuracy than {baseline} from batch {small} "
                    f"to batch {large}",
                )
            )
    steps = {b: config.epochs * (len(dataset.x_train) // b) for b in sizes}
    lrs = {b: config.methods[baseline].learning_rate * b / config.base_batch_size for b in sizes}

    def cell(b: int, m: str, metric: str, scale: float, fmt: str) -> str:
        s = by_size[b][m][metric]
        text = f"{scale * s['mean']:{fmt}} ± {scale * s['std']:{fmt}}"
        if diverged[(b, m)]:
            text += f" ({diverged[(b, m)]}/{s['n']} diverged)"
        return text

    header = "| method | " + " | ".join(f"b={b}" for b in sizes) + " |"
    rule = "|---" * (len(sizes) + 1) + "|"
    acc_rows = [
        f"| {m} | " + " | ".join(cell(b, m, "test_accuracy", 100, ".2f") for b in sizes) + " |"
        for m in methods
    ]
    loss_rows = [
        f"| {m} | " + " | ".join(cell(b, m, "train_loss", 1, ".4f") for b in sizes) + " |"
        for m in methods
    ]
    drop_rows = [
        f"| {m} | {100 * drops[m]['mean']:.2f} ± {100 * drops[m]['std']:.2f} |" for m in methods
    ]
    plots = [plot_accuracy_vs_batch(workdir, by_size, methods, sizes)]
    for b in sizes:
        plots.append(
            f"b{b}/" + reporting.plot_curves(workdir / f"b{b}", methods, title=f"batch {b}")
        )
    notes = [
        "Diverged runs (non-finite loss) count at chance accuracy "
        f"({100 / dataset.num_classes:.0f}%) in the means; their training loss is NaN.",
        "Equal epochs, not equal compute: EXTRAP-SGD computes 2 gradients per step, the "
        "past and noise variants 1 (as SGD).",
        "One device: the harness averages the first gradient over devices before the "
        "optimizer, so with --devices > 1 EXTRAP-SGD's extrapolation would use the global, "
        "not the local, gradient (global extragradient, a different method).",
        f"Wall time of this invocation: {wall_time_s:.0f} s (resumed runs only re-evaluate).",
    ]
    lines = [
        f"# {NAME}",
        "",
        f"**Claim checked.** {CLAIM}",
        "",
        f"Dataset `{config.dataset}` ({len(dataset.x_train)} training examples), model "
        f"`{config.model}`, {config.epochs} epochs at every batch size, seeds "
        f"{list(config.seeds)}. Learning rate {config.methods[baseline].learning_rate:g} x "
        f"b / {config.base_batch_size}, {config.warmup_epochs} warm-up epochs, "
        f"`{config.schedule}`; extrapolation gamma = gamma_ratio x lr_t"
        + (
            f", stopped after epoch {config.extrapolation_stop_epoch}."
            if config.extrapolation_stop_epoch
            else "."
        ),
        "",
        "| batch size | " + " | ".join(str(b) for b in sizes) + " |",
        "|---" * (len(sizes) + 1) + "|",
        "| peak lr | " + " | ".join(f"{lrs[b]:.4g}" for b in sizes) + " |",
        "| steps | " + " | ".join(str(steps[b]) for b in sizes) + " |",
        "",
        "## Test accuracy (%), mean ± std over seeds",
        "",
        header,
        rule,
        *acc_rows,
        "",
        "## Final training loss",
        "",
        header,
        rule,
        *loss_rows,
        *(
            [
                "",
                f"## Accuracy lost from batch {small} to batch {large} (percentage points, "
                "per seed)",
                "",
                "| method | drop |",
                "|---|---|",
                *drop_rows,
            ]
            if len(sizes) > 1
            else []
        ),
        "",
        *reporting.closing_sections(verdicts, notes, plots),
    ]
    (workdir / "results.md").write_text("\n".join(lines))
    results = {
        "experiment": NAME,
        "claim": CLAIM,
        "config": config.to_dict(),
        "batch_sizes": list(sizes),
        "runs": list(runs),
        "summary": {str(b): by_size[b] for b in sizes},
        "accuracy_drop": drops,
        "verdicts": [v._asdict() for v in verdicts],
        "notes": notes,
        "wall_time_s": wall_time_s,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results


def plot_accuracy_vs_batch(
    workdir: Path,
    by_size: Mapping[int, Mapping[str, Any]],
    methods: Sequence[str],
    sizes: Sequence[int],
) -> str:
    """Test accuracy and final training loss (mean ± std over seeds) against the batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        ("test_accuracy", 100.0, "test accuracy (%)"),
        ("train_loss", 1.0, "final training loss"),
    )
    for ax, (metric, scale, label) in zip(axes, panels, strict=True):
        for m in methods:
            mean = np.array([scale * by_size[b][m][metric]["mean"] for b in sizes])
            std = np.array([scale * by_size[b][m][metric]["std"] for b in sizes])
            ax.errorbar(sizes, mean, yerr=std, marker="o", capsize=3, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(sizes), [str(b) for b in sizes])
        ax.set_xlabel("batch size (equal epochs, linearly scaled lr)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    filename = "accuracy_vs_batch_size.png"
    fig.savefig(workdir / filename, dpi=110)
    plt.close(fig)
    return filename

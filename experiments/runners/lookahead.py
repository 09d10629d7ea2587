"""The `lookahead` experiment: Lookahead and Multilayer Lookahead against their inner optimizer.

Three claims, each checked per dataset on the same data split, seeds and step budget:

1. Lookahead >= its inner optimizer (SGD, Adam) in final test accuracy (Zhang et al. 2019);
2. Multilayer Lookahead >= Lookahead (Pushkin & Barba 2021);
3. Lookahead is less sensitive to the learning rate than its inner optimizer (Zhang et al.'s
   robustness claim): every swept method is retrained at ``learning_rate * factor``; its
   sensitivity is, per seed, the spread (max - min) of final test accuracy over the factors,
   then mean ± std over seeds, compared with the same 2-standard-error rule.

Lookahead methods are evaluated (during training and at the end) on their slowest weights,
``optlab.slow_params(state.opt_state)``; the others on their params (:func:`eval_weights`).
A run whose training loss turns non-finite (a too large learning rate in the sweep) is
scored at chance accuracy (1 / number of classes) and NaN loss, and remembered so that
resuming does not retrain it.

Workdir layout::

    <workdir>/results.md, results.json, sensitivity_<dataset>.png
    <workdir>/<dataset>/              metrics.jsonl, curves.png, runs/<method>/seed<k>/
    <workdir>/<dataset>/sweep/        the sweep's extra runs, runs/<method>@lr<rate>/seed<k>/
                                      (rate with _ for the decimal point, e.g. sgd@lr0_0316)
    <workdir>/<dataset>[/sweep]/diverged/<method>-seed<k>.json
    <workdir>/jax_cache/              compiled programs (see :func:`use_compilation_cache`)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import optlab
from experiments import reporting
from experiments.data import DATASET_NAMES, Dataset
from experiments.distributed import is_main_process
from experiments.optimizers import make_optimizer
from experiments.registry import get_experiment
from experiments.suite import load_suite_data, run_suite, validate_suite
from experiments.train import NonFiniteLossError, TrainState
from optlab import LookaheadState

NAME = "lookahead"
CLAIM = get_experiment(NAME).claim
LOOKAHEAD_KEYS = ("levels", "momentum")

Record = dict[str, Any]


# --- methods ------------------------------------------------------------------------------


def lookahead_levels(spec: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    """The ``((k, alpha), ...)`` levels of a method spec; ``()`` for a plain optimizer."""
    la = spec.get("lookahead")
    if not la:
        return ()
    return tuple((k, a) for k, a in la["levels"])


def make_tx(method: str, spec: Mapping[str, Any], steps: int) -> optax.GradientTransformation:
    """The spec's base optimizer, wrapped in (Multilayer) Lookahead if it has ``lookahead``."""
    del method
    base = make_optimizer(spec, steps=steps)
    levels = lookahead_levels(spec)
    if not levels:
        return base
    momentum = spec["lookahead"].get("momentum", "keep")
    if len(levels) == 1:
        ((k, alpha),) = levels
        return optlab.lookahead(base, sync_period=k, alpha=alpha, momentum=momentum)
    return optlab.multilayer_lookahead(base, levels=levels, momentum=momentum)


def describe(spec: Mapping[str, Any]) -> str:
    """E.g. ``"sgd lr 0.1 + 2-level Lookahead (5, 0.5), (5, 0.5)"``."""
    text = f"{spec['optimizer']} lr {spec['learning_rate']:g}"
    levels = lookahead_levels(spec)
    if levels:
        kind = "Lookahead" if len(levels) == 1 else f"{len(levels)}-level Lookahead"
        text += f" + {kind} " + ", ".join(f"(k={k}, alpha={a:g})" for k, a in levels)
    return text


def eval_weights(state: TrainState) -> Any:
    """The weights to evaluate: the slowest Lookahead weights if any, else the params."""
    nodes = jax.tree.leaves(state.opt_state, is_leaf=lambda n: isinstance(n, LookaheadState))
    if any(isinstance(n, LookaheadState) for n in nodes):
        return optlab.slow_params(state.opt_state)
    return state.params


# --- config -------------------------------------------------------------------------------


EXPERIMENT_KEYS = ("datasets", "per_dataset", "comparisons", "sweep")
PER_DATASET_KEYS = (
    "model",
    "steps",
    "batch_size",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "data_seed",
    "data_dir",
)


def dataset_config(config: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
    """The suite config of one dataset: the shared fields, ``dataset``, and its overrides."""
    sub = ml_collections.ConfigDict(
        {k: v for k, v in config.to_dict().items() if k not in EXPERIMENT_KEYS}
    )
    sub.dataset = dataset
    sub.update(config.per_dataset[dataset].to_dict())
    return sub


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field; a ``ValueError`` names the key, the value and what is allowed."""
    datasets = tuple(config.datasets)
    if not datasets:
        raise ValueError("datasets must name at least one dataset, got ().")
    for name in datasets:
        if name not in DATASET_NAMES:
            raise ValueError(f"datasets: {name!r} is not one of {DATASET_NAMES}.")
        if name not in config.per_dataset or "model" not in config.per_dataset[name]:
            raise ValueError(
                f"per_dataset.{name}.model is required: the model to train on {name!r} "
                f"(per_dataset has entries for {sorted(config.per_dataset)})."
            )
        unknown = sorted(set(config.per_dataset[name]) - set(PER_DATASET_KEYS))
        if unknown:
            raise ValueError(
                f"per_dataset.{name}: unknown keys {unknown}; allowed: {list(PER_DATASET_KEYS)}."
            )
    if len(set(datasets)) != len(datasets):
        raise ValueError(f"datasets must not repeat a name, got {datasets!r}.")
    for name in datasets:
        validate_suite(dataset_config(config, name))
    for method in config.method_names:
        _validate_lookahead(method, config.methods[method])
    # Comparisons and sweep entries may name methods left out of method_names (they are
    # skipped), but only methods that exist: a typo is an error.
    known = sorted(config.methods)
    for pair in config.comparisons:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError(f"comparisons: {pair!r} must be a (method, baseline) pair.")
        for m in pair:
            if m not in config.methods:
                raise ValueError(f"comparisons: {m!r} is not in methods (known: {known}).")
    sweep = config.sweep
    for m in sweep.methods:
        if m not in config.methods:
            raise ValueError(f"sweep.methods: {m!r} is not in methods (known: {known}).")
    if sweep.methods:
        factors = tuple(sweep.factors)
        if len(factors) < 2 or len(set(factors)) != len(factors):
            raise ValueError(
                f"sweep.factors must hold at least two distinct values, got {factors}."
            )
        if any(not isinstance(f, int | float) or not f > 0 for f in factors):
            raise ValueError(f"sweep.factors must be > 0, got {factors}.")
        for name in sweep.datasets:
            if name not in DATASET_NAMES:
                raise ValueError(f"sweep.datasets: {name!r} is not one of {DATASET_NAMES}.")


def active_comparisons(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """The ``(method, baseline)`` pairs whose two methods are both in ``method_names``."""
    names = set(config.method_names)
    return [(m, b) for m, b in config.comparisons if m in names and b in names]


def swept_methods(config: ml_collections.ConfigDict, dataset: str) -> list[str]:
    """The methods the learning-rate sweep retrains on ``dataset`` (none: no sweep there)."""
    if dataset not in config.sweep.datasets:
        return []
    return [m for m in config.sweep.methods if m in set(config.method_names)]


def _validate_lookahead(method: str, spec: Mapping[str, Any]) -> None:
    la = spec.get("lookahead")
    if la is None:
        return
    prefix = f"methods.{method}.lookahead"
    unknown = sorted(set(la) - set(LOOKAHEAD_KEYS))
    if unknown:
        raise ValueError(f"{prefix}: unknown keys {unknown}; known: {list(LOOKAHEAD_KEYS)}.")
    if "levels" not in la:
        raise ValueError(f"{prefix}.levels is required: ((k, alpha), ...).")
    levels = la["levels"]
    if isinstance(levels, str) or not isinstance(levels, Sequence) or not levels:
        raise ValueError(
            f"{prefix}.levels must be ((k, alpha), ...) with >= 1 level, got {levels!r}."
        )
    for i, level in enumerate(levels):
        if isinstance(level, str) or not isinstance(level, Sequence) or len(level) != 2:
            raise ValueError(f"{prefix}.levels[{i}] must be a (k, alpha) pair, got {level!r}.")
    try:
        tx = make_tx(method, spec, steps=1)
        # Shapes only: checks e.g. that momentum='reset' has a momentum buffer to act on.
        jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    except ValueError as error:
        raise ValueError(f"{prefix}: {error}") from None


# --- training -----------------------------------------------------------------------------


def _marker(workdir: Path, method: str, seed: int) -> Path:
    return workdir / "diverged" / f"{method}-seed{seed}.json"


def _chance_record(
    method: str, seed: int, steps: int, num_classes: int, step: int | None
) -> Record:
    chance = 1.0 / num_classes
    return {
        "method": method,
        "seed": seed,
        "test_accuracy": chance,
        "test_loss": math.nan,
        "train_accuracy": chance,
        "train_loss": math.nan,
        "steps": steps,
        "wall_time_s": 0.0,
        "diverged_at_step": step,
    }


def train_methods(
    config: ml_collections.ConfigDict,
    workdir: Path,
    dataset: Dataset,
    specs: Mapping[str, Mapping[str, Any]],
    *,
    devices: int,
    progress: bool,
) -> dict[str, list[Record]]:
    """Every seed of every method in ``specs`` (resumable), ``{method: [record per seed]}``.

    One :func:`run_suite` call trains them all (the model init and the evaluators compile
    once). A run whose loss turns non-finite is remembered in ``workdir/diverged/`` and
    scored at chance; to find it, a failed call is split by method, then by seed (finished
    runs only re-read their final checkpoint).
    """
    diverged: dict[tuple[str, int], int] = {}
    for method in specs:
        for seed in config.seeds:
            path = _marker(workdir, method, seed)
            if path.exists():
                diverged[(method, seed)] = json.loads(path.read_text())["step"]
    records: dict[tuple[str, int], Record] = {}

    def suite(methods: Sequence[str], seeds: Sequence[int]) -> None:
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.methods = {m: dict(specs[m]) for m in methods}
        cfg.method_names = tuple(methods)
        cfg.seeds = tuple(seeds)
        try:
            for r in run_suite(
                cfg,
                workdir,
                dataset=dataset,
                tx_factory=make_tx,
                devices=devices,
                progress=progress,
                eval_params=eval_weights,
            ):
                records[(r["method"], r["seed"])] = r
        except NonFiniteLossError as error:
            if len(methods) > 1:
                for m in methods:
                    suite([m], seeds)
            elif len(seeds) > 1:
                for seed in seeds:
                    suite(methods, [seed])
            else:
                diverged[(methods[0], seeds[0])] = error.step
                path = _marker(workdir, methods[0], seeds[0])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(
                    json.dumps({"method": methods[0], "seed": seeds[0], "step": error.step})
                )

    # Methods grouped by the seeds still to run (all of them, unless some diverged before).
    groups: dict[tuple[int, ...], list[str]] = {}
    for method in specs:
        todo = tuple(s for s in config.seeds if (method, s) not in diverged)
        if todo:
            groups.setdefault(todo, []).append(method)
    for seeds, methods in groups.items():
        suite(methods, seeds)
    for (method, seed), step in diverged.items():
        records[(method, seed)] = _chance_record(
            method, seed, config.steps, dataset.num_classes, step
        )
    return {m: [records[(m, s)] for s in config.seeds] for m in specs}


def sweep_name(method: str, learning_rate: float) -> str:
    """E.g. ``sgd@lr0_0316`` (config keys cannot hold dots)."""
    return f"{method}@lr" + f"{learning_rate:.3g}".replace(".", "_")


def use_compilation_cache(path: Path) -> None:
    """Turns on JAX's persistent compilation cache in ``path`` unless one is configured.

    The training loop compiles its step once per run; the seeds of a method (and its resumed
    runs) compile the very same program, which the cache then loads instead of recompiling
    (the quick config runs about 4x faster on 2 CPU cores; results are unchanged). JAX
    decides once per process, at its first compilation, whether to use the cache, so this
    is a no-op in a process that has already compiled something (e.g. in tests).
    """
    if jax.config.jax_compilation_cache_dir:  # type: ignore[attr-defined]
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# --- the experiment -----------------------------------------------------------------------


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    devices: int = 1,
    progress: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    workdir = Path(workdir)
    use_compilation_cache(workdir / "jax_cache")
    runs: list[Record] = []
    sweep_runs: list[Record] = []
    plots: list[str] = []
    sections: list[str] = []
    verdicts: list[reporting.Verdict] = []
    sweep = config.sweep
    loaded = {
        name: load_suite_data(dataset_config(config, name), devices) for name in config.datasets
    }
    if on_ready is not None:  # config and data are good; nothing is written before this
        on_ready()
    for name in config.datasets:
        sub = dataset_config(config, name)
        data = loaded[name]
        ddir = workdir / name
        main = train_methods(
            sub,
            ddir,
            data,
            {m: sub.methods[m].to_dict() for m in sub.method_names},
            devices=devices,
            progress=progress,
        )
        grids: dict[str, list[tuple[float, str]]] = {}
        extra_specs: dict[str, dict[str, Any]] = {}  # the sweep's runs other than the main ones
        reused: dict[str, str] = {}
        for method in swept_methods(config, name):
            spec = sub.methods[method].to_dict()
            grids[method] = []
            for factor in sweep.factors:
                lr = spec["learning_rate"] * factor
                label = sweep_name(method, lr)
                grids[method].append((lr, label))
                if factor == 1.0:
                    reused[label] = method
                else:
                    extra_specs[label] = {**spec, "learning_rate": lr}
        swept = train_methods(
            sub, ddir / "sweep", data, extra_specs, devices=devices, progress=progress
        )
        swept.update({label: main[method] for label, method in reused.items()})
        for points in grids.values():
            for _, label in points:
                sweep_runs += [{**r, "method": label, "dataset": name} for r in swept[label]]
        if not is_main_process():
            continue
        runs += [
            {**r, "method": f"{name}/{m}", "dataset": name} for m, rs in main.items() for r in rs
        ]
        summary = reporting.summarize(runs)
        for method, baseline in active_comparisons(config):
            verdicts.append(
                reporting.compare(
                    summary,
                    f"{name}/{method}",
                    f"{name}/{baseline}",
                    claim=f"{name}: {method} >= {baseline} in final test accuracy "
                    f"({describe(sub.methods[method])} vs {describe(sub.methods[baseline])})",
                )
            )
        plots.append(
            f"{name}/"
            + reporting.plot_curves(
                ddir,
                list(sub.method_names),
                title=f"{NAME}: {name} / {sub.model} (test accuracy of Lookahead: slow weights)",
            )
        )
        if grids:
            section, sweep_verdicts, plot = _sensitivity(config, name, grids, sweep_runs, workdir)
            sections.append(section)
            verdicts += sweep_verdicts
            plots.append(plot)
    if not is_main_process():
        return {"runs": runs}
    diverged = [(r["method"], r) for r in runs] + [
        (f"{r['dataset']}/{r['method']}", r) for r in sweep_runs
    ]  # main runs' methods already read dataset/method
    diverged = [(label, r) for label, r in diverged if r.get("diverged_at_step") is not None]
    notes = [
        "Lookahead methods are evaluated (test metrics, train_accuracy, train_loss in the "
        "table) on their slowest weights (optlab.slow_params); the inner optimizers on their "
        "params. The curves' training loss is the minibatch loss of each step, i.e. of the "
        "fast weights. Verdicts compare means over seeds; a difference under two standard "
        "errors is flagged as within seed noise.",
        "Reading the verdicts: all methods get the same number of steps, and each sync keeps "
        "a fraction 1 - alpha of the old slow weights, so where a Lookahead method ends with "
        "a higher train_loss than its baseline it has trained less, and its accuracy gap "
        "mixes speed with generalization (the papers compare at convergence: 200 epochs).",
    ]
    if diverged:
        notes.append(
            "Runs whose training loss became non-finite, scored at chance accuracy: "
            + ", ".join(
                f"{label} seed {r['seed']} (step {r['diverged_at_step']})" for label, r in diverged
            )
            + "."
        )
    budgets = []
    for name in config.datasets:
        sub = dataset_config(config, name)
        budgets.append(f"`{name}`: `{sub.model}`, {sub.steps} steps of batch {sub.batch_size}")
    description = (
        f"{'; '.join(budgets)}; seeds {list(config.seeds)}. Final metrics, mean ± std over "
        "seeds (rows: dataset/method)."
    )
    sweep_summary = reporting.summarize(sweep_runs) if sweep_runs else {}
    return reporting.write_results(
        workdir,
        experiment=NAME,
        claim=CLAIM,
        config=config.to_dict(),
        runs=runs,
        verdicts=verdicts,
        notes=notes,
        plots=plots,
        description=description,
        sections=sections,
        extra={"sweep_runs": sweep_runs, "sweep_summary": sweep_summary},
    )


def _sensitivity(
    config: ml_collections.ConfigDict,
    dataset: str,
    grids: Mapping[str, Sequence[tuple[float, str]]],
    sweep_runs: Sequence[Record],
    workdir: Path,
) -> tuple[str, list[reporting.Verdict], str]:
    """The sweep's Markdown section, its verdicts and its plot, for one dataset."""
    runs = [r for r in sweep_runs if r["dataset"] == dataset]
    summary = reporting.summarize(runs)
    factors = [f"lr x {f:g}" for f in config.sweep.factors]
    rows = {
        f"{m} (lr {config.methods[m].learning_rate:g})": [label for _, label in points]
        for m, points in grids.items()
    }
    spread = reporting.grid_spread(
        runs, {m: [label for _, label in points] for m, points in grids.items()}
    )
    keys = ("test_accuracy_range", "test_accuracy_grid_mean", "test_accuracy_grid_min")
    spread_summary = reporting.summarize(spread, metrics=keys)
    verdicts = [
        reporting.compare(
            spread_summary,
            method,
            baseline,
            metric="test_accuracy_range",
            higher_is_better=False,
            claim=f"{dataset}: {method} is no more sensitive to the learning rate than "
            f"{baseline} (spread of final test accuracy over lr x "
            f"{', '.join(f'{f:g}' for f in config.sweep.factors)}, per seed)",
        )
        for method, baseline in active_comparisons(config)
        if method in grids and baseline in grids
    ]
    plot = reporting.plot_grid(
        workdir,
        summary,
        {m: list(points) for m, points in grids.items()},
        filename=f"sensitivity_{dataset}.png",
        title=f"{NAME}: {dataset}, final test accuracy vs learning rate",
    )
    section = "\n".join(
        [
            f"## Learning-rate sensitivity: {dataset}",
            "",
            "Final test accuracy (%) at each learning rate, mean ± std over seeds:",
            "",
            reporting.markdown_grid(summary, rows, factors),
            "",
            "Per seed: spread (max - min), mean and worst final test accuracy over the "
            "learning rates; mean ± std over seeds (a smaller spread is a less sensitive "
            "method):",
            "",
            reporting.markdown_table(spread_summary, keys),
        ]
    )
    return section, verdicts, plot

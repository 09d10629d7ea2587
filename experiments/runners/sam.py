"""The `sam` experiment: do SAM-type optimizers find flatter minima and generalise better?

Per dataset (``config.datasets``, each with its model from ``config.models``) the runner
holds a validation split out of the training set, trains every (method, seed) with the
suite harness on the rest, and measures at the end, on the final weights:

* test accuracy (the whole test set) and validation accuracy (the held-out split);
* the top Hessian eigenvalue (power iteration, ``optlab.hessian_top_eigenvalue``) and the
  Hessian trace (Hutchinson, ``optlab.hessian_trace``) of the training loss in evaluation
  mode, on a fixed subset of ``sharpness.num_examples`` training examples, the same subset
  and the same random start for every method and seed.

Methods with a common ``tune_group`` (SAM's rho grid, average-direction SAM's sigma grid)
are reduced to one tuned method by mean validation accuracy; each tuned method is then
compared with SGD, and SA-SAM (which has no rho to tune) with the tuned SAM. Verdicts use
:func:`experiments.reporting.compare` (difference of seed means against twice its standard
error); for sharpness lower is better.

Outputs in the workdir: ``<dataset>/`` (metrics, checkpoints, training curves), and
``results.md``, ``results.json``, ``sharpness_vs_accuracy.png`` at the top.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import optlab
from experiments import reporting
from experiments.data import DATASET_NAMES, Dataset
from experiments.distributed import is_main_process
from experiments.errors import ConfigError
from experiments.models import make_model
from experiments.optimizers import make_optimizer
from experiments.registry import get_experiment
from experiments.suite import FinalMetrics, load_suite_data, run_suite, validate_suite
from experiments.train import make_evaluator

NAME = "sam"
CLAIM = get_experiment(NAME).claim

TRANSFORMS = ("none", "sam", "asam", "sa_sam", "average_direction_sam")
TABLE_METRICS = (
    "test_accuracy",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "val_accuracy",
    "train_accuracy",
    "train_loss",
)
SHARPNESS = "hessian_top_eigenvalue"


# --- methods ----------------------------------------------------------------------------


def make_tx(method: str, spec: Mapping[str, Any], steps: int) -> optax.GradientTransformation:
    """The optimizer of one method spec (see ``experiments/configs/sam.py``)."""
    del method
    transform = spec.get("transform", "none")
    if transform == "sa_sam":
        return optlab.sa_sam(spec["learning_rate"], **_sa_sam_options(spec))
    base = make_optimizer(spec, steps=steps)
    if transform == "none":
        return base
    if transform in ("sam", "asam"):
        return optlab.sam(
            base,
            rho=spec.get("rho", 0.5 if transform == "asam" else 0.05),
            adaptive=transform == "asam",
            adaptive_eps=spec.get("adaptive_eps", 0.01),
        )
    if transform == "average_direction_sam":
        return optlab.average_direction_sam(
            base, sigma=spec.get("sigma", 0.01), num_samples=spec.get("num_samples", 1)
        )
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}.")


def _sa_sam_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """SA-SAM's options from a spec; it has no weight decay (an L2 term belongs in the loss)."""
    return {"form": spec.get("form", "practical"), "rho_scale": spec.get("rho_scale", 1.0)}


def tune_groups(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
    """``{group: [methods]}`` of the methods run that carry a ``tune_group``."""
    groups: dict[str, list[str]] = {}
    for method in config.method_names:
        group = config.methods[method].get("tune_group", "")
        if group:
            groups.setdefault(group, []).append(method)
    return groups


# --- config -----------------------------------------------------------------------------


def task_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """One suite config per (dataset, model) pair of ``config.datasets``/``config.models``,
    with its own number of steps when ``config.task_steps`` gives one per dataset."""
    steps = tuple(config.task_steps) or (config.steps,) * len(config.datasets)
    tasks = []
    for dataset, model, n in zip(config.datasets, config.models, steps, strict=True):
        task = ml_collections.ConfigDict(config.to_dict())
        task.dataset, task.model, task.steps = dataset, model, n
        tasks.append(task)
    return tasks


def validate(config: ml_collections.ConfigDict) -> None:
    """Range checks; ``ValueError`` names the offending key."""
    validate_suite(config)
    if not config.datasets:
        raise ValueError("datasets must name at least one dataset, got ().")
    if len(config.datasets) != len(config.models):
        raise ValueError(
            f"models must give one model per dataset: datasets {tuple(config.datasets)} vs "
            f"models {tuple(config.models)}."
        )
    if config.task_steps and len(config.task_steps) != len(config.datasets):
        raise ValueError(
            f"task_steps must give one number of steps per dataset (or be empty: `steps` for "
            f"all): datasets {tuple(config.datasets)} vs task_steps {tuple(config.task_steps)}."
        )
    for name in config.datasets:
        if name not in DATASET_NAMES:
            raise ValueError(f"datasets: {name!r} is not one of {DATASET_NAMES}.")
    if len(set(config.datasets)) != len(config.datasets):
        raise ValueError(f"datasets must be distinct, got {tuple(config.datasets)}.")
    for task in task_configs(config):
        validate_suite(task)
    if not 0.0 < config.validation_fraction < 0.5:
        raise ValueError(
            f"validation_fraction must lie in (0, 0.5), got {config.validation_fraction!r}."
        )
    sharp = config.sharpness
    if sharp.num_examples < 1:
        raise ValueError(f"sharpness.num_examples must be >= 1, got {sharp.num_examples}.")
    if sharp.iters < 1:
        raise ValueError(f"sharpness.iters must be >= 1, got {sharp.iters}.")
    if sharp.trace_samples < 0:
        raise ValueError(
            f"sharpness.trace_samples must be >= 0 (0: no trace), got {sharp.trace_samples}."
        )
    if config.methods[config.method_names[0]].get("transform", "none") != "none":
        raise ValueError(
            f"method_names must start with the baseline (transform 'none'), got "
            f"{config.method_names[0]!r}."
        )
    for method in config.method_names:
        spec = config.methods[method]
        transform = spec.get("transform", "none")
        if transform not in TRANSFORMS:
            raise ValueError(
                f"methods.{method}.transform must be one of {TRANSFORMS}, got {transform!r}."
            )
        try:  # optlab validates its own arguments at construction time
            make_tx(method, spec, config.steps)
        except ValueError as error:
            raise ValueError(f"methods.{method}: {error}") from None


# --- data and measurements ----------------------------------------------------------------


def split_validation(
    dataset: Dataset, fraction: float, *, seed: int
) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """Holds ``fraction`` of the training set out (a pure function of ``seed``).

    Returns the dataset with the reduced training set, and the validation inputs and labels.
    """
    n = len(dataset.x_train)
    order = np.random.default_rng([seed, 0x5A11]).permutation(n)
    n_val = max(1, round(fraction * n))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    reduced = dataset._replace(x_train=dataset.x_train[train], y_train=dataset.y_train[train])
    return reduced, dataset.x_train[val], dataset.y_train[val]


def make_final_metrics(
    model: Any,
    dataset: Dataset,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    num_examples: int,
    iters: int,
    trace_samples: int,
) -> FinalMetrics:
    """The suite's ``final_metrics`` hook: validation accuracy and Hessian sharpness.

    The Hessian is that of the mean cross-entropy over the first ``num_examples`` training
    examples, in evaluation mode (BatchNorm running statistics, no dropout), w.r.t. the
    trainable parameters; the same examples and random start for every run.
    """
    val_eval = make_evaluator(model, x_val, y_val)
    n = min(num_examples, len(dataset.x_train))
    batch = {"x": jnp.asarray(dataset.x_train[:n]), "y": jnp.asarray(dataset.y_train[:n])}

    def loss(params, data):  # model state rides in the batch: one compiled function per task
        logits, _ = model.apply(params, data["model_state"], data["x"], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, data["y"]).mean()

    @jax.jit
    def sharpness(params, model_state):
        data = {**batch, "model_state": model_state}
        key = jax.random.key(0)
        out = {
            "hessian_top_eigenvalue": optlab.hessian_top_eigenvalue(
                loss, params, data, key=key, iters=iters
            )
        }
        if trace_samples:
            out["hessian_trace"] = optlab.hessian_trace(
                loss, params, data, key=jax.random.fold_in(key, 1), num_samples=trace_samples
            )
        return out

    def final_metrics(method: str, params: Any, model_state: Any, data: Dataset) -> dict:
        del method, data
        values = {k: float(v) for k, v in jax.device_get(sharpness(params, model_state)).items()}
        val = val_eval(params, model_state)
        return {**values, "val_accuracy": val["accuracy"], "val_loss": val["loss"]}

    return final_metrics


# --- the run ------------------------------------------------------------------------------


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    devices: int = 1,
    progress: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    validate(config)  # also when called directly, not through the CLI
    tasks = []
    for task in task_configs(config):
        full = load_suite_data(task, devices)
        dataset, x_val, y_val = split_validation(
            full, config.validation_fraction, seed=task.data_seed
        )
        if task.batch_size > len(dataset.x_train):
            raise ConfigError(
                f"batch_size must be in [1, {len(dataset.x_train)}] (the training set of "
                f"{task.dataset} without its validation split), got {task.batch_size}."
            )
        tasks.append((task, dataset, x_val, y_val))
    if on_ready is not None:  # config and data are good; nothing is written before this
        on_ready()
    results = []
    for task, dataset, x_val, y_val in tasks:
        model = make_model(task.model, num_classes=dataset.num_classes)
        hook = make_final_metrics(model, dataset, x_val, y_val, **config.sharpness.to_dict())
        runs = run_suite(
            task,
            Path(workdir) / task.dataset,
            dataset=dataset,
            tx_factory=make_tx,
            devices=devices,
            progress=progress,
            final_metrics=hook,
        )
        results.append((task, dataset, len(x_val), runs))
    if not is_main_process():
        return {"tasks": [r[3] for r in results]}
    return write_report(config, workdir, results, wall_time_s=time.perf_counter() - t0)


def select_tuned(summary: Mapping[str, Any], groups: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``{group: member}`` with the best mean validation accuracy (first on ties)."""
    return {
        group: max(members, key=lambda m: summary[m]["val_accuracy"]["mean"])
        for group, members in groups.items()
    }


def tuned_name(group: str) -> str:
    return f"{group}_tuned"


def reported_methods(config: ml_collections.ConfigDict, chosen: Mapping[str, str]) -> list[str]:
    """The baseline, each tuned group as one method, and every method outside a group."""
    grouped = {m for members in tune_groups(config).values() for m in members}
    return [
        config.method_names[0],
        *[tuned_name(g) for g in chosen],
        *[m for m in config.method_names[1:] if m not in grouped],
    ]


def task_verdicts(
    config: ml_collections.ConfigDict,
    summary: Mapping[str, Any],
    chosen: Mapping[str, str],
    prefix: str,
) -> list[reporting.Verdict]:
    """SGD vs each method (tuned groups as one), on accuracy and sharpness; SA-SAM vs SAM."""
    baseline, *shown = reported_methods(config, chosen)
    verdicts = []

    def both(method: str, reference: str, label: str, reference_label: str) -> None:
        verdicts.append(
            reporting.compare(
                summary,
                method,
                reference,
                claim=f"[{prefix}] {label} >= {reference_label} in test accuracy",
            )
        )
        verdicts.append(
            reporting.compare(
                summary,
                method,
                reference,
                metric=SHARPNESS,
                higher_is_better=False,
                scale=1.0,
                unit="",
                claim=f"[{prefix}] {label} finds a flatter minimum than {reference_label} "
                "(lower top Hessian eigenvalue)",
            )
        )

    for method in shown:
        both(method, baseline, method, baseline)
    sam_groups = [
        g for g, m in chosen.items() if config.methods[m].get("transform") in ("sam", "asam")
    ]
    for method in shown:
        if method in config.methods and config.methods[method].get("transform") == "sa_sam":
            for group in sam_groups:
                both(method, tuned_name(group), f"{method} (no rho to tune)", tuned_name(group))
    return verdicts


def write_report(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    results: Sequence[tuple[ml_collections.ConfigDict, Dataset, int, list[dict[str, Any]]]],
    *,
    wall_time_s: float,
) -> dict[str, Any]:
    """Writes ``results.md``, ``results.json`` and the plots; returns the JSON content."""
    workdir = Path(workdir)
    groups = tune_groups(config)
    sections, verdicts, task_json, plots, panels = [], [], {}, [], []
    for task, dataset, n_val, runs in results:
        summary = reporting.summarize(runs, TABLE_METRICS)
        chosen = select_tuned(summary, groups)
        for group, member in chosen.items():
            summary[tuned_name(group)] = summary[member]
        prefix = f"{task.dataset}/{task.model}"
        verdicts += task_verdicts(config, summary, chosen, prefix)
        curves = reporting.plot_curves(
            workdir / task.dataset,
            list(config.method_names),
            title=f"{NAME}: {task.dataset} / {task.model}",
        )
        plots.append(f"{task.dataset}/{curves}")
        selection = []
        for group, member in chosen.items():
            members = groups[group]
            val = ", ".join(f"{m} {100 * summary[m]['val_accuracy']['mean']:.2f}%" for m in members)
            best_test = max(members, key=lambda m: summary[m]["test_accuracy"]["mean"])
            selection.append(
                f"`{tuned_name(group)}` = `{member}`, chosen by mean validation accuracy "
                f"({val}). Best of the grid on the *test* set (optimistic, not used): "
                f"`{best_test}` {100 * summary[best_test]['test_accuracy']['mean']:.2f}%."
            )
        sections += [
            f"## {prefix}",
            "",
            f"{task.steps} steps per run; {len(dataset.x_train)} training examples ({n_val} "
            f"more held out for validation), {len(dataset.x_test)} test examples.",
            "",
            reporting.markdown_table(summary, TABLE_METRICS),
            "",
            *[f"- {s}" for s in selection],
            "",
        ]
        panels.append((prefix, {m: summary[m] for m in reported_methods(config, chosen)}))
        task_json[task.dataset] = {
            "model": task.model,
            "steps": task.steps,
            "num_train": len(dataset.x_train),
            "num_validation": n_val,
            "runs": runs,
            "summary": summary,
            "tuned": chosen,
        }
    plots.insert(0, plot_sharpness_vs_accuracy(workdir, panels))
    notes = report_notes(config, groups, wall_time_s)
    results_json = {
        "experiment": NAME,
        "claim": CLAIM,
        "config": config.to_dict(),
        "tasks": task_json,
        "verdicts": [v._asdict() for v in verdicts],
        "notes": notes,
        "wall_time_s": wall_time_s,
    }
    (workdir / "results.json").write_text(json.dumps(results_json, indent=2, default=float) + "\n")
    lines = [
        f"# {NAME}",
        "",
        f"**Claim checked.** {CLAIM}",
        "",
        f"Batch {config.batch_size}, seeds "
        f"{list(config.seeds)}; final metrics, mean ± std over seeds (accuracies in %). "
        f"Sharpness: `hessian_top_eigenvalue` ({config.sharpness.iters} power iterations) "
        f"and `hessian_trace` (Hutchinson, {config.sharpness.trace_samples} probes) of the "
        f"training loss in eval mode on {config.sharpness.num_examples} fixed training "
        "examples; lower is flatter.",
        "",
        *sections,
        *reporting.closing_sections(verdicts, notes, plots),
    ]
    (workdir / "results.md").write_text("\n".join(lines))
    return results_json


def gradients_per_step(spec: Mapping[str, Any]) -> int:
    """Forward/backward passes per step (the harness's first gradient included)."""
    transform = spec.get("transform", "none")
    if transform == "average_direction_sam":
        return 1 + spec.get("num_samples", 1)
    return {"none": 1, "sam": 2, "asam": 2, "sa_sam": 3}[transform]


def report_notes(
    config: ml_collections.ConfigDict, groups: Mapping[str, Sequence[str]], wall_time_s: float
) -> list[str]:
    costs = ", ".join(f"{m} {gradients_per_step(config.methods[m])}" for m in config.method_names)
    notes = [
        f"Equal steps, not equal compute: gradient evaluations per step: {costs}.",
        "Tuned groups: "
        + ("; ".join(f"{g}: {', '.join(ms)}" for g, ms in groups.items()) if groups else "none")
        + f". The choice uses a validation split ({config.validation_fraction:g} of the "
        "training set, held out from training for every method) and the same member for "
        "every seed; methods outside a group run untuned, with the values in the config.",
        *(
            [
                "SA-SAM sets its own step size (between its initial value and optlab's cap of "
                "10x it) and radius rho = sqrt(step size), so it does not run at the other "
                "methods' learning rate: part of any difference is the step size, not "
                "sharpness awareness (check the SGD learning rate before crediting SA-SAM)."
            ]
            if any(config.methods[m].get("transform") == "sa_sam" for m in config.method_names)
            else []
        ),
        "One device: the harness averages the first gradient over devices before the "
        "optimizer, so with --devices > 1 the SAM perturbation is global, not per device "
        "(the official SAM code perturbs per device, m-sharpness with m = per-device batch).",
        f"Wall time of this invocation: {wall_time_s:.0f} s (resumed runs only re-evaluate).",
    ]
    return notes


def plot_sharpness_vs_accuracy(
    workdir: Path, panels: Sequence[tuple[str, Mapping[str, Any]]]
) -> str:
    """Test accuracy against the top Hessian eigenvalue, mean ± std per method, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, summary) in zip(axes[0], panels, strict=True):
        for i, (method, stats) in enumerate(summary.items()):
            x, y = stats[SHARPNESS], stats["test_accuracy"]
            if not (math.isfinite(x["mean"]) and math.isfinite(y["mean"])):
                continue
            ax.errorbar(
                x["mean"],
                100 * y["mean"],
                xerr=x["std"],
                yerr=100 * y["std"],
                fmt="osD^vP*X"[i % 8],
                capsize=3,
                label=method,
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("top Hessian eigenvalue of the training loss (log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    filename = "sharpness_vs_accuracy.png"
    fig.savefig(workdir / filename, dpi=110)
    plt.close(fig)
    return filename

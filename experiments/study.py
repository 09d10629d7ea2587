"""One declarative study runner for every experiment.

A **study** declares what to train and what to conclude; :func:`run_study` owns how:

- **tasks** (:class:`Task`): dataset, model, budget (steps or epochs), batch size, the
  validation split, worker partitions, an L2 term in the loss;
- **methods** (:class:`Method`): a spec handed to the study's ``make_tx``, with **axes**
  (grids such as the learning rate, rho or sigma) of which some are **tuned** on the
  validation split and the others reported across (sensitivity);
- **seeds**: every (task, method, grid point) runs once per seed;
- **claims** (:class:`Claim`): method vs baseline on a metric (or, with a ``bound``, one
  method's metric against a fixed value), at the reported points or aggregated over an
  axis (``spread``, ``drop``, ``worst``, ``mean``, or ``sensitivity``: a smaller spread
  that only holds if the worst and mean values are not worse);
- **hooks**: ``make_tx``, ``eval_params`` (e.g. Lookahead's slow weights), ``evaluators``
  (in-training probes), ``worker_probes`` (in worker mode, probes of every worker's own
  weights, e.g. their consensus distance), ``final_metrics`` (e.g. the Hessian's top
  eigenvalue), ``make_plan`` (the trainer hook: worker partitions, task streams,
  batch-size schedules, client sampling), ``prepare_data`` (shifts and streams: e.g. the
  training arrays as blocks of permuted copies, one per task), ``make_loss``, ``notes``,
  ``grad_skip`` (steps whose gradient the optimizer ignores, e.g. PALSGD's pseudo-syncs,
  skip the forward/backward), ``history_metrics`` (per-run metrics from the logged curve,
  e.g. time to a target) and ``curve_x`` (more curve plots, against e.g. communication
  rounds or gradient evaluations).

:func:`run_study` trains every run, **vectorized**: the seeds and the float grid points of
one (task, method) train as one jitted program (:func:`experiments.train.vectorized.train_group`).
It resumes (finished groups are read back, an interrupted one continues from its
checkpoint), applies one **divergence policy** (a run whose training loss turns
non-finite is recorded with its step and scored at chance accuracy, NaN loss and NaN
for every other metric; it never stops the study), **selects** tuned axes by mean
validation accuracy (the test-set best is disclosed, not used), judges claims with paired
per-seed t-intervals (:mod:`experiments.stats`), and writes one ``results.json`` schema
(config, provenance, runs, summaries, selections, verdicts, notes; NaN as null), one
``results.md`` and the standard plots (curves, and metric vs axis per method).

Data flows one way: config -> study -> runs -> records -> summaries -> verdicts ->
results.md / results.json (the last three in :mod:`experiments.results`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments.data import DATASET_NAMES, Dataset, load_dataset
from experiments.data.partition import partition_dirichlet, partition_iid, partition_k_classes
from experiments.distributed import is_main_process
from experiments.errors import ConfigError
from experiments.models import LANGUAGE_MODELS, is_model_name, make_model, model_names
from experiments.train.losses import classification_loss, make_stacked_evaluator
from experiments.train.metrics import MetricsWriter, read_metrics
from experiments.train.plans import BatchPlan, EpochPlan, WorkerPlan
from experiments.train.step import LossFn, TrainState
from experiments.train.vectorized import StackedEvaluator, group_eval_weights, train_group

__all__ = [
    "AGGREGATES",
    "Claim",
    "Method",
    "Study",
    "Task",
    "TaskData",
    "TxContext",
    "claim_text",
    "claims_from_config",
    "describe",
    "methods_from_config",
    "point_label",
    "points",
    "run_study",
    "runner_functions",
    "study_config",
    "tasks_from_config",
]

PyTree = Any
Record = dict[str, Any]
AGGREGATES = ("spread", "drop", "worst", "mean", "sensitivity")
PARTITIONS = ("iid", "dirichlet", "k_classes")
TEXT_FIELDS = ("text_file", "text_context", "text_bytes")  # options of the "text" dataset
TASK_FIELDS = (
    "dataset",
    "model",
    "steps",
    "epochs",
    "batch_size",
    "validation_fraction",
    "workers",
    "partition",
    "partition_alpha",
    "partition_classes",
    "l2",
    "data_seed",
    "data_dir",
    *TEXT_FIELDS,
    "log_every",
    "eval_every",
    "checkpoint_every",
)


# --- declarations ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    """What every method of a study trains on.

    Attributes:
      name: the task's label (a workdir folder).
      dataset, model: names from :data:`experiments.data.DATASET_NAMES` and
        :func:`experiments.models.model_names`.
      steps / epochs: the budget; ``epochs > 0`` wins (unless the task sets only its
        own ``steps``) and counts full passes over the training split:
        ``epochs * (n_train // (batch_size * max(workers, 1)))`` steps.
      batch_size: examples per step (per worker in worker mode).
      validation_fraction: held out of the training set for selection (0: none).
      workers: 0 (one model per run) or W > 0 worker-local copies with partitions.
      partition: ``"iid"``, ``"dirichlet"`` (``partition_alpha``) or ``"k_classes"``
        (``partition_classes`` classes per worker).
      l2: an L2 term ``l2 / 2 * ||W||^2`` over the kernels (leaves of rank >= 2) added to
        the training loss, as the official SAM code does, so perturbations see it.
      text_file, text_context, text_bytes: options of the ``"text"`` dataset only (see
        :mod:`experiments.data.text`): a text file instead of the standard-library corpus
        (``""``), the context length in bytes and the byte budget (``0``: the loader's
        defaults, 64 and 1 MiB). Its validation split is the last contiguous block of the
        training windows, and only the ``"iid"`` partition applies.
    """

    name: str
    dataset: str
    model: str
    batch_size: int
    steps: int = 0
    epochs: int = 0
    validation_fraction: float = 0.15
    workers: int = 0
    partition: str = "iid"
    partition_alpha: float = 0.5
    partition_classes: int = 2
    l2: float = 0.0
    data_seed: int = 0
    data_dir: str = ""
    text_file: str = ""
    text_context: int = 0
    text_bytes: int = 0
    log_every: int = 25
    eval_every: int = 0
    checkpoint_every: int = 0


@dataclasses.dataclass(frozen=True)
class Method:
    """One method: a spec for ``make_tx`` and its grids.

    Attributes:
      name: the label in tables and the workdir.
      spec: ``make_tx``'s description of the method (optimizer, rates, options). A
        ``model`` entry trains this method with that model instead of the task's (an
        architecture compared as a method, e.g. wide vs deep MLPs).
      axes: ``{field: values}`` grids over spec fields; every combination is run. Float
        grids train vectorized in one program (their values reach ``make_tx`` traced).
      tune: the axes chosen on the validation split (by mean validation accuracy); the
        other axes are reported across, at the spec's own value by default.
      label: a longer description for ``results.md``.
    """

    name: str
    spec: Mapping[str, Any]
    axes: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    tune: tuple[str, ...] = ()
    label: str = ""


@dataclasses.dataclass(frozen=True)
class Claim:
    """ "``method`` beats ``baseline`` on ``metric``", per task or aggregated over an axis.

    Attributes:
      method, baseline: method names.
      metric: a record field (``test_accuracy``, ``hessian_top_eigenvalue``, ...).
      higher_is_better: the metric's direction.
      over: ``""`` (compare at the reported points, once per task), an axis name of both
        methods, or ``"task"`` (aggregate over ``tasks``, in that order).
      aggregate: over the axis, per seed: ``spread`` (max - min, lower is better),
        ``drop`` (first - last value), ``worst`` (min), ``mean``, or ``sensitivity``
        (spread lower, guarded by worst and mean not worse).
      tasks: the tasks it applies to (empty: all).
      text: the claim in words (default: built from the fields).
      bound: a one-sample claim: ``method``'s metric is above (``higher_is_better``) or
        below ``bound``, judged like a paired claim against a baseline equal to ``bound``
        on every seed (a one-sample t-interval); ``baseline`` is then ``""``.
    """

    method: str
    baseline: str
    metric: str = "test_accuracy"
    higher_is_better: bool = True
    over: str = ""
    aggregate: str = "mean"
    tasks: tuple[str, ...] = ()
    text: str = ""
    bound: float | None = None


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A task's data as the hooks see it: splits, class count, worker partitions."""

    task: Task
    dataset: Dataset  # x_train/y_train: the training split (validation held out)
    x_val: np.ndarray
    y_val: np.ndarray
    partitions: tuple[np.ndarray, ...]
    steps: int
    batch_size: int  # resolved: ``task.batch_size``, or the whole training split for 0


@dataclasses.dataclass(frozen=True)
class TxContext:
    """What ``make_tx`` may need beyond the spec."""

    task: Task
    steps: int
    axis_name: Any  # the worker axis (None: replicated); pass it on, do not hard-code it
    num_classes: int
    batch_size: int = 0  # resolved (``task.batch_size``, or the training split for 0)


TxFactory = Callable[[Mapping[str, Any], TxContext], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Study:
    """A whole experiment: declarations plus hooks (see the module docstring)."""

    name: str
    claim: str
    tasks: tuple[Task, ...]
    methods: tuple[Method, ...]
    seeds: tuple[int, ...]
    make_tx: TxFactory
    claims: tuple[Claim, ...] = ()
    eval_params: Callable[[Method], Callable[[TrainState], PyTree] | None] | None = None
    evaluators: Callable[[TaskData, Any], Mapping[str, StackedEvaluator]] | None = None
    worker_probes: Callable[[TaskData, Any], Mapping[str, StackedEvaluator]] | None = None
    final_metrics: Callable[[TaskData, Method, Any, PyTree, PyTree], Mapping[str, Any]] | None = (
        None
    )
    make_plan: Callable[[TaskData, Method], BatchPlan] | None = None
    make_loss: Callable[[Task, Any], LossFn] | None = None
    prepare_data: Callable[[TaskData], TaskData] | None = None
    notes: Callable[[Sequence[Record]], Sequence[str]] | Sequence[str] = ()
    table_metrics: tuple[str, ...] = ("test_accuracy", "val_accuracy", "train_loss")
    curve_metrics: tuple[str, ...] = ("train_loss", "test_accuracy")  # plotted against steps
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    worker_eval: str = "mean"
    # grad_skip(method) -> predicate of one worker's opt_state, or None (see train_group).
    grad_skip: Callable[[Method], Callable[[PyTree], Any] | None] | None = None
    # history_metrics(data, method, spec, histories) -> {name: [value per run]}, where
    # histories[r] is run r's logged records (metrics.jsonl, by step, the final one last).
    history_metrics: (
        Callable[[TaskData, Method, Mapping[str, Any], Sequence[Sequence[Record]]], Mapping] | None
    ) = None
    # {x label: fn(spec, records of one run) -> x of each record}: one more curve plot each.
    curve_x: Mapping[str, Callable[[Mapping[str, Any], Sequence[Record]], Sequence[float]]] = (
        dataclasses.field(default_factory=dict)
    )

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)

    def __post_init__(self) -> None:
        _validate_study(self)


# --- config <-> declarations ---------------------------------------------------------------


def study_config(**fields: Any) -> ml_collections.ConfigDict:
    """The shared fields of every study config, with defaults; experiments override.

    Top-level task fields (``model``, ``batch_size``, ``steps``, ``epochs``, ...) are
    defaults that each ``tasks.<name>`` entry may set for itself.
    """
    config = ml_collections.ConfigDict(
        {
            "seeds": (0, 1, 2, 3, 4),
            "data_dir": "",
            "data_seed": 0,
            "text_file": "",  # the "text" dataset's options (see Task)
            "text_context": 0,
            "text_bytes": 0,
            "model": "mlp",
            "batch_size": 64,
            "steps": 0,
            "epochs": 0,
            "validation_fraction": 0.15,
            "l2": 0.0,
            "log_every": 25,
            "eval_every": 0,
            "checkpoint_every": 0,
            "tasks": {},
            "task_names": (),  # the tasks to run (empty: all of them)
            "method_names": (),
            "methods": {},
            "claims": {},
        }
    )
    config.update(fields)
    with config.unlocked():
        for name in list(config.tasks):
            # Every task field is present (None: the top-level default), so that any of
            # them can be overridden per task: --config.tasks.digits.steps=20.
            entry = {k: None for k in TASK_FIELDS if k != "dataset"}
            entry.update(config.tasks[name].to_dict())
            config.tasks[name] = ml_collections.ConfigDict(entry)
    return config


def tasks_from_config(config: ml_collections.ConfigDict) -> tuple[Task, ...]:
    """The :class:`Task` of every entry of ``config.tasks`` named in ``config.task_names``
    (all when empty), in that order, with the shared defaults filled in."""
    names = tuple(config.get("task_names", ())) or tuple(config.tasks)
    for name in names:
        if name not in config.tasks:
            raise ValueError(
                f"task_names: {name!r} is not in tasks (known: {sorted(config.tasks)})."
            )
    tasks = []
    for name in names:
        entry = dict(config.tasks[name])
        unknown = sorted(set(entry) - set(TASK_FIELDS))
        if unknown:
            raise ValueError(
                f"tasks.{name}: unknown fields {unknown}; allowed: {list(TASK_FIELDS)}."
            )
        fields = {k: config[k] for k in TASK_FIELDS if k in config and k != "dataset"}
        own = {k: v for k, v in entry.items() if v is not None}
        fields.update(own)
        if "steps" in entry and entry["steps"] is not None and entry.get("epochs") is None:
            fields["epochs"] = 0  # a task that sets only its steps: steps, not the default epochs
        fields.setdefault("dataset", name)
        if fields["dataset"] != "text":  # top-level text options are defaults of text tasks
            for k in TEXT_FIELDS:
                if k not in own:
                    fields.pop(k, None)
        tasks.append(Task(name=name, **fields))
    unused = [k for k in TEXT_FIELDS if config.get(k)]
    if unused and not any(t.dataset == "text" for t in tasks):
        raise ValueError(
            f"{', '.join(unused)} set, but no task that runs uses the 'text' dataset (tasks: "
            f"{', '.join(t.name for t in tasks)}); select one with task_names, or unset them."
        )
    return tuple(tasks)


def methods_from_config(config: ml_collections.ConfigDict) -> tuple[Method, ...]:
    """The methods named in ``config.method_names`` (``axes``/``tune``/``label`` split off)."""
    methods = []
    for name in config.method_names:
        if name not in config.methods:
            raise ValueError(
                f"method_names: {name!r} is not in methods (known: {sorted(config.methods)})."
            )
        spec = dict(config.methods[name])
        axes = {k: tuple(v) for k, v in dict(spec.pop("axes", {}) or {}).items()}
        tune = tuple(spec.pop("tune", ()) or ())
        label = spec.pop("label", "")
        methods.append(Method(name, spec, axes, tune, label))
    return tuple(methods)


def claims_from_config(
    config: ml_collections.ConfigDict, methods: Sequence[Method]
) -> tuple[Claim, ...]:
    """``config.claims`` entries whose two methods both run (others are skipped)."""
    known = {m.name for m in methods}
    out = []
    for key, entry in config.claims.items():
        entry = dict(entry)
        if entry.get("bound") is not None:  # one-sample: no baseline method
            entry.setdefault("baseline", "")
            if entry["baseline"]:
                raise ValueError(f"claims.{key}: a claim with a bound takes no baseline.")
            if entry.get("method") not in config.methods:
                raise ValueError(
                    f"claims.{key}.method: {entry.get('method')!r} is not in methods "
                    f"(known: {sorted(config.methods)})."
                )
            if entry["method"] in known:
                entry["tasks"] = tuple(entry.get("tasks", ()))
                entry["bound"] = float(entry["bound"])
                out.append(Claim(**entry))
            continue
        entry.pop("bound", None)
        for field in ("method", "baseline"):
            if field not in entry:
                raise ValueError(f"claims.{key}.{field} is required.")
            if entry[field] not in config.methods:
                raise ValueError(
                    f"claims.{key}.{field}: {entry[field]!r} is not in methods "
                    f"(known: {sorted(config.methods)})."
                )
        if entry["method"] in known and entry["baseline"] in known:
            entry["tasks"] = tuple(entry.get("tasks", ()))
            out.append(Claim(**entry))
    return tuple(out)


def _validate_study(study: Study) -> None:
    """Every check that needs no data; ``ValueError`` names the field."""
    if not study.tasks:
        raise ValueError("tasks must hold at least one task, got none.")
    if not study.methods:
        raise ValueError("method_names must name at least one method, got ().")
    if not study.seeds:
        raise ValueError("seeds must name at least one seed, got ().")
    if any(not isinstance(s, int) or s < 0 for s in study.seeds):
        raise ValueError(f"seeds must be non-negative integers, got {study.seeds!r}.")
    if len(set(study.seeds)) != len(study.seeds):
        raise ValueError(f"seeds must not repeat, got {study.seeds!r}.")
    for t in study.tasks:
        where = f"tasks.{t.name}"
        if t.dataset not in DATASET_NAMES:
            raise ValueError(f"{where}.dataset must be one of {DATASET_NAMES}, got {t.dataset!r}.")
        if not is_model_name(t.model):
            raise ValueError(
                f"{where}.model must be one of {model_names()} or mlp_<width>x<depth>, "
                f"got {t.model!r}."
            )
        if (t.dataset == "text") != (t.model in LANGUAGE_MODELS):
            allowed = (
                f"one of {LANGUAGE_MODELS}"
                if t.dataset == "text"
                else f"a classifier, not one of {LANGUAGE_MODELS}"
            )
            raise ValueError(
                f"{where}.model must be {allowed} for the {t.dataset!r} dataset, got {t.model!r}."
            )
        if t.steps < 0 or t.epochs < 0 or (t.steps == 0 and t.epochs == 0):
            raise ValueError(
                f"{where}: set steps >= 1 or epochs >= 1, got steps={t.steps}, epochs={t.epochs}."
            )
        if t.batch_size < 0 or (t.batch_size == 0 and t.workers):
            raise ValueError(
                f"{where}.batch_size must be >= 1 (0: the whole training split, "
                f"without workers), got {t.batch_size}."
            )
        for field in ("log_every",):
            if getattr(t, field) < 1:
                raise ValueError(f"{where}.{field} must be >= 1, got {getattr(t, field)}.")
        for field in ("eval_every", "checkpoint_every"):
            value = getattr(t, field)
            if value < 0 or value % t.log_every:
                raise ValueError(
                    f"{where}.{field} must be a non-negative multiple of log_every "
                    f"({t.log_every}), got {value}."
                )
        if not 0.0 <= t.validation_fraction < 0.5:
            raise ValueError(
                f"{where}.validation_fraction must lie in [0, 0.5), got {t.validation_fraction}."
            )
        if t.workers < 0:
            raise ValueError(f"{where}.workers must be >= 0, got {t.workers}.")
        if t.partition not in PARTITIONS:
            raise ValueError(f"{where}.partition must be one of {PARTITIONS}, got {t.partition!r}.")
        if t.l2 < 0:
            raise ValueError(f"{where}.l2 must be >= 0, got {t.l2}.")
        for field in ("text_context", "text_bytes"):
            if getattr(t, field) < 0:
                raise ValueError(
                    f"{where}.{field} must be >= 0 (0: the default), got {getattr(t, field)}."
                )
        if t.dataset != "text":
            for field in TEXT_FIELDS:
                if getattr(t, field):
                    raise ValueError(
                        f"{where}.{field} applies to the 'text' dataset only; this task's "
                        f"dataset is {t.dataset!r} (set tasks.{t.name}.dataset=text, or "
                        f"unset {field})."
                    )
        elif t.workers and t.partition != "iid":
            raise ValueError(
                f"{where}.partition must be 'iid' for the 'text' dataset (its labels are "
                f"next bytes, not classes), got {t.partition!r}."
            )
    names = [m.name for m in study.methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method_names must not repeat, got {names}.")
    for m in study.methods:
        if m.spec.get("model") is not None and not is_model_name(m.spec["model"]):
            raise ValueError(
                f"methods.{m.name}.model must be one of {model_names()} or "
                f"mlp_<width>x<depth>, got {m.spec['model']!r}."
            )
        for axis, values in m.axes.items():
            if not values:
                raise ValueError(f"methods.{m.name}.axes.{axis} must hold at least one value.")
            if len(set(values)) != len(values):
                raise ValueError(f"methods.{m.name}.axes.{axis} repeats a value: {values}.")
            if axis not in m.tune and m.spec.get(axis) not in values:
                raise ValueError(
                    f"methods.{m.name}.axes.{axis} must contain the method's own "
                    f"{axis} ({m.spec.get(axis)!r}), the reported point; got {values}."
                )
        for axis in m.tune:
            if axis not in m.axes:
                raise ValueError(f"methods.{m.name}.tune: {axis!r} is not one of its axes.")
        if m.tune and any(t.validation_fraction == 0 for t in study.tasks):
            raise ValueError(
                f"methods.{m.name} tunes {list(m.tune)} on a validation split, but a task "
                "has validation_fraction 0."
            )
    for c in study.claims:
        if c.aggregate not in AGGREGATES:
            raise ValueError(
                f"claim {c.method} vs {c.baseline}: aggregate must be one of {AGGREGATES}."
            )
        for name in c.tasks:
            if name not in {task.name for task in study.tasks}:
                raise ValueError(f"claim {c.method} vs {c.baseline}: unknown task {name!r}.")
        if (c.bound is None) == (c.baseline == ""):
            raise ValueError(
                f"claim {c.method} vs {c.baseline!r}: give a baseline method or a bound, not both."
            )
        if c.over and c.over != "task":
            for name in (c.method, c.baseline) if c.bound is None else (c.method,):
                if c.over not in study.method(name).axes:
                    raise ValueError(
                        f"claim {c.method} vs {c.baseline}: {name!r} has no axis {c.over!r}."
                    )


# --- runs and groups -------------------------------------------------------------------------


def _is_float_axis(values: Sequence[Any]) -> bool:
    return all(isinstance(v, float) and not isinstance(v, bool) for v in values)


def points(method: Method) -> list[dict[str, Any]]:
    """Every grid point of a method (``[{}]`` when it has no axes)."""
    names = list(method.axes)
    return [
        dict(zip(names, combo, strict=True)) for combo in itertools.product(*method.axes.values())
    ]


def point_label(point: Mapping[str, Any]) -> str:
    """E.g. ``"learning_rate=0.1,rho=0.05"``; ``""`` for the default point."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def _groups(method: Method) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``[(static point, [traced points])]``: non-float axes split groups, float ones vectorize."""
    static = {k: v for k, v in method.axes.items() if not _is_float_axis(v)}
    traced = {k: v for k, v in method.axes.items() if _is_float_axis(v)}
    static_points = [dict(zip(static, c, strict=True)) for c in itertools.product(*static.values())]
    traced_points = [dict(zip(traced, c, strict=True)) for c in itertools.product(*traced.values())]
    return [(s, traced_points) for s in static_points]


def num_runs(study: Study) -> int:
    return len(study.tasks) * sum(len(points(m)) for m in study.methods) * len(study.seeds)


def claim_text(c: Claim) -> str:
    if c.text:
        return c.text
    direction = "higher" if c.higher_is_better else "lower"
    over = f", {c.aggregate} over {c.over}" if c.over else ""
    if c.bound is not None:
        side = "above" if c.higher_is_better else "below"
        return f"{c.method}: {c.metric}{over} {side} {c.bound:g}"
    return f"{c.method} vs {c.baseline}: {direction} {c.metric}{over}"


def describe(study: Study) -> str:
    """The plan: tasks, methods with their grids, claims, and the number of runs."""
    lines = [f"study {study.name}: {num_runs(study)} runs ({len(study.seeds)} seeds each)"]
    for t in study.tasks:
        budget = f"{t.epochs} epochs" if t.epochs else f"{t.steps} steps"
        batch = t.batch_size or "all"
        workers = f", {t.workers} workers ({t.partition})" if t.workers else ""
        lines.append(
            f"  task {t.name}: {t.dataset} / {t.model}, {budget} of batch {batch}"
            f"{workers}, validation {t.validation_fraction:g}"
        )
    for m in study.methods:
        grid = "; ".join(
            f"{k} in {list(v)}" + (" (tuned)" if k in m.tune else "") for k, v in m.axes.items()
        )
        lines.append(f"  method {m.name}: {len(points(m))} point(s){': ' + grid if grid else ''}")
    for c in study.claims:
        lines.append(f"  claim: {claim_text(c)}")
    return "\n".join(lines)


# --- data ------------------------------------------------------------------------------------


def _dataset_options(task: Task) -> dict[str, Any]:
    """The loader's keyword options a task sets (the defaults are the loader's own)."""
    if task.dataset != "text":
        return {}
    options = {"text_file": task.text_file, "context": task.text_context}
    options["max_bytes"] = task.text_bytes
    return {k: v for k, v in options.items() if v}


def _load(task: Task, devices: int, cache: dict) -> TaskData:
    options = _dataset_options(task)
    key = (task.dataset, task.data_seed, task.data_dir, tuple(sorted(options.items())))
    if key not in cache:
        cache[key] = load_dataset(
            task.dataset, seed=task.data_seed, data_dir=task.data_dir or None, **options
        )
    full: Dataset = cache[key]
    n = len(full.x_train)
    n_val = round(task.validation_fraction * n)
    if full.y_train.ndim > 1:
        # Windows of one text, in order: the validation split is the last contiguous block,
        # so it shares no text with the training windows (a random split would interleave).
        order = np.arange(n)[::-1]
    else:
        order = np.random.default_rng([task.data_seed, 0x5A11]).permutation(n)
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    dataset = full._replace(x_train=full.x_train[train], y_train=full.y_train[train])
    partitions: tuple[np.ndarray, ...] = ()
    batch_size = task.batch_size or len(train)  # 0: full batch
    per_step = batch_size
    if task.workers:
        rng = np.random.default_rng([task.data_seed, 0xC11E])
        labels = dataset.y_train
        if task.partition == "iid":  # only the number of examples matters
            parts = partition_iid(np.arange(len(labels)), task.workers, rng=rng)
        elif task.partition == "dirichlet":
            parts = partition_dirichlet(labels, task.workers, task.partition_alpha, rng=rng)
        else:
            parts = partition_k_classes(labels, task.workers, task.partition_classes, rng=rng)
        partitions = tuple(parts)
        per_step = task.batch_size * task.workers
        smallest = min(len(p) for p in parts)
        if task.batch_size > smallest:
            raise ConfigError(
                f"tasks.{task.name}.batch_size ({task.batch_size}) exceeds the smallest worker "
                f"partition ({smallest} examples)."
            )
    elif not 1 <= batch_size <= len(train):
        raise ConfigError(
            f"tasks.{task.name}.batch_size must be in [1, {len(train)}] (the training split; "
            f"0 for all of it), got {task.batch_size}."
        )
    if not task.workers and batch_size % devices:
        raise ConfigError(
            f"tasks.{task.name}.batch_size ({batch_size}) must be divisible by devices ({devices})."
        )
    steps = task.steps
    if task.epochs:
        steps = task.epochs * max(len(train) // per_step, 1)
    return TaskData(
        task, dataset, full.x_train[val], full.y_train[val], partitions, steps, batch_size
    )


def _l2_loss(loss_fn: LossFn, l2: float) -> LossFn:
    """``loss + l2 / 2 * sum ||W||^2`` over the kernels (rank >= 2), as the official SAM code."""
    if not l2:
        return loss_fn

    def with_l2(params, model_state, batch, rng):
        loss, aux = loss_fn(params, model_state, batch, rng)
        penalty = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params) if p.ndim > 1)
        return loss + 0.5 * l2 * penalty, aux

    return with_l2


# --- running ---------------------------------------------------------------------------------


def _strict(value: Any) -> Any:
    """JSON without NaN/inf (as null), numpy scalars as Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, content: Any) -> None:
    """Strict JSON, written atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_strict(content), indent=2) + "\n")
    os.replace(tmp, path)


def _load_records(path: Path) -> list[Record]:
    records = json.loads(path.read_text())
    return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in records]


class _Progress:
    """One tqdm bar for the whole study on a terminal; one plain line per group otherwise."""

    def __init__(self, total: int, enabled: bool, name: str):
        self.enabled = enabled
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=name, unit="step", dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60])
        elif is_main_process():
            print(text, file=sys.stderr, flush=True)

    def run_line(self, record: Record) -> None:
        """Off a terminal: one plain line per finished run."""
        if self.bar is not None or not is_main_process():
            return
        label = point_label(record["point"])
        step = record["diverged_at_step"]
        status = f"diverged at step {step}" if isinstance(step, int) else "finished"
        print(
            f"  {record['task']}/{record['method']}{' ' + label if label else ''} seed "
            f"{record['seed']}: {status}, test accuracy {100 * record['test_accuracy']:.2f} %",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_study(
    study: Study,
    workdir: str | os.PathLike,
    *,
    devices: int = 1,
    progress: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Trains every run of ``study`` (resumably) and writes its results; returns results.json.

    Args:
      study: the declarations and hooks.
      workdir: everything goes here (see the module docstring of :mod:`experiments.study`).
      devices: data-parallel (or worker-sharded) devices.
      progress: a tqdm bar (else one line per trained group on stderr).
      on_ready: called once every task's data has loaded, before any training or writing
        (the CLI writes ``config.json`` there).
    """
    from experiments.provenance import collect

    workdir = Path(workdir)
    started = time.time()
    provenance = collect(devices)
    cache: dict = {}
    data = {t.name: _load(t, devices, cache) for t in study.tasks}
    if study.prepare_data is not None:  # e.g. a stream of shifted tasks, built once
        data = {name: study.prepare_data(d) for name, d in data.items()}
    if on_ready is not None:
        on_ready()
    total_steps = sum(
        data[t.name].steps * len(points(m)) * len(study.seeds)
        for t in study.tasks
        for m in study.methods
    )
    bar = _Progress(total_steps, progress and is_main_process(), study.name)
    records: list[Record] = []
    timing = {"train_s": 0.0, "groups": 0, "trained_steps": 0}
    try:
        for task in study.tasks:
            records += _run_task(study, data[task.name], workdir, devices, bar, timing)
    finally:
        bar.close()
    wall = time.time() - started
    if not is_main_process():
        return {"runs": records}
    provenance = {**provenance, "wall_time_s": wall, **{f"{k}": v for k, v in timing.items()}}
    from experiments.results import write_results

    return write_results(study, workdir, records, provenance, data)


def _model_parts(study: Study, data: TaskData, model_name: str) -> tuple:
    """``(loss_fn, init_fn, evaluate, final_evaluate, evaluate_workers)`` of one model on one
    task's data (``evaluate_workers`` is None without worker probes)."""
    task = data.task
    model = make_model(model_name, num_classes=data.dataset.num_classes)
    loss_fn = (study.make_loss or (lambda t, m: classification_loss(m)))(task, model)
    loss_fn = _l2_loss(loss_fn, task.l2)
    x_example = jnp.asarray(data.dataset.x_train[:1])
    init_fn = jax.jit(lambda key: model.init(key, x_example))  # one compile per task
    evaluators: dict[str, StackedEvaluator] = {
        "test": make_stacked_evaluator(model, data.dataset.x_test, data.dataset.y_test)
    }
    if len(data.x_val):
        evaluators["val"] = make_stacked_evaluator(model, data.x_val, data.y_val)
    if study.evaluators is not None:
        evaluators.update(study.evaluators(data, model))
    train_eval = make_stacked_evaluator(model, data.dataset.x_train, data.dataset.y_train)

    @jax.jit
    def evaluate(params, model_state):  # one compile per task (and group size)
        out = {}
        for name, fn in evaluators.items():
            out.update({f"{name}_{k}": v for k, v in fn(params, model_state).items()})
        return out

    probes = study.worker_probes(data, model) if study.worker_probes and task.workers else {}

    @jax.jit
    def evaluate_workers(params, model_state):  # [R, W, ...]: every worker's own weights
        out = {}
        for name, fn in probes.items():
            out.update({f"{name}_{k}": v for k, v in fn(params, model_state).items()})
        return out

    @jax.jit
    def final_evaluate(params, model_state):
        return {f"train_{k}": v for k, v in train_eval(params, model_state).items()}

    return loss_fn, init_fn, evaluate, final_evaluate, evaluate_workers if probes else None


def _run_task(
    study: Study, data: TaskData, workdir: Path, devices: int, bar: _Progress, timing: dict
) -> list[Record]:
    task = data.task
    parts: dict[str, tuple] = {}  # per model name: one compile each, shared by its methods

    def model_parts(name: str) -> tuple:
        if name not in parts:
            parts[name] = _model_parts(study, data, name)
        return parts[name]

    chance = 1.0 / data.dataset.num_classes
    out: list[Record] = []
    for method in study.methods:
        for static, traced in _groups(method):
            group_dir = workdir / task.name / method.name / (point_label(static) or "default")
            done = group_dir / "records.json"
            runs = [(seed, p) for p in traced for seed in study.seeds]
            if done.exists():
                out += _load_records(done)
                bar.update(data.steps * len(runs))
                continue
            hparams = {k: [float(p[k]) for _, p in runs] for k in traced[0]}
            spec = {**method.spec, **static}
            loss_fn, init_fn, evaluate, final_evaluate, evaluate_workers = model_parts(
                spec.get("model") or task.model
            )

            def make_tx(hp, axis_name, spec=spec):
                ctx = TxContext(
                    task, data.steps, axis_name, data.dataset.num_classes, data.batch_size
                )
                return study.make_tx({**spec, **hp}, ctx)

            plan = (
                study.make_plan(data, method)
                if study.make_plan is not None
                else (
                    WorkerPlan(data.partitions, task.batch_size)
                    if task.workers
                    else EpochPlan(len(data.dataset.x_train), data.batch_size)
                )
            )
            tags = [
                {
                    "task": task.name,
                    "method": method.name,
                    "point": point_label({**static, **p}),
                    "seed": seed,
                }
                for seed, p in runs
            ]
            writers = [MetricsWriter(workdir / task.name / "metrics.jsonl", **t) for t in tags]
            eval_params = study.eval_params(method) if study.eval_params else None
            bar.line(
                f"{task.name}/{method.name} {point_label(static)}: {len(runs)} runs as one program"
            )
            t0 = time.perf_counter()
            result = train_group(
                loss_fn=loss_fn,
                make_tx=make_tx,
                init_fn=init_fn,
                x=data.dataset.x_train,
                y=data.dataset.y_train,
                plan=plan,
                seeds=[seed for seed, _ in runs],
                hparams=hparams,
                steps=data.steps,
                run_dir=str(group_dir),
                evaluate=evaluate,
                final_evaluate=final_evaluate,
                eval_params=eval_params,
                worker_eval=study.worker_eval,
                evaluate_workers=evaluate_workers,
                log_every=task.log_every,
                eval_every=task.eval_every,
                checkpoint_every=task.checkpoint_every,
                devices=devices,
                metrics=writers if is_main_process() else None,
                on_progress=bar.update,
                grad_skip=study.grad_skip(method) if study.grad_skip else None,
            )
            timing["train_s"] += result.train_time_s
            timing["groups"] += 1
            timing["trained_steps"] += (data.steps - result.start_step) * len(runs)
            finals = dict(result.final)
            if study.final_metrics is not None:
                weights, model_state = group_eval_weights(
                    result.state, eval_params, task.workers, study.worker_eval
                )
                extra = study.final_metrics(data, method, spec, weights, model_state)
                finals.update({k: np.asarray(v, np.float64) for k, v in extra.items()})
            if study.history_metrics is not None and is_main_process():
                path = workdir / task.name / "metrics.jsonl"
                histories = [read_metrics(path, **t) for t in tags]
                extra = study.history_metrics(data, method, spec, histories)
                finals.update({k: np.asarray(v, np.float64) for k, v in extra.items()})
            group_records = []
            for r, (seed, p) in enumerate(runs):
                record: Record = {
                    "task": task.name,
                    "method": method.name,
                    "point": {**static, **p},
                    "seed": seed,
                    "steps": data.steps,
                    "diverged_at_step": int(result.diverged_at[r]),
                    "wall_time_s": (time.perf_counter() - t0) / len(runs),
                }
                for key, values in finals.items():
                    record[key] = float(values[r])
                if result.diverged_at[r] >= 0:  # the divergence policy (see module docstring)
                    for key in finals:
                        record[key] = chance if key.endswith("accuracy") else math.nan
                else:
                    record["diverged_at_step"] = None
                group_records.append(record)
            if is_main_process():
                _write_json(done, group_records)
            for record in group_records:
                bar.run_line(record)
            out += group_records
    return out


def runner_functions(
    build: Callable[..., Study],
    *,
    takes_workdir: bool = False,
) -> tuple[Callable[..., None], Callable[..., str], Callable[..., dict[str, Any]]]:
    """A runner's ``validate(config)``, ``plan(config)`` and ``run(config, workdir, ...)``.

    Every runner is ``build_study(config) -> Study`` plus these three (what the CLI calls).
    With ``takes_workdir``, ``run`` builds with ``build_study(config, workdir)`` (runners
    whose hooks write extra files there); ``validate`` and ``plan`` build without one.
    """

    def validate(config: ml_collections.ConfigDict) -> None:
        build(config)

    def plan(config: ml_collections.ConfigDict) -> str:
        return describe(build(config))

    def run(
        config: ml_collections.ConfigDict,
        workdir: str | os.PathLike,
        *,
        devices: int = 1,
        progress: bool = True,
        on_ready: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        study = build(config, workdir) if takes_workdir else build(config)
        return run_study(study, workdir, devices=devices, progress=progress, on_ready=on_ready)

    return validate, plan, run

"""The `local_sgd` experiment: communication-efficient data parallelism on simulated workers.

W workers (8 by default) each hold their own params and optimizer state and train on their
own shard of the training split (iid partitions, the same for every method). The methods:

- ``dp``: synchronous data parallelism, ``optlab.mean_gradients`` then the inner optimizer
  (one all-reduce of the gradient per step);
- ``local_sgd``: ``optlab.local_sgd`` (params averaged every H steps, Stich 2019);
- ``post_local_sgd``: the same after ``start_fraction`` of the steps of synchronous
  averaging (Lin et al. 2020);
- ``diloco``: ``optlab.diloco`` (Nesterov outer step on the mean displacement every H);
- ``palsgd``: ``optlab.palsgd`` (DiLoCo plus pseudo-synchronisation steps, Naganuma et
  al. 2025), with the trainer skipping the forward/backward pass on pseudo-sync steps.

Footing: the same inner optimizer (an ``experiments.optimizers`` spec; PALSGD gets its
direction without the rate and applies the same schedule itself), data, seeds, budget
(steps) and L2 term for every method; each method's inner learning rate is tuned on the
validation split over the same number of values (so every group trains the same number of
runs and the measured step times compare).

Measured per run, from the logged curve (``history_metrics``):

- ``comm_rounds``: steps with an all-reduce (params, gradients or pseudo-gradients), from
  the methods' definitions (the compiled programs are checked by ``python -m experiments
  bench``: the sync branch is the only one with collectives);
- ``grad_evals``: forward/backward passes per worker the method needs (PALSGD: the
  gradient steps; counted on device); ``grad_evals_run`` what this program computed;
- ``model_time``: the cost model ``grad_evals + comm_cost * comm_rounds``, in units of one
  worker's forward/backward (``comm_cost`` in the config: what one all-reduce costs);
- ``measured_time_s``: the measured seconds of the compiled training chunks of the group
  (every run of a method trains together, the first window's compile replaced by the
  median window), i.e. the wall time of this simulation: on one device the "network" is
  memory, so it shows the compute saved by skipped gradients, not the bandwidth saved;
- ``*_to_target``: the same at the first evaluation whose validation accuracy reaches
  ``target_val_accuracy`` (NaN if never: left out of paired comparisons and counted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import optax

import optlab
from experiments import study as st
from experiments.optimizers import make_optimizer, make_schedule, validate_spec
from experiments.registry import get_experiment

NAME = "local_sgd"
CLAIM = get_experiment(NAME).claim
ALGORITHMS = ("dp", "local_sgd", "diloco", "palsgd")
DIRECTIONS = ("sgd", "momentum", "nesterov", "adam")
CURVE_LABELS = {
    "comm_rounds": "communication rounds",
    "grad_evals": "gradient evaluations per worker",
    "measured_time_s": "measured training time (s)",
}


def _direction(spec: Mapping[str, Any]) -> optax.GradientTransformation:
    """The inner optimizer's direction without its rate (for PALSGD, which applies it)."""
    name = spec["optimizer"]
    if name == "sgd":
        return optax.identity()
    if name in ("momentum", "nesterov"):
        return optax.trace(spec.get("momentum", 0.9), nesterov=name == "nesterov")
    if name == "adam":
        return optax.scale_by_adam(b1=spec.get("b1", 0.9), b2=spec.get("b2", 0.999))
    raise ValueError(f"optimizer must be one of {DIRECTIONS} for palsgd, got {name!r}.")


def _outer(spec: Mapping[str, Any]) -> optax.GradientTransformation:
    return optax.sgd(
        spec.get("outer_learning_rate", 0.7),
        momentum=spec.get("outer_momentum", 0.9),
        nesterov=True,
    )


def start_step(spec: Mapping[str, Any], steps: int) -> int:
    """Synchronous steps before the local phase (post-local SGD, PALSGD's warm-up)."""
    return round(spec.get("start_fraction", 0.0) * steps)


def make_tx(spec: Mapping[str, Any], ctx: st.TxContext) -> optax.GradientTransformation:
    """The optimizer of one method spec (see ``experiments/configs/local_sgd.py``)."""
    algorithm = spec["algorithm"]
    axis = ctx.axis_name
    if axis is None:
        raise ValueError(f"{algorithm} needs worker mode: set tasks.<t>.workers >= 1.")
    inner = make_optimizer(spec, steps=ctx.steps)
    h = spec.get("sync_period", 1)
    if algorithm == "dp":
        return optax.chain(optlab.mean_gradients(axis), inner)
    if algorithm == "local_sgd":
        return optlab.local_sgd(inner, h, axis, start_step=start_step(spec, ctx.steps))
    if algorithm == "diloco":
        return optlab.diloco(inner, _outer(spec), h, axis)
    if algorithm == "palsgd":
        lr = make_schedule(
            spec["learning_rate"],
            schedule=spec.get("schedule", "constant"),
            steps=ctx.steps,
            warmup_steps=spec.get("warmup_steps", 0),
        )
        return optlab.palsgd(
            _direction(spec),
            _outer(spec),
            h,
            axis,
            learning_rate=lr,
            prob=spec.get("prob", 0.2),
            eta=spec.get("eta", 0.5),
            warmup_steps=start_step(spec, ctx.steps),
            shared_coin=spec.get("shared_coin", True),
            seed=spec.get("coin_seed", 0),
        )
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}.")


def comm_rounds(spec: Mapping[str, Any], step: int, steps: int) -> int:
    """Steps with an all-reduce among the first ``step`` (by each method's definition)."""
    algorithm = spec["algorithm"]
    if algorithm == "dp":
        return step
    start = start_step(spec, steps) if algorithm in ("local_sgd", "palsgd") else 0
    h = spec.get("sync_period", 1)
    return min(step, start) + max(step - start, 0) // h


def curve(spec: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], steps: int, comm_cost: float):
    """Cumulative ``step, grad_evals, grad_evals_run, comm_rounds, model_time,
    measured_time_s`` at every record of one run (records by step, a final one last)."""
    step = np.array([r["step"] for r in rows], np.float64)
    live = [i for i, r in enumerate(rows) if not r.get("final")]
    length = np.diff(np.concatenate([[0.0], step[live]]))
    out = {"step": step}
    for key in ("grad_evals", "grad_evals_run"):
        per_step = np.array([rows[i].get(f"train_{key}", 1.0) for i in live], np.float64)
        out[key] = _spread(rows, live, np.cumsum(per_step * length))
    train = np.array([rows[i].get("train_time_s", np.nan) for i in live], np.float64)
    window = np.diff(np.concatenate([[0.0], train]))
    if len(window) > 1:  # the first window holds the compile: the median window instead
        window[0] = np.median(window[1:]) * length[0] / max(np.median(length[1:]), 1.0)
    out["measured_time_s"] = _spread(rows, live, np.cumsum(window))
    out["comm_rounds"] = np.array([comm_rounds(spec, int(s), steps) for s in step], np.float64)
    out["model_time"] = out["grad_evals"] + comm_cost * out["comm_rounds"]
    return out


def _spread(rows, live, values):
    """Values at the live records, carried forward to the final record(s)."""
    out = np.full(len(rows), np.nan)
    out[live] = values
    for i in range(len(rows)):
        if np.isnan(out[i]) and i:
            out[i] = out[i - 1]
    return out


def history_metrics(config: ml_collections.ConfigDict):
    """The ``history_metrics`` hook: totals and times to the target validation accuracy."""
    comm_cost = config.cost.comm_cost
    keys = ("grad_evals", "grad_evals_run", "comm_rounds", "model_time", "measured_time_s")

    def hook(data: st.TaskData, method, spec, histories):
        del method
        target = task_target(config, data.task.name)
        out: dict[str, list[float]] = {k: [] for k in keys}
        out.update({f"{k}_to_target": [] for k in keys})
        for rows in histories:
            c = curve(spec, rows, data.steps, comm_cost)
            for k in keys:
                out[k].append(float(c[k][-1]) if len(rows) else np.nan)
            hit = [
                i for i, r in enumerate(rows) if r.get("val_accuracy", -1.0) >= target
            ]  # evaluations are logged with the window that ends at them
            for k in keys:
                out[f"{k}_to_target"].append(float(c[k][hit[0]]) if hit else np.nan)
        return out

    return hook


def task_target(config: ml_collections.ConfigDict, task: str) -> float:
    """The validation accuracy the times to target are measured at, for ``task``:
    ``cost.task_targets[task]`` if set (e.g. per-token accuracy for the language model),
    else ``cost.target_val_accuracy``."""
    targets = config.cost.get("task_targets") or {}
    return float(targets.get(task, config.cost.target_val_accuracy))


def _curve_x(config: ml_collections.ConfigDict, key: str):
    def x_of(spec, rows):
        steps = max((r["step"] for r in rows), default=0)
        return curve(spec, rows, steps, config.cost.comm_cost)[key]

    return x_of


def _validate(method: st.Method, task: st.Task) -> None:
    spec = method.spec
    if spec.get("algorithm") not in ALGORITHMS:
        raise ValueError(
            f"methods.{method.name}.algorithm must be one of {ALGORITHMS}, "
            f"got {spec.get('algorithm')!r}."
        )
    validate_spec(method.name, spec)
    fraction = spec.get("start_fraction", 0.0)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(
            f"methods.{method.name}.start_fraction must lie in [0, 1), got {fraction}."
        )
    if not task.workers:
        raise ValueError(f"tasks.{task.name}.workers must be >= 1 (worker mode), got 0.")
    try:  # optlab validates its own arguments at construction time
        for point in st.points(method):
            make_tx({**spec, **point}, st.TxContext(task, 100, "workers", 10))
    except (ValueError, KeyError) as error:
        raise ValueError(f"methods.{method.name}: {error}") from None


def build_study(config: ml_collections.ConfigDict) -> st.Study:
    tasks = st.tasks_from_config(config)
    methods = st.methods_from_config(config)
    for task in tasks:
        for m in methods:
            _validate(m, task)
    if not config.cost.comm_cost >= 0:
        raise ValueError(f"cost.comm_cost must be >= 0, got {config.cost.comm_cost}.")
    if not 0.0 < config.cost.target_val_accuracy <= 1.0:
        raise ValueError(
            f"cost.target_val_accuracy must lie in (0, 1], got {config.cost.target_val_accuracy}."
        )
    for name, value in (config.cost.get("task_targets") or {}).items():
        if not 0.0 < value <= 1.0:
            raise ValueError(f"cost.task_targets.{name} must lie in (0, 1], got {value}.")
    unknown = sorted(set(config.curves_against) - set(CURVE_LABELS))
    if unknown:
        raise ValueError(f"curves_against: unknown {unknown}; allowed: {sorted(CURVE_LABELS)}.")
    sizes = {len(st.points(m)) for m in methods}
    periods = ", ".join(
        f"{m.name} H={m.spec.get('sync_period', 1)}" for m in methods if m.spec["algorithm"] != "dp"
    )
    return st.Study(
        name=NAME,
        claim=CLAIM,
        tasks=tasks,
        methods=methods,
        seeds=tuple(config.seeds),
        make_tx=make_tx,
        claims=st.claims_from_config(config, methods),
        grad_skip=lambda m: (
            optlab.palsgd_is_pseudo_sync if m.spec["algorithm"] == "palsgd" else None
        ),
        history_metrics=history_metrics(config),
        curve_x={CURVE_LABELS[k]: _curve_x(config, k) for k in config.curves_against},
        table_metrics=(
            "test_accuracy",
            "val_accuracy",
            "comm_rounds",
            "grad_evals",
            "grad_evals_run",
            "model_time_to_target",
            "measured_time_s_to_target",
            "measured_time_s",
        ),
        notes=[
            f"Sync periods: {periods}; a communication round is a step with an all-reduce "
            "(warm-up / synchronous steps of post-local SGD and PALSGD count one each).",
            f"Cost model: model_time = grad_evals + {config.cost.comm_cost:g} x comm_rounds, "
            "in units of one worker's forward/backward (cost.comm_cost = what one all-reduce "
            "of the params costs); *_to_target at the first evaluation with validation "
            f"accuracy >= {config.cost.target_val_accuracy:g}"
            + "".join(
                f" ({name}: {task_target(config, name):g})"
                for name in (config.cost.get("task_targets") or {})
            )
            + ".",
            "measured_time_s: seconds of the group's compiled training chunks (every run of a "
            "method, all its workers, in one program on one device; first window's compile "
            "replaced by the median window). On one device communication is a memory copy: "
            "this time shows the compute PALSGD skips, not the bandwidth the local methods "
            "save; the machine is shared, so treat differences under ~10 % as noise."
            + ("" if len(sizes) == 1 else " Methods train different numbers of runs here."),
            "In this one-device simulation (vmap over runs and workers) the step count is "
            "batched; the sync of Local SGD, DiLoCo and PALSGD runs under optlab's run_if (a "
            "conditional holding a while loop that runs only while some member syncs), so "
            "off-sync steps skip the averaging and the outer step here too; on real devices "
            "(shard_map) see python -m experiments bench for the bytes each method moves.",
            "PALSGD skips the forward/backward pass only on steps where every run and worker "
            "of the group pseudo-syncs (shared coins from one coin seed for every run, the "
            "reference code's behaviour): grad_evals counts the gradients the method needs, "
            "grad_evals_run those this program computed (equal here).",
            "Footing: the same inner optimizer spec, data partitions, seeds, steps and L2 "
            "term for every method; inner learning rates tuned on the validation split over "
            "the same number of values; DiLoCo's and PALSGD's outer optimizer is Nesterov "
            "SGD (outer_learning_rate, outer_momentum in the config).",
        ],
        config=config.to_dict(),
    )


validate, plan, run = st.runner_functions(build_study)

"""The `continual` experiment: do spectral (and Wasserstein) regularizers keep a network
trainable on a stream of tasks, and how sensitive are they to their strength?

Each study task is a **stream** built by the ``prepare_data`` hook from one dataset
(``streams.<task>`` in the config):

- ``permuted``: task ``k`` is the training set under a fixed random pixel permutation
  ``pi_k`` (task 0 unpermuted);
- ``label_flip``: task ``k`` relabels every class through a fixed random permutation of the
  labels (task 0 the true labels);
- ``class_incremental``: the classes arrive in a fixed random order, ``C / T`` new ones per
  task, and task ``k`` trains on every class seen so far.

A :class:`~experiments.train.plans.TaskStreamPlan` trains the tasks one after another, an
equal number of steps each, without resetting anything. The records' ``test_accuracy`` and
``val_accuracy`` are those of the **last task** (its test set / its validation split) after
training on it, the plasticity left at the end of the stream; tuned strengths are chosen on
that validation accuracy. Probes evaluated at every task boundary (``eval_every``) and at the
end: ``task<k>_accuracy`` (the test set of task ``k``; at the boundary after task ``k`` it is
the accuracy on the new task after training on it) and ``sigma_<layer>`` (the exact largest
singular value of each kernel, ``optlab.spectral_norms``).

Every method trains with the same base optimizer, data, seeds and budget; the regularizers
add the gradient of ``strength * R(params)`` before it (a loss term): ``l2`` is
``strength * ||x||^2`` over every parameter (``optax.add_decayed_weights(2 * strength)``),
``l2_init`` ``strength * ||x - x0||^2`` (``optlab.l2_init_regularization``), ``spectral``
``optlab.spectral_regularization`` (kernels), ``wasserstein``
``optlab.wasserstein_regularization`` (every parameter tensor).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

import optlab
from experiments import study as st
from experiments.optimizers import make_optimizer, validate_spec
from experiments.registry import get_experiment
from experiments.train.losses import make_stacked_evaluator
from experiments.train.plans import TaskStreamPlan

NAME = "continual"
CLAIM = get_experiment(NAME).claim
REGULARIZERS = ("none", "l2", "l2_init", "spectral", "wasserstein")
KINDS = ("permuted", "label_flip", "class_incremental")


def make_tx(spec: Mapping[str, Any], ctx: st.TxContext) -> optax.GradientTransformation:
    """The base optimizer, after the spec's regularizer (a gradient-adding transform)."""
    base = make_optimizer(spec, steps=ctx.steps)
    kind = spec.get("regularizer", "none")
    if kind == "none":
        return base
    strength = spec["strength"]
    if kind == "l2":
        reg = optax.add_decayed_weights(2.0 * strength)  # the gradient of strength * ||x||^2
    elif kind == "l2_init":
        reg = optlab.l2_init_regularization(strength)
    elif kind == "spectral":
        reg = optlab.spectral_regularization(strength, power=spec.get("power", 2.0))
    elif kind == "wasserstein":
        reg = optlab.wasserstein_regularization(strength)
    else:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {kind!r}.")
    return optax.chain(reg, base)


@dataclasses.dataclass(frozen=True)
class Stream:
    """A prepared stream: training blocks and every task's held-out sets."""

    blocks: tuple[np.ndarray, ...]
    steps_per_task: int
    tests: tuple[tuple[np.ndarray, np.ndarray], ...]


def build_stream(
    data: st.TaskData, kind: str, num_tasks: int, seed: int
) -> tuple[st.TaskData, Stream]:
    """The stream's training arrays (blocks), and the data with the last task's test and
    validation sets in place of the originals."""
    ds = data.dataset
    rng = np.random.default_rng([seed, 0xC0171])
    num_classes = ds.num_classes
    x, y = ds.x_train, ds.y_train
    n = len(x)

    def permute_pixels(a: np.ndarray, perm: np.ndarray) -> np.ndarray:
        return a.reshape(len(a), -1)[:, perm].reshape(a.shape)

    if kind == "permuted":
        size = int(np.prod(x.shape[1:]))
        perms = [np.arange(size)] + [rng.permutation(size) for _ in range(num_tasks - 1)]
        x_train = np.concatenate([permute_pixels(x, p) for p in perms])
        y_train = np.tile(y, num_tasks)
        blocks = tuple(np.arange(k * n, (k + 1) * n) for k in range(num_tasks))
        tests = tuple((permute_pixels(ds.x_test, p), ds.y_test) for p in perms)
        x_val, y_val = permute_pixels(data.x_val, perms[-1]), data.y_val
    elif kind == "label_flip":
        maps = [np.arange(num_classes)] + [
            rng.permutation(num_classes) for _ in range(num_tasks - 1)
        ]
        x_train = np.concatenate([x] * num_tasks)
        y_train = np.concatenate([m[y] for m in maps]).astype(y.dtype)
        blocks = tuple(np.arange(k * n, (k + 1) * n) for k in range(num_tasks))
        tests = tuple((ds.x_test, m[ds.y_test].astype(ds.y_test.dtype)) for m in maps)
        x_val, y_val = data.x_val, maps[-1][data.y_val].astype(data.y_val.dtype)
    elif kind == "class_incremental":
        if num_classes % num_tasks:
            raise ValueError(
                f"streams.{data.task.name}.num_tasks ({num_tasks}) must divide the number of "
                f"classes ({num_classes}) for a class-incremental stream."
            )
        order = rng.permutation(num_classes)
        seen = [order[: (k + 1) * num_classes // num_tasks] for k in range(num_tasks)]
        x_train, y_train = x, y
        blocks = tuple(np.flatnonzero(np.isin(y, s)) for s in seen)
        tests = tuple(
            (ds.x_test[np.isin(ds.y_test, s)], ds.y_test[np.isin(ds.y_test, s)]) for s in seen
        )
        keep = np.isin(data.y_val, seen[-1])
        x_val, y_val = data.x_val[keep], data.y_val[keep]
    else:
        raise ValueError(f"streams.{data.task.name}.kind must be one of {KINDS}, got {kind!r}.")
    x_test, y_test = tests[-1]
    dataset = ds._replace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    stream = Stream(blocks, data.steps // num_tasks, tests)
    return dataclasses.replace(data, dataset=dataset, x_val=x_val, y_val=y_val), stream


def sigma_evaluator(params: Any, model_state: Any) -> dict[str, jax.Array]:
    """``{"<layer>": [R]}``: the exact largest singular value of every kernel of every run."""
    del model_state
    norms = jax.vmap(optlab.spectral_norms)(params)
    flat = jax.tree_util.tree_flatten_with_path(norms)[0]
    out = {}
    for path, value in flat:
        names = [str(getattr(p, "key", p)) for p in path]
        layer = "_".join(n for n in names if n != "kernel")
        out[layer] = value
    return out


def accuracy_after_each_task(
    metrics: Sequence[Mapping[str, Any]], steps_per_task: int, num_tasks: int
) -> dict[tuple[str, str, int], list[float]]:
    """``{(method, point, seed): [accuracy on task k right after training on it, k = 0..]}``
    from one stream's ``metrics.jsonl`` records (:func:`experiments.train.metrics.read_metrics`):
    the probe ``task<k>_accuracy`` at step ``(k + 1) * steps_per_task`` (the boundary
    evaluations need ``eval_every`` to divide the steps per task; the last one is the final
    record). Missing evaluations give NaN."""
    out: dict[tuple[str, str, int], list[float]] = {}
    for r in metrics:
        key = (r["method"], r["point"], r["seed"])
        row = out.setdefault(key, [math.nan] * num_tasks)
        k, rem = divmod(r["step"], steps_per_task)
        if rem == 0 and 1 <= k <= num_tasks and f"task{k - 1}_accuracy" in r:
            value = r[f"task{k - 1}_accuracy"]
            row[k - 1] = math.nan if value is None else float(value)
    return out


def _check_streams(config: ml_collections.ConfigDict, tasks: tuple[st.Task, ...]) -> None:
    streams = config.get("streams", {})
    for task in tasks:
        where = f"streams.{task.name}"
        if task.name not in streams:
            raise ValueError(f"{where} is missing: every task needs a stream (kind, num_tasks).")
        entry = dict(streams[task.name])
        unknown = sorted(set(entry) - {"kind", "num_tasks"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: ['kind', 'num_tasks'].")
        if entry.get("kind") not in KINDS:
            raise ValueError(f"{where}.kind must be one of {KINDS}, got {entry.get('kind')!r}.")
        num = entry.get("num_tasks")
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"{where}.num_tasks must be an integer >= 1, got {num!r}.")
        if task.epochs or task.steps % num:
            raise ValueError(
                f"tasks.{task.name}.steps ({task.steps}) must be a multiple of "
                f"{where}.num_tasks ({num}) (and epochs 0): every task gets the same steps."
            )
        per_task = task.steps // num
        if task.eval_every and per_task % task.eval_every:
            raise ValueError(
                f"tasks.{task.name}.eval_every ({task.eval_every}) must divide the steps per "
                f"task ({per_task}), so that the probes see every task boundary."
            )


def _validate(method: st.Method) -> None:
    spec = method.spec
    validate_spec(method.name, spec)
    kind = spec.get("regularizer", "none")
    if kind not in REGULARIZERS:
        raise ValueError(
            f"methods.{method.name}.regularizer must be one of {REGULARIZERS}, got {kind!r}."
        )
    ctx = st.TxContext(None, 10, None, 10)  # type: ignore[arg-type]
    try:  # optlab validates its own arguments at construction time
        for point in st.points(method):
            make_tx({**spec, **point}, ctx)
    except (ValueError, KeyError) as error:
        raise ValueError(f"methods.{method.name}: {error!r}") from None


def build_study(config: ml_collections.ConfigDict) -> st.Study:
    tasks = st.tasks_from_config(config)
    _check_streams(config, tasks)
    methods = st.methods_from_config(config)
    for m in methods:
        _validate(m)
    streams: dict[str, Stream] = {}

    def prepare_data(data: st.TaskData) -> st.TaskData:
        entry = config.streams[data.task.name]
        data, stream = build_stream(data, entry.kind, entry.num_tasks, data.task.data_seed)
        streams[data.task.name] = stream
        return data

    def make_plan(data: st.TaskData, method: st.Method) -> TaskStreamPlan:
        stream = streams[data.task.name]
        return TaskStreamPlan(stream.blocks, stream.steps_per_task, data.batch_size)

    def evaluators(data: st.TaskData, model: Any) -> dict[str, Any]:
        stream = streams[data.task.name]
        out: dict[str, Any] = {
            f"task{k}": make_stacked_evaluator(model, x, y) for k, (x, y) in enumerate(stream.tests)
        }
        out["sigma"] = sigma_evaluator
        return out

    kinds = ", ".join(f"{t.name}: {config.streams[t.name].kind}" for t in tasks)
    return st.Study(
        name=NAME,
        claim=CLAIM,
        tasks=tasks,
        methods=methods,
        seeds=tuple(config.seeds),
        make_tx=make_tx,
        claims=st.claims_from_config(config, methods),
        prepare_data=prepare_data,
        make_plan=make_plan,
        evaluators=evaluators,
        table_metrics=("test_accuracy", "val_accuracy", "task0_accuracy", "train_loss"),
        notes=[
            f"Streams ({kinds}); each trains its tasks one after another, equal steps each, "
            "nothing reset. test_accuracy / val_accuracy: the LAST task's test set / "
            "validation split after training on it (plasticity at the end of the stream); "
            "task0_accuracy: the first task at the end (retention).",
            "The per-task accuracy right after training on each task and each kernel's "
            "sigma_max at every task boundary are in <task>/metrics.jsonl "
            "(task<k>_accuracy, sigma_<layer>).",
            "Footing: the same base optimizer, data, seeds and budget for every method; each "
            "regularizer adds the gradient of strength * R(params) before it (a loss term); "
            "strengths tuned on the last task's validation split; the sensitivity claims "
            "compare the per-seed spread of test accuracy over each method's own strength "
            "grid, guarded by its worst and mean value.",
        ],
        config=config.to_dict(),
    )


validate, plan, run = st.runner_functions(build_study)

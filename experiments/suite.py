"""A classification suite: every method x every seed on the same data and budget.

This is the skeleton each paper's runner reuses: it loads the dataset once (the split
fixed by ``data_seed``, identical for all methods and seeds), builds the model per seed
(init from the seed), trains each (method, seed) run with the harness (resumable, one
checkpoint directory per run under ``workdir/runs/<method>/seed<k>``), evaluates the final
parameters on the whole train and test sets, and returns one record per run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import optax
from tqdm.auto import tqdm

from experiments.data import BatchIterator, Dataset, load_dataset
from experiments.distributed import is_main_process, local_replica
from experiments.errors import ConfigError
from experiments.models import make_model, model_names
from experiments.optimizers import make_optimizer, validate_spec
from experiments.train import MetricsWriter, classification_loss, make_evaluator, train
from experiments.train.step import TrainState

TxFactory = Callable[[str, Mapping[str, Any], int], optax.GradientTransformation]
EvalParams = Callable[[TrainState], Any]
FinalMetrics = Callable[[str, Any, Any, Dataset], dict[str, float]]


def default_tx_factory(
    method: str, spec: Mapping[str, Any], steps: int
) -> optax.GradientTransformation:
    """Builds a method's optimizer from its spec (plain optax optimizers)."""
    del method
    return make_optimizer(spec, steps=steps)


def suite_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The fields every classification suite has, with defaults; experiments override."""
    config = ml_collections.ConfigDict(
        {
            "dataset": "digits",
            "data_dir": "",
            "data_seed": 0,
            "model": "mlp",
            "seeds": (0, 1, 2),
            "steps": 500,
            "batch_size": 64,
            "log_every": 25,
            "eval_every": 100,
            "checkpoint_every": 250,
            "method_names": ("sgd",),
            "methods": {"sgd": {"optimizer": "sgd", "learning_rate": 0.1}},
        }
    )
    config.update(overrides)
    return config


def validate_suite(config: ml_collections.ConfigDict) -> None:
    """Range checks of the suite fields; ``ValueError`` names the offending key."""

    def positive(key: str) -> None:
        if config[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {config[key]!r}.")

    for key in ("steps", "batch_size", "log_every", "checkpoint_every"):
        positive(key)
    if config.eval_every < 0:
        raise ValueError(f"eval_every must be >= 0 (0: only at the end), got {config.eval_every}.")
    if config.checkpoint_every % config.log_every:
        raise ValueError(
            f"checkpoint_every ({config.checkpoint_every}) must be a multiple of log_every "
            f"({config.log_every}) so that a resumed run logs exactly the same windows."
        )
    if not config.seeds:
        raise ValueError("seeds must name at least one seed, got ().")
    if any((not isinstance(s, int)) or s < 0 for s in config.seeds):
        raise ValueError(f"seeds must be non-negative integers, got {config.seeds!r}.")
    if config.model not in model_names():
        raise ValueError(f"model must be one of {model_names()}, got {config.model!r}.")
    if not config.method_names:
        raise ValueError("method_names must name at least one method, got ().")
    for method in config.method_names:
        if method not in config.methods:
            raise ValueError(
                f"method_names: {method!r} is not in methods (known: {sorted(config.methods)})."
            )
        validate_spec(method, config.methods[method])


def load_suite_data(config: ml_collections.ConfigDict, devices: int = 1) -> Dataset:
    """Loads the dataset and checks the batch size against it and the device count."""
    dataset = load_dataset(config.dataset, seed=config.data_seed, data_dir=config.data_dir or None)
    n = len(dataset.x_train)
    if not 1 <= config.batch_size <= n:
        raise ConfigError(
            f"batch_size must be in [1, {n}] (the training set), got {config.batch_size}."
        )
    if config.batch_size % devices:
        raise ConfigError(
            f"batch_size ({config.batch_size}) must be divisible by devices ({devices})."
        )
    return dataset


def run_suite(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    dataset: Dataset | None = None,
    tx_factory: TxFactory = default_tx_factory,
    methods: Sequence[str] | None = None,
    devices: int = 1,
    progress: bool = True,
    eval_params: EvalParams | None = None,
    final_metrics: FinalMetrics | None = None,
) -> list[dict[str, Any]]:
    """Trains every (method, seed) and returns one final-metrics record per run.

    Records: ``{"method", "seed", "test_accuracy", "test_loss", "train_accuracy",
    "train_loss", "steps", "wall_time_s"}``. Metrics stream to ``workdir/metrics.jsonl``.

    Args:
      eval_params: the weights evaluated (during training and at the end) as a function of
        the train state, e.g. Lookahead's slow weights; default ``state.params``.
      final_metrics: ``fn(method, params, model_state, dataset) -> {name: float}`` run once
        per run on the final evaluated weights (e.g. the top Hessian eigenvalue); its
        entries are added to the record.
    """
    dataset = dataset if dataset is not None else load_suite_data(config, devices)
    progress = progress and is_main_process()
    methods = list(methods if methods is not None else config.method_names)
    model = make_model(config.model, num_classes=dataset.num_classes)
    loss_fn = classification_loss(model)
    init = jax.jit(model.init)  # one compilation for all seeds (eager init is slow for ResNets)
    test_eval = make_evaluator(model, dataset.x_test, dataset.y_test)
    train_eval = make_evaluator(model, dataset.x_train, dataset.y_train)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    records = []
    grid = [(m, s) for m in methods for s in config.seeds]
    outer = tqdm(grid, desc="runs", disable=not progress, dynamic_ncols=True)
    for method, seed in outer:
        outer.set_postfix(method=method, seed=seed)
        t0 = time.perf_counter()
        params, model_state = init(jax.random.key(seed), dataset.x_train[:1])
        result = train(
            loss_fn=loss_fn,
            tx=tx_factory(method, config.methods[method], config.steps),
            params=params,
            model_state=model_state,
            batches=BatchIterator(dataset.x_train, dataset.y_train, config.batch_size, seed=seed),
            steps=config.steps,
            seed=seed,
            run_dir=os.path.join(workdir, "runs", method, f"seed{seed}"),
            evaluators={"test": test_eval},
            metrics=MetricsWriter(metrics_path, method=method, seed=seed),
            log_every=config.log_every,
            eval_every=config.eval_every,
            checkpoint_every=config.checkpoint_every,
            devices=devices,
            progress=progress,
            description=f"{method} seed {seed}",
            eval_params=eval_params,
        )
        state = result.state
        weights = eval_params(state) if eval_params is not None else state.params
        weights, model_state = local_replica((weights, state.model_state))
        final_train = train_eval(weights, model_state)
        extra = final_metrics(method, weights, model_state, dataset) if final_metrics else {}
        records.append(
            {
                "method": method,
                "seed": seed,
                "test_accuracy": result.final["test_accuracy"],
                "test_loss": result.final["test_loss"],
                "train_accuracy": final_train["accuracy"],
                "train_loss": final_train["loss"],
                "steps": config.steps,
                "wall_time_s": time.perf_counter() - t0,
                **extra,
            }
        )
    return records

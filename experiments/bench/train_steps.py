"""Full train-step benchmark: every entry inside the real jitted step, against plain SGD."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.registry import SGD_NAME, BenchEntry
from experiments.bench.timing import interleaved_times, median, ratio
from experiments.data import load_dataset
from experiments.models import make_model, param_count
from experiments.train.losses import classification_loss
from experiments.train.step import init_train_state, make_train_step

__all__ = ["bench_train_steps"]


def bench_train_steps(
    entries: Sequence[BenchEntry],
    models: Sequence[str],
    *,
    reps: int,
    steps_per_rep: int = 1,
    batch_size: int = 128,
    dataset: str = "digits",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Median per-step time of each entry in ``make_train_step`` on each model.

    All entries of one model start from the same initial parameters and step on the same
    fixed batch (data loading is not part of the measurement); their steps are interleaved
    round-robin after a warm-up step (compilation). The state is donated as in training, so
    each runner carries its own state forward.

    Args:
      entries: what to measure; ratios against :data:`SGD_NAME` and each counterpart.
      models: names for :func:`experiments.models.make_model`, e.g. ``("mlp", "cnn")``.
      reps: timed samples per entry and model.
      steps_per_rep: consecutive steps per sample (per-step time = sample / steps).
      batch_size: examples per step.
      dataset: name for :func:`experiments.data.load_dataset`.
      seed: initialisation seed.

    Returns:
      One row per (model, entry): ``model, name, num_params, batch_size, step_time_s,
      ratio_to_sgd, counterpart, ratio_to_counterpart, times_s`` (per-step times). Entries
      with ``make_params`` (params other than the model's tree) are skipped.
    """
    entries = [e for e in entries if e.make_params is None]
    data = load_dataset(dataset)
    batch_size = min(batch_size, len(data.x_train))
    host_batch = {"x": data.x_train[:batch_size], "y": data.y_train[:batch_size]}
    rows: list[dict[str, Any]] = []
    for model_name in models:
        model = make_model(model_name, data.num_classes)
        key = jax.random.key(seed)
        params, model_state = _initial_variables(model, host_batch["x"], seed)
        loss_fn = classification_loss(model)
        runners: dict[str, Callable[[], None]] = {}
        for entry in entries:
            tx = entry.make()
            compiled = make_train_step(loss_fn, tx)
            # put_state copies, so donating one entry's state leaves the shared initial
            # params (and the other entries' states) intact.
            holder = {"state": compiled.put_state(init_train_state(params, model_state, tx, key))}
            batch = compiled.put_batch(host_batch)

            def run(compiled=compiled, holder=holder, batch=batch) -> None:
                state, metrics = holder["state"], None
                for _ in range(steps_per_rep):
                    state, metrics = compiled.step(state, batch)
                holder["state"] = jax.block_until_ready(state)
                jax.block_until_ready(metrics)

            runners[entry.name] = run
        times = interleaved_times(runners, reps=reps, desc=f"train {model_name}")
        per_step = {name: [t / steps_per_rep for t in ts] for name, ts in times.items()}
        med = {name: median(ts) for name, ts in per_step.items()}
        for entry in entries:
            t = med[entry.name]
            rows.append(
                {
                    "model": model_name,
                    "name": entry.name,
                    "num_params": param_count(params),
                    "batch_size": batch_size,
                    "step_time_s": t,
                    "ratio_to_sgd": ratio(t, med.get(SGD_NAME)),
                    "counterpart": entry.counterpart,
                    "ratio_to_counterpart": ratio(t, med.get(entry.counterpart or "")),
                    "times_s": per_step[entry.name],
                }
            )
    return rows


def _initial_variables(model: Any, x: np.ndarray, seed: int) -> tuple[Any, Any]:
    """Params ``0.05 * N(0, 1)`` and model state (e.g. BatchNorm statistics) of ones.

    Only the shapes come from the model (``eval_shape``, nothing compiled): timing does not
    depend on the values as long as they stay finite, and the model's own initializers would
    compile the threefry PRNG once per model (seconds on a small CPU).
    """
    params_shape, state_shape = jax.eval_shape(model.init, jax.random.key(seed), x)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape)).astype(a.dtype), params_shape
    )
    model_state = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), state_shape)
    return params, model_state

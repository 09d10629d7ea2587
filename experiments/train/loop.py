"""The training loop: one run (one method, one seed) with metrics, eval and checkpoints.

Resuming: rerunning with the same ``run_dir`` restores the latest checkpoint (params,
model state, optimizer state, RNG and the data position, which is the step) and continues;
the final parameters are bitwise equal to those of an uninterrupted run (tested, with
SIGKILL). A run already finished only re-evaluates its final checkpoint.

Divergence: the step records the first non-finite loss on device; the loop checks it at
each log and before each checkpoint, so a diverged state is never saved, and raises
:class:`NonFiniteLossError` naming the step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from experiments.distributed import is_main_process, local_replica, to_host
from experiments.train.checkpoint import Checkpointer
from experiments.train.metrics import MetricsWriter
from experiments.train.step import LossFn, TrainState, init_train_state, make_train_step

PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, last_checkpoint: int | None):
        self.step = step
        self.last_checkpoint = last_checkpoint
        kept = (
            f"the last good checkpoint (step {last_checkpoint}) is intact"
            if last_checkpoint is not None
            else "no checkpoint had been written"
        )
        super().__init__(
            f"training loss became non-finite at step {step}; stopped, {kept}. "
            "Lower the learning rate or add gradient clipping."
        )


class RunResult(NamedTuple):
    """What one run returns: the final state and its final train/test metrics."""

    state: TrainState
    final: dict[str, float]


class BatchSource(Protocol):
    """Anything with ``batch_at(step) -> {"x": ..., "y": ...}`` (a pure function of step)."""

    def batch_at(self, step: int) -> dict[str, np.ndarray]: ...


def train(
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    params: PyTree,
    model_state: PyTree,
    batches: BatchSource,
    steps: int,
    seed: int,
    run_dir: str | os.PathLike,
    evaluators: Mapping[str, Callable[[PyTree, PyTree], dict[str, float]]] | None = None,
    metrics: MetricsWriter | None = None,
    log_every: int = 10,
    eval_every: int = 0,
    checkpoint_every: int = 100,
    devices: int = 1,
    progress: bool = True,
    description: str = "train",
    eval_params: Callable[[TrainState], PyTree] | None = None,
) -> RunResult:
    """Trains for ``steps`` steps, resuming from ``run_dir`` if it holds a checkpoint.

    Args:
      loss_fn, tx: as for :func:`experiments.train.step.make_train_step`.
      params, model_state: the initial model variables (used at step 0, and as the
        structure to restore into).
      batches: the training data; the batch of step t is ``batches.batch_at(t)``.
      steps: total number of steps.
      seed: seeds the step RNG (dropout etc.); data order is the batch source's business.
      run_dir: this run's directory; checkpoints go to ``run_dir/checkpoints``.
      evaluators: ``{"test": fn, "train": fn}`` with ``fn(params, model_state) -> metrics``;
        run every ``eval_every`` steps (0: only at the end) and at the end.
      metrics: where to append records ``{"step", "train_loss", "train_accuracy", ...}``
        (written by process 0 only when several processes run).
      log_every: steps between training-metric records (mean over the window).
      checkpoint_every: steps between checkpoints; one is always written at the end.
      devices: data-parallel devices (1: plain jit).
      progress: show a tqdm bar.
      eval_params: which weights the evaluators see, as a function of the train state
        (default: ``state.params``). Lookahead evaluates its slow weights with
        ``lambda s: optlab.slow_params(s.opt_state)``.

    Returns:
      A :class:`RunResult`; ``final`` holds ``{f"{name}_{metric}"}`` from the evaluators.

    Raises:
      NonFiniteLossError: the loss became NaN/inf; no checkpoint after that step exists.
    """
    evaluators = dict(evaluators or {})
    if not is_main_process():
        metrics, progress = None, False
    compiled = make_train_step(loss_fn, tx, num_devices=devices)
    state = compiled.put_state(init_train_state(params, model_state, tx, jax.random.key(seed)))
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        start = checkpointer.latest_step()
        if start is not None:
            state = checkpointer.restore(like=state, step=start)
        start = start or 0
        if metrics is not None:
            # Records after the restored step (or all, for a run killed before its first
            # checkpoint) are written again by the replay.
            metrics.truncate_after(start)

        def evaluate_all() -> dict[str, float]:
            out = {}
            weights = eval_params(state) if eval_params is not None else state.params
            params, model_state = local_replica((weights, state.model_state))
            for name, evaluate in evaluators.items():
                for key, value in evaluate(params, model_state).items():
                    out[f"{name}_{key}"] = value
            return out

        def check_finite() -> None:
            bad = int(to_host(state.first_nonfinite_step))
            if bad >= 0:
                checkpointer.wait()
                raise NonFiniteLossError(bad, checkpointer.latest_step())

        window: list[dict[str, jax.Array]] = []
        t0 = time.perf_counter()
        bar = tqdm(
            total=steps,
            initial=start,
            desc=description,
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        for step in range(start, steps):
            state, step_metrics = compiled.step(state, compiled.put_batch(batches.batch_at(step)))
            window.append(step_metrics)
            done = step + 1
            bar.update(1)
            is_log = done % log_every == 0 or done == steps
            is_eval = bool(eval_every) and done % eval_every == 0 and done != steps
            is_ckpt = done % checkpoint_every == 0 or done == steps
            if is_log or is_eval:
                record: dict[str, Any] = {"step": done}
                if is_log:
                    means = jax.tree.map(lambda *v: float(np.mean(v)), *to_host(window))
                    record.update({f"train_{k}": v for k, v in means.items()})
                    window = []
                check_finite()
                if is_eval:
                    record.update(evaluate_all())
                record["wall_time_s"] = time.perf_counter() - t0
                if metrics is not None:
                    metrics.write(record)
                if "train_loss" in record:
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}")
            if is_ckpt:
                check_finite()
                checkpointer.save(done, state)
        bar.close()
        checkpointer.wait()
        final = evaluate_all()
        if metrics is not None and final:
            metrics.write({"step": steps, "final": True, **final})
        return RunResult(state=state, final=final)
    finally:
        checkpointer.close()

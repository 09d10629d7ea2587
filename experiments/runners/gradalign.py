"""The `gradalign` experiment: GradAlign vs large-batch (synchronous data-parallel) SGD.

Dandi, Barba and Jaggi (AAAI 2022) restore the implicit regulariser of small-batch SGD, a
penalty on the disagreement of mini-batch gradients, in large-batch and distributed
training: every worker takes its gradient at ``x + beta * (g_i - mean_j g_j)``, which to
first order descends ``f + beta / 2 * (1/M) sum_i ||grad f_i - grad f||^2``.

Both methods train the same model on the same worker partitions, seeds, steps and base
optimizer (``experiments.optimizers`` spec, one ``update`` per step): large-batch SGD is
synchronous data parallelism (``optlab.mean_gradients`` then the base optimizer on the
mean of the workers' gradients; the total batch is ``workers x batch_size``), GradAlign is
``optlab.gradalign(base, beta)``. The learning rate is tuned on the validation split for
both, and beta (a float axis, vectorized) for GradAlign. GradAlign takes two gradients per
step; the comparison is at equal steps.

Measured, besides accuracy: the **normalised worker-gradient variance** of the (average)
model, every ``eval_every`` steps and at the end, at fixed batches: each worker ``i`` keeps
``num_batches`` fixed batches ``B_ik`` of ``batch_size`` examples of its own partition
(the first ones), and with ``g_ik`` the gradient of the mean cross-entropy (no L2 term,
evaluation mode) on ``B_ik`` and ``gbar_k`` the mean over workers,

    grad_variance_normalized = sum_k (1/M) sum_i ||g_ik - gbar_k||^2 / sum_k ||gbar_k||^2

(``grad_variance`` is the numerator over ``num_batches``, unnormalised). It is the squared
version of the ratio ``||gbar - g_i|| / ||gbar||`` the official code logs, averaged over
workers and batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import optlab
from experiments import study as st
from experiments.optimizers import make_optimizer, validate_spec
from experiments.registry import get_experiment
from experiments.train.vectorized import StackedEvaluator

NAME = "gradalign"
CLAIM = get_experiment(NAME).claim
TRANSFORMS = ("none", "gradalign")


def make_tx(spec: Mapping[str, Any], ctx: st.TxContext) -> optax.GradientTransformation:
    """Synchronous data-parallel ``base`` or ``optlab.gradalign(base, beta)``.

    Without a worker axis (one model per run) both are the base optimizer alone (one worker
    deviates from no one).
    """
    base = make_optimizer(spec, steps=ctx.steps)
    if ctx.axis_name is None:
        return base
    if spec.get("transform", "none") == "none":
        return optax.chain(optlab.mean_gradients(ctx.axis_name), base)
    return optlab.gradalign(base, beta=spec["beta"], axis_name=ctx.axis_name)


def gradient_variance_fn(model: Any, x: np.ndarray, y: np.ndarray) -> StackedEvaluator:
    """``fn(params [R], model_state [R]) -> {"variance", "variance_normalized": [R]}``.

    ``x``: ``[workers, num_batches, batch, ...]`` fixed per-worker batches, ``y`` their
    labels (see the module docstring for the definition).
    """
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    def loss(params, model_state, xb, yb):
        logits, _ = model.apply(params, model_state, xb, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def one(params, model_state):
        grad = jax.grad(loss)
        per = jax.vmap(jax.vmap(grad, (None, None, 0, 0)), (None, None, 0, 0))
        g = per(params, model_state, xs, ys)  # leaves [W, K, ...]
        mean = jax.tree.map(lambda a: a.mean(0), g)  # [K, ...]
        dev = jnp.zeros(xs.shape[1])  # [K]: mean over workers of ||g_ik - gbar_k||^2
        norm = jnp.zeros(xs.shape[1])  # [K]: ||gbar_k||^2
        for a, m in zip(jax.tree.leaves(g), jax.tree.leaves(mean), strict=True):
            dev += jnp.sum((a - m) ** 2, axis=tuple(range(2, a.ndim))).mean(0)
            norm += jnp.sum(m**2, axis=tuple(range(1, m.ndim)))
        return {
            "variance": dev.mean(),
            "variance_normalized": dev.sum() / jnp.maximum(norm.sum(), 1e-30),
        }

    return jax.vmap(one)


def variance_evaluator(config: ml_collections.ConfigDict):
    """The ``evaluators`` hook: the gradient variance at each worker's fixed batches."""
    num_batches = config.gradient_variance.num_batches

    def evaluators(data: st.TaskData, model: Any) -> dict[str, StackedEvaluator]:
        b = data.task.batch_size
        need = num_batches * b
        idx = []
        for w, part in enumerate(data.partitions):
            if len(part) < need:
                raise ValueError(
                    f"gradient_variance.num_batches ({num_batches}) x batch_size ({b}) exceeds "
                    f"worker {w}'s partition ({len(part)} examples) in tasks.{data.task.name}."
                )
            idx.append(np.asarray(part[:need]).reshape(num_batches, b))
        index = np.stack(idx)  # [W, K, B]
        x, y = data.dataset.x_train[index], data.dataset.y_train[index]
        return {"grad": gradient_variance_fn(model, x, y)}

    return evaluators


def _validate(method: st.Method) -> None:
    spec, where = method.spec, f"methods.{method.name}"
    transform = spec.get("transform", "none")
    if transform not in TRANSFORMS:
        raise ValueError(f"{where}.transform must be one of {TRANSFORMS}, got {transform!r}.")
    validate_spec(method.name, spec)
    if transform == "gradalign":
        betas = method.axes.get("beta", (spec.get("beta"),))
        if not all(isinstance(v, float) and v >= 0 for v in betas):
            raise ValueError(f"{where}.beta must be a float >= 0, got {betas!r}.")


def build_study(config: ml_collections.ConfigDict) -> st.Study:
    methods = st.methods_from_config(config)
    for m in methods:
        _validate(m)
    tasks = st.tasks_from_config(config)
    for t in tasks:
        if t.workers < 2:
            raise ValueError(
                f"tasks.{t.name}.workers must be >= 2 (GradAlign aligns workers), got {t.workers}."
            )
    if config.gradient_variance.num_batches < 1:
        raise ValueError(
            f"gradient_variance.num_batches must be >= 1, got "
            f"{config.gradient_variance.num_batches}."
        )
    return st.Study(
        name=NAME,
        claim=CLAIM,
        tasks=tasks,
        methods=methods,
        seeds=tuple(config.seeds),
        make_tx=make_tx,
        claims=st.claims_from_config(config, methods),
        evaluators=variance_evaluator(config),
        table_metrics=(
            "test_accuracy",
            "val_accuracy",
            "grad_variance_normalized",
            "grad_variance",
            "train_loss",
        ),
        curve_metrics=("train_loss", "test_accuracy", "grad_variance_normalized"),
        notes=[
            "Equal steps, not equal compute: GradAlign takes two gradients per step, "
            "large-batch SGD one. Both average over the same workers' batches.",
            "grad_variance_normalized: sum_k (1/M) sum_i ||g_ik - gbar_k||^2 / "
            "sum_k ||gbar_k||^2 over each worker's "
            f"{config.gradient_variance.num_batches} fixed batches (the first of its "
            "partition), cross-entropy without L2, evaluation mode, on the final (average) "
            "model; grad_variance is the unnormalised numerator per batch. Their course "
            "over training is in the curves and <task>/metrics.jsonl.",
            "beta is tuned on the validation split with the learning rate (the other beta "
            "values are in results.json and the beta plot).",
        ],
        config=config.to_dict(),
    )


validate, plan, run = st.runner_functions(build_study)

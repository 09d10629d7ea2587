"""The `sam` experiment: do SAM-type optimizers find flatter minima and generalise better?

Every method trains on the same data, seeds, budget and footing: the loss carries the same
L2 term (``l2 / 2 * ||W||^2`` over the kernels, as the official SAM code puts weight decay
in the loss, so the perturbation sees it), and each method runs either with SGD momentum
0.9 (``sgd``, ``sam``, ``asam``, ``avg_sam``) or without momentum (``sgd_plain``,
``sam_plain`` and SA-SAM, whose authors' practical code takes a plain SGD step). SA-SAM is
judged against the pair without momentum, the others against ``sgd``.

Measured at the end, on the final weights: test and validation accuracy, the top Hessian
eigenvalue (power iteration, ``optlab.hessian_top_eigenvalue``) and the Hessian trace
(Hutchinson, ``optlab.hessian_trace``) of the cross-entropy (without the L2 term) in
evaluation mode, on a fixed subset of training examples, the same subset and random start
for every run. rho (SAM, ASAM) and sigma (average-direction SAM) are tuned on the
validation split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import optlab
from experiments import study as st
from experiments.models import make_model
from experiments.optimizers import make_optimizer, validate_spec
from experiments.registry import get_experiment

NAME = "sam"
CLAIM = get_experiment(NAME).claim
TRANSFORMS = ("none", "sam", "asam", "sa_sam", "average_direction_sam")
GRADIENTS = {"none": 1, "sam": 2, "asam": 2, "sa_sam": 3}  # passes per step


def make_tx(spec: Mapping[str, Any], ctx: st.TxContext) -> optax.GradientTransformation:
    """The optimizer of one method spec (see ``experiments/configs/sam.py``)."""
    transform = spec.get("transform", "none")
    if transform == "sa_sam":
        return optlab.sa_sam(
            spec["learning_rate"], form=spec.get("form", "practical"), axis_name=ctx.axis_name
        )
    base = make_optimizer(spec, steps=ctx.steps)
    if transform == "none":  # worker mode: synchronous data parallelism
        return optax.chain(optlab.mean_gradients(ctx.axis_name), base) if ctx.axis_name else base
    if transform in ("sam", "asam"):
        return optlab.sam(
            base,
            rho=spec["rho"],
            adaptive=transform == "asam",
            adaptive_eps=spec.get("adaptive_eps", 0.01),
            axis_name=ctx.axis_name,
        )
    if transform == "average_direction_sam":
        return optlab.average_direction_sam(
            base,
            sigma=spec["sigma"],
            num_samples=spec.get("num_samples", 1),
            axis_name=ctx.axis_name,
        )
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}.")


def _validate(method: st.Method, task: st.Task) -> None:
    spec = method.spec
    transform = spec.get("transform", "none")
    if transform not in TRANSFORMS:
        raise ValueError(
            f"methods.{method.name}.transform must be one of {TRANSFORMS}, got {transform!r}."
        )
    if transform != "sa_sam":
        validate_spec(method.name, spec)
    try:  # optlab validates its own arguments at construction time
        for point in st.points(method):
            make_tx({**spec, **point}, st.TxContext(task, 1, None, 10))
    except (ValueError, KeyError) as error:
        raise ValueError(f"methods.{method.name}: {error}") from None


def sharpness_metrics(config: ml_collections.ConfigDict):
    """The ``final_metrics`` hook: Hessian top eigenvalue and trace of every run."""
    sharp = config.sharpness
    compiled: dict[str, Any] = {}  # one jitted function per task

    def final_metrics(data: st.TaskData, method, spec, params, model_state):
        del method, spec
        if data.task.name not in compiled:
            model = make_model(data.task.model, num_classes=data.dataset.num_classes)
            compiled[data.task.name] = sharpness_fn(
                data, model, sharp.num_examples, sharp.iters, sharp.trace_samples
            )
        return jax.device_get(compiled[data.task.name](params, model_state))

    return final_metrics


def sharpness_fn(data: st.TaskData, model: Any, num_examples: int, iters: int, trace_samples: int):
    """``fn(params [R], model_state [R]) -> {"hessian_top_eigenvalue", "hessian_trace": [R]}``.

    The Hessian of the mean cross-entropy (no L2 term) over the first ``num_examples``
    training examples, in evaluation mode; the same examples and random start for every run.
    """
    n = min(num_examples, len(data.dataset.x_train))
    batch = {"x": jnp.asarray(data.dataset.x_train[:n]), "y": jnp.asarray(data.dataset.y_train[:n])}

    def loss(params, inputs):
        logits, _ = model.apply(params, inputs["model_state"], inputs["x"], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, inputs["y"]).mean()

    def one(params, model_state):
        inputs = {**batch, "model_state": model_state}
        key = jax.random.key(0)
        out = {
            "hessian_top_eigenvalue": optlab.hessian_top_eigenvalue(
                loss, params, inputs, key=key, iters=iters
            )
        }
        if trace_samples:
            out["hessian_trace"] = optlab.hessian_trace(
                loss, params, inputs, key=jax.random.fold_in(key, 1), num_samples=trace_samples
            )
        return out

    # One run at a time through one compiled function: a vmapped power iteration would
    # compile again for every group size, and on XLA:CPU that compile (unrolled convolution
    # HVPs) costs far more than running the runs one after another.
    single = jax.jit(one)

    def stacked(params, model_state):
        runs = jax.tree.leaves(params)[0].shape[0]
        outs = [
            single(*jax.tree.map(lambda a, r=r: a[r], (params, model_state))) for r in range(runs)
        ]
        return jax.tree.map(lambda *v: jnp.stack(v), *outs)

    return stacked


def gradients_per_step(spec: Mapping[str, Any]) -> int:
    """Forward/backward passes per step (average-direction SAM: 1 + its samples)."""
    transform = spec.get("transform", "none")
    return GRADIENTS.get(transform, 1 + spec.get("num_samples", 1))


def build_study(config: ml_collections.ConfigDict) -> st.Study:
    tasks = st.tasks_from_config(config)
    methods = st.methods_from_config(config)
    for m in methods:
        _validate(m, tasks[0])
    if config.sharpness.num_examples < 1 or config.sharpness.iters < 1:
        raise ValueError(
            f"sharpness.num_examples and sharpness.iters must be >= 1, got "
            f"{config.sharpness.num_examples}, {config.sharpness.iters}."
        )
    if config.sharpness.trace_samples < 0:
        raise ValueError(
            f"sharpness.trace_samples must be >= 0, got {config.sharpness.trace_samples}."
        )
    costs = ", ".join(f"{m.name} {gradients_per_step(m.spec)}" for m in methods)
    return st.Study(
        name=NAME,
        claim=CLAIM,
        tasks=tasks,
        methods=methods,
        seeds=tuple(config.seeds),
        make_tx=make_tx,
        claims=st.claims_from_config(config, methods),
        final_metrics=sharpness_metrics(config),
        table_metrics=(
            "test_accuracy",
            "val_accuracy",
            "hessian_top_eigenvalue",
            "hessian_trace",
            "train_loss",
        ),
        notes=[
            f"Equal steps, not equal compute: gradient evaluations per step: {costs}.",
            "Footing: the same L2 term in every loss (l2 / 2 * ||W||^2 over the kernels, "
            "as the official SAM code); momentum 0.9 for sgd/sam/asam/avg_sam, none for "
            "sgd_plain/sam_plain and SA-SAM (its authors' code takes a plain SGD step), "
            "which are judged against each other.",
            "SA-SAM sets its own step size (from its initial value up to optlab's cap of 10x "
            "it) and radius rho = sqrt(step size): part of any difference is the step size.",
            f"Sharpness: top Hessian eigenvalue ({config.sharpness.iters} power iterations) "
            f"and trace (Hutchinson, {config.sharpness.trace_samples} probes) of the "
            f"cross-entropy on the first {config.sharpness.num_examples} training examples, "
            "evaluation mode, same random start for every run.",
            "Worker mode (tasks.<t>.workers = W, e.g. with --devices W): every worker perturbs "
            "with its own batch's gradient and only the final gradient is averaged "
            "(m-sharpness with m = the per-worker batch, as the official SAM code per device).",
            "ASAM uses optlab's default normalisation (the official ASAM code's: |w| + eta on "
            "weights, identity on biases).",
        ],
        config=config.to_dict(),
    )


validate, plan, run = st.runner_functions(build_study)

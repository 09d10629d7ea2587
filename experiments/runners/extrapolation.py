"""The `extrapolation` experiment: EXTRAP-SGD and its variants over a batch-size sweep.

Every batch size is a task trained for the same number of epochs, with the linear
learning-rate scaling rule (``learning_rate * b / base_batch_size``, Goyal et al. 2017), a
linear warm-up and then cosine or step decay; extrapolation methods tie their step to the
schedule, ``gamma_t = gamma_ratio * lr_t``, with ``gamma_ratio`` tuned on the validation
split per batch size. Claims: at the largest batch each method beats SGD in test accuracy,
and between the smallest and the largest batch it loses less accuracy than SGD (the
per-seed ``drop``, paired).

Past and noise extrapolation keep the extrapolated point as the loop's params; they are
evaluated at the true iterate (``optlab.extrapolation_eval_params``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import optax

import optlab
from experiments import study as st
from experiments.registry import get_experiment
from experiments.train import TrainState

NAME = "extrapolation"
CLAIM = get_experiment(NAME).claim
TRANSFORMS = ("none", "extrapolation")
DIRECTIONS = ("gradient", "past", "noise")
BASE_OPTIMIZERS = ("sgd", "momentum", "nesterov")
SCHEDULES = ("warmup_cosine", "warmup_step")


def lr_schedule(
    peak: Any, *, steps: int, warmup_steps: int, kind: str, decay_fractions: Sequence[float] = ()
) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine or step (x0.1) decay."""
    warmup_steps = min(warmup_steps, steps - 1) if steps > 1 else 0
    if kind == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, max(warmup_steps, 1), max(steps, warmup_steps + 2)
        )
    if kind == "warmup_step":
        # join_schedules hands the decay schedule the steps counted from the warm-up's end.
        boundaries: dict[int, float] = {}
        for f in decay_fractions:
            at = int(f * steps) - warmup_steps
            if 0 < at < steps - warmup_steps:
                boundaries[at] = boundaries.get(at, 1.0) * 0.1
        decay = optax.piecewise_constant_schedule(peak, boundaries)
        if not warmup_steps:
            return decay
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps]
        )
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}.")


def make_tx(spec: Mapping[str, Any], ctx: st.TxContext) -> optax.GradientTransformation:
    """One method at one batch size: the scaled, warmed-up rate; gamma tied to it."""
    per_epoch = max(ctx.steps // max(ctx.task.epochs, 1), 1)
    peak = spec["learning_rate"] * ctx.batch_size / spec["base_batch_size"]
    lr = lr_schedule(
        peak,
        steps=ctx.steps,
        warmup_steps=spec.get("warmup_epochs", 0) * per_epoch,
        kind=spec["schedule"],
        decay_fractions=spec.get("decay_fractions", ()),
    )
    name = spec["optimizer"]
    momentum = None if name == "sgd" else spec.get("momentum", 0.9)
    base = optax.sgd(lr, momentum=momentum, nesterov=name == "nesterov")
    if spec.get("weight_decay", 0.0):  # coupled L2, as in the paper's SGD
        base = optax.chain(optax.add_decayed_weights(spec["weight_decay"]), base)
    if spec.get("transform", "none") == "none":
        return base
    ratio = spec["gamma_ratio"]
    stop = spec.get("stop_epoch", 0) * per_epoch
    return optlab.extrapolation(
        base,
        lambda count: ratio * lr(count),
        direction=spec.get("direction", "gradient"),
        stop_after=stop or None,
    )


def eval_params(state: TrainState) -> Any:
    """The true iterate: past/noise extrapolation keeps ``x + offset`` as the loop's params."""
    return optlab.extrapolation_eval_params(state.params, state.opt_state)


def _validate(method: st.Method) -> None:
    spec, where = method.spec, f"methods.{method.name}"
    checks = [
        ("optimizer", spec.get("optimizer") in BASE_OPTIMIZERS, f"one of {BASE_OPTIMIZERS}"),
        ("schedule", spec.get("schedule") in SCHEDULES, f"one of {SCHEDULES}"),
        ("transform", spec.get("transform", "none") in TRANSFORMS, f"one of {TRANSFORMS}"),
        (
            "learning_rate",
            isinstance(spec.get("learning_rate"), float) and spec["learning_rate"] > 0,
            "> 0",
        ),
        (
            "base_batch_size",
            isinstance(spec.get("base_batch_size"), int) and spec["base_batch_size"] >= 1,
            ">= 1",
        ),
        ("warmup_epochs", spec.get("warmup_epochs", 0) >= 0, ">= 0"),
    ]
    if spec.get("transform") == "extrapolation":
        checks += [
            ("direction", spec.get("direction", "gradient") in DIRECTIONS, f"one of {DIRECTIONS}"),
            (
                "gamma_ratio",
                all(v >= 0 for v in method.axes.get("gamma_ratio", (spec.get("gamma_ratio", -1),))),
                ">= 0",
            ),
        ]
    for field, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{where}.{field} must be {allowed}, got {spec.get(field)!r}.")


def build_study(config: ml_collections.ConfigDict) -> st.Study:
    methods = st.methods_from_config(config)
    for m in methods:
        _validate(m)
    tasks = st.tasks_from_config(config)
    if any(t.epochs < 1 for t in tasks):
        raise ValueError("every task needs epochs >= 1: the sweep compares equal epochs.")
    return st.Study(
        name=NAME,
        claim=CLAIM,
        tasks=tasks,
        methods=methods,
        seeds=tuple(config.seeds),
        make_tx=make_tx,
        claims=st.claims_from_config(config, methods),
        eval_params=lambda m: eval_params if m.spec.get("transform") == "extrapolation" else None,
        notes=[
            "Equal epochs at every batch size; linear learning-rate scaling with warm-up; "
            "gamma_t = gamma_ratio * lr_t. EXTRAP-SGD costs two gradients per step, the past "
            "and noise variants one.",
            "gamma_ratio is tuned per batch size on the validation split (reported above).",
        ],
        config=config.to_dict(),
    )


validate, plan, run = st.runner_functions(build_study)

"""Optimizers named in configs: a spec (ConfigDict) to an optax transform.

A spec is ``{"optimizer": "sgd" | "momentum" | "nesterov" | "adam" | "adamw",
"learning_rate": float, "momentum": float, "weight_decay": float, "b1": ..., "b2": ...}``
with a learning-rate ``schedule`` of ``"constant"``, ``"cosine"``, ``"warmup_cosine"`` or
``"step"`` (x0.2 at 30, 60 and 80 % of the steps). Rates may be traced values (a grid
trained vectorized); ``weight_decay`` and the structural fields must be Python values.
Later experiments wrap these base optimizers (e.g. ``optlab.lookahead(base, ...)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")
# The CIFAR step schedule of the Lookahead / WRN recipes [recall]: x0.2 at 30, 60, 80 %.
STEP_FRACTIONS = (0.3, 0.6, 0.8)
STEP_FACTOR = 0.2


def make_schedule(
    learning_rate: float, *, schedule: str, steps: int, warmup_steps: int = 0
) -> optax.Schedule | float:
    """The learning rate as a constant or an optax schedule over ``steps``."""
    if schedule == "constant":
        if warmup_steps:
            return optax.linear_schedule(0.0, learning_rate, warmup_steps)
        return learning_rate
    if schedule == "cosine":
        return optax.cosine_decay_schedule(learning_rate, steps)
    if schedule == "step":
        boundaries = {max(int(f * steps), 1): STEP_FACTOR for f in STEP_FRACTIONS}
        return optax.piecewise_constant_schedule(learning_rate, boundaries)
    if schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, max(warmup_steps, 1), max(steps, warmup_steps + 1)
        )
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")


def make_optimizer(spec: Mapping[str, Any], *, steps: int) -> optax.GradientTransformation:
    """Builds the base optimizer a method spec names (see module docstring)."""
    name = spec["optimizer"]
    lr = make_schedule(
        spec["learning_rate"],
        schedule=spec.get("schedule", "constant"),
        steps=steps,
        warmup_steps=spec.get("warmup_steps", 0),
    )
    weight_decay = spec.get("weight_decay", 0.0)
    if name in ("sgd", "momentum", "nesterov"):
        momentum = None if name == "sgd" else spec.get("momentum", 0.9)
        tx = optax.sgd(lr, momentum=momentum, nesterov=name == "nesterov")
        if weight_decay:  # coupled L2, as in the papers' SGD baselines
            tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
        return tx
    if name == "adam":
        tx = optax.adam(lr, b1=spec.get("b1", 0.9), b2=spec.get("b2", 0.999))
        if weight_decay:
            tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
        return tx
    if name == "adamw":
        return optax.adamw(
            lr, b1=spec.get("b1", 0.9), b2=spec.get("b2", 0.999), weight_decay=weight_decay
        )
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")


def validate_spec(method: str, spec: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` naming ``methods.<method>.<field>`` for a bad spec."""
    prefix = f"methods.{method}"
    if spec.get("optimizer") not in OPTIMIZERS:
        raise ValueError(
            f"{prefix}.optimizer must be one of {OPTIMIZERS}, got {spec.get('optimizer')!r}."
        )
    lr = spec.get("learning_rate")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"{prefix}.learning_rate must be > 0, got {lr!r}.")
    if spec.get("schedule", "constant") not in SCHEDULES:
        raise ValueError(
            f"{prefix}.schedule must be one of {SCHEDULES}, got {spec.get('schedule')!r}."
        )
    momentum = spec.get("momentum", 0.9)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{prefix}.momentum must lie in [0, 1), got {momentum!r}.")
    if spec.get("weight_decay", 0.0) < 0:
        raise ValueError(f"{prefix}.weight_decay must be >= 0, got {spec['weight_decay']!r}.")
    if spec.get("warmup_steps", 0) < 0:
        raise ValueError(f"{prefix}.warmup_steps must be >= 0, got {spec['warmup_steps']!r}.")

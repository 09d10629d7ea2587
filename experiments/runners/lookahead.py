"""The `lookahead` experiment: Lookahead and Multilayer Lookahead against their inner optimizer.

Claims, per task, on the same data, seeds, budget and footing (the inner optimizer's
momentum, weight decay and schedule are the same for every wrapper):

1. Lookahead >= its inner optimizer (SGD with momentum, Adam) in final test accuracy
   (Zhang et al. 2019);
2. Multilayer Lookahead >= Lookahead (Pushkin & Barba 2021);
3. Lookahead is less sensitive to the learning rate than its inner optimizer: the methods
   with a ``learning_rate`` axis are trained over it, and the claim is judged on the
   per-seed spread of final test accuracy over the grid, guarded by the worst and the mean
   accuracy over the grid (a uniformly worse method cannot win as "less sensitive").

Lookahead methods are evaluated on their slowest weights (``optlab.slow_params``); the
inner optimizers on their params.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import optlab
from experiments import study as st
from experiments.optimizers import make_optimizer, validate_spec
from experiments.registry import get_experiment
from experiments.train import TrainState

NAME = "lookahead"
CLAIM = get_experiment(NAME).claim
LOOKAHEAD_KEYS = ("levels", "momentum")


def levels_of(spec: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    """The ``((k, alpha), ...)`` levels of a method spec; ``()`` for a plain optimizer."""
    la = spec.get("lookahead")
    return tuple((int(k), float(a)) for k, a in la["levels"]) if la else ()


def make_tx(spec: Mapping[str, Any], ctx: st.TxContext) -> optax.GradientTransformation:
    """The spec's base optimizer, wrapped in (Multilayer) Lookahead if it has ``lookahead``."""
    base = make_optimizer(spec, steps=ctx.steps)
    levels = levels_of(spec)
    if not levels:
        return base
    momentum = spec["lookahead"].get("momentum", "keep")
    if len(levels) == 1:
        ((k, alpha),) = levels
        return optlab.lookahead(base, sync_period=k, alpha=alpha, momentum=momentum)
    return optlab.multilayer_lookahead(base, levels=levels, momentum=momentum)


def slow_weights(state: TrainState) -> Any:
    return optlab.slow_params(state.opt_state)


def _validate(method: st.Method) -> None:
    validate_spec(method.name, method.spec)
    la = method.spec.get("lookahead")
    if la is None:
        return
    prefix = f"methods.{method.name}.lookahead"
    unknown = sorted(set(la) - set(LOOKAHEAD_KEYS))
    if unknown:
        raise ValueError(f"{prefix}: unknown keys {unknown}; known: {list(LOOKAHEAD_KEYS)}.")
    levels = la.get("levels")
    if isinstance(levels, str) or not isinstance(levels, Sequence) or not levels:
        raise ValueError(
            f"{prefix}.levels must be ((k, alpha), ...) with >= 1 level, got {levels!r}."
        )
    for i, level in enumerate(levels):
        if isinstance(level, str) or not isinstance(level, Sequence) or len(level) != 2:
            raise ValueError(f"{prefix}.levels[{i}] must be a (k, alpha) pair, got {level!r}.")
    try:  # optlab validates its arguments (and the momentum buffer) at construction / init
        ctx = st.TxContext(None, 1, None, 10)  # type: ignore[arg-type]
        jax.eval_shape(
            make_tx(method.spec, ctx).init, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
        )
    except ValueError as error:
        raise ValueError(f"{prefix}: {error}") from None


def describe(spec: Mapping[str, Any]) -> str:
    """E.g. ``"momentum lr 0.05 + 2-level Lookahead (k=5, alpha=0.5), (k=5, alpha=0.5)"``."""
    text = f"{spec['optimizer']} lr {spec['learning_rate']:g}"
    levels = levels_of(spec)
    if levels:
        kind = "Lookahead" if len(levels) == 1 else f"{len(levels)}-level Lookahead"
        text += f" + {kind} " + ", ".join(f"(k={k}, alpha={a:g})" for k, a in levels)
    return text


def build_study(config: ml_collections.ConfigDict) -> st.Study:
    methods = st.methods_from_config(config)
    for m in methods:
        _validate(m)
    methods = tuple(
        m if m.label else st.Method(m.name, m.spec, m.axes, m.tune, describe(m.spec))
        for m in methods
    )
    return st.Study(
        name=NAME,
        claim=CLAIM,
        tasks=st.tasks_from_config(config),
        methods=methods,
        seeds=tuple(config.seeds),
        make_tx=make_tx,
        claims=st.claims_from_config(config, methods),
        eval_params=lambda m: slow_weights if levels_of(m.spec) else None,
        notes=[
            "Lookahead methods are evaluated on their slowest weights (optlab.slow_params), "
            "the inner optimizers on their params; the curves' training loss is the "
            "mini-batch loss of the fast weights.",
            "Methods: " + "; ".join(f"{m.name} = {m.label}" for m in methods) + ".",
        ],
        config=config.to_dict(),
    )


validate, plan, run = st.runner_functions(build_study)

"""The `dpf` experiment: Dynamic Pruning with Feedback against dense training and pruning
without feedback.

Every method trains on the same data, seeds, budget and footing (the same base optimizer,
learning-rate schedule and weight decay); the pruned methods differ only in ``feedback``:

- ``dense``: the base optimizer alone;
- ``dpf``: ``optlab.dpf`` (the gradient at the pruned weights updates every dense weight,
  so pruned weights can come back);
- ``gmp``: ``optlab.dpf(..., feedback=False)``, gradual magnitude pruning (Zhu & Gupta):
  the gradient and the update are masked and pruned weights are zeroed, never to return.

Both pruned methods use the paper's schedule: cubic from 0 to the target sparsity over the
first ``end_fraction`` of the steps, a global magnitude mask over the kernels (all but the
classifier head) refreshed every ``mask_every`` steps, then frozen. The sparsity levels are
a float axis (``target_sparsity``) trained vectorized with the seeds. Pruned methods are
evaluated on their pruned weights (``optlab.masked_params``), and the sparsity reached is
measured on them.

The study's train step takes the loss and gradient at the params (the dense weights); the
pruned methods need the gradient at the pruned weights, so they are wrapped to take it from
the step's ``grad_fn`` at ``optlab.masked_params``: a second loss and gradient per step (the
step's own, at the dense weights, is unused but for the logged loss, so XLA may drop its
backward pass). Their logged mini-batch training loss is therefore the dense weights' loss;
the final ``train_loss`` is measured on the pruned weights.
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
from experiments.optimizers import make_optimizer, validate_spec
from experiments.registry import get_experiment
from experiments.train import TrainState

NAME = "dpf"
CLAIM = get_experiment(NAME).claim
PRUNING = ("none", "dpf", "gmp")
PRUNING_KEYS = ("target_sparsity", "mask_every", "end_fraction", "sparsity_schedule")


def prunable(path: tuple[Any, ...], leaf: Any) -> bool:
    """The kernels (rank >= 2) of every layer but the classifier ``head`` (the paper's
    reproductions prune conv/dense kernels and keep the final classifier dense)."""
    return jnp.ndim(leaf) >= 2 and "head" not in jax.tree_util.keystr(path)


def at_pruned_weights(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Feeds ``tx`` (a DPF transform) the gradient at its pruned weights, taken with the
    train step's ``grad_fn`` (the step's own gradient at the dense weights is dropped)."""

    def update(updates, state, params=None, *, grad_fn=None, **extra):
        del updates
        if grad_fn is None or params is None:
            raise ValueError("the dpf runner's pruned methods need params and grad_fn.")
        grads = grad_fn(optlab.masked_params(state, params))
        return tx.update(grads, state, params, **extra)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def make_tx(spec: Mapping[str, Any], ctx: st.TxContext) -> optax.GradientTransformation:
    """The spec's base optimizer, pruned by DPF or GMP if ``pruning`` says so."""
    base = make_optimizer(spec, steps=ctx.steps)
    pruning = spec.get("pruning", "none")
    if pruning == "none":
        return base
    if pruning not in PRUNING:
        raise ValueError(f"pruning must be one of {PRUNING}, got {pruning!r}.")
    tx = optlab.dpf(
        base,
        spec["target_sparsity"],
        end_step=max(1, round(spec.get("end_fraction", 0.75) * ctx.steps)),
        mask_every=spec.get("mask_every", 16),
        schedule=spec.get("sparsity_schedule", "cubic"),
        prunable=prunable,
        feedback=pruning == "dpf",
    )
    return at_pruned_weights(tx)


def pruned_weights(state: TrainState) -> Any:
    return optlab.masked_params(state.opt_state, state.params)


def sparsity_reached(data: st.TaskData, method, spec, params, model_state) -> dict[str, Any]:
    """The ``final_metrics`` hook: the sparsity of the evaluated weights, per run."""
    del data, method, spec, model_state
    report = _stacked_sparsity(params)
    return {"sparsity": report.prunable, "sparsity_overall": report.overall}


# One jitted function for every group (a compile per params shape and group size).
_stacked_sparsity = jax.jit(jax.vmap(lambda p: optlab.sparsity(p, prunable=prunable)))


def _validate(method: st.Method, task: st.Task) -> None:
    spec = method.spec
    validate_spec(method.name, spec)
    pruning = spec.get("pruning", "none")
    if pruning not in PRUNING:
        raise ValueError(
            f"methods.{method.name}.pruning must be one of {PRUNING}, got {pruning!r}."
        )
    if pruning == "none":
        extra = sorted(k for k in PRUNING_KEYS if k in spec)
        if extra:
            raise ValueError(f"methods.{method.name}: {extra} need pruning='dpf' or 'gmp'.")
        return
    end_fraction = spec.get("end_fraction", 0.75)
    if not 0.0 < end_fraction <= 1.0:
        raise ValueError(
            f"methods.{method.name}.end_fraction must lie in (0, 1], got {end_fraction!r}."
        )
    try:  # optlab validates its own arguments at construction time
        for point in st.points(method):
            make_tx({**spec, **point}, st.TxContext(task, 100, None, 10))
    except (ValueError, KeyError) as error:
        raise ValueError(f"methods.{method.name}: {error}") from None


def describe(spec: Mapping[str, Any]) -> str:
    """E.g. ``"momentum lr 0.05 + DPF (cubic to 90 %, mask every 16)"``."""
    text = f"{spec['optimizer']} lr {spec['learning_rate']:g}"
    pruning = spec.get("pruning", "none")
    if pruning != "none":
        kind = "DPF" if pruning == "dpf" else "gradual magnitude pruning (no feedback)"
        text += (
            f" + {kind} ({spec.get('sparsity_schedule', 'cubic')} to the target sparsity over the "
            f"first {spec.get('end_fraction', 0.75):.0%} of the steps, mask every "
            f"{spec.get('mask_every', 16)})"
        )
    return text


def build_study(config: ml_collections.ConfigDict) -> st.Study:
    tasks = st.tasks_from_config(config)
    methods = st.methods_from_config(config)
    for m in methods:
        _validate(m, tasks[0])
    methods = tuple(
        m if m.label else st.Method(m.name, m.spec, m.axes, m.tune, describe(m.spec))
        for m in methods
    )
    return st.Study(
        name=NAME,
        claim=CLAIM,
        tasks=tasks,
        methods=methods,
        seeds=tuple(config.seeds),
        make_tx=make_tx,
        claims=st.claims_from_config(config, methods),
        eval_params=lambda m: pruned_weights if m.spec.get("pruning", "none") != "none" else None,
        final_metrics=sparsity_reached,
        table_metrics=("test_accuracy", "val_accuracy", "sparsity", "sparsity_overall"),
        notes=[
            "Pruned methods are evaluated on their pruned weights (optlab.masked_params); "
            "`sparsity` is the fraction of zero weights over the pruned tensors (the "
            "kernels of every layer but the head), `sparsity_overall` over all parameters.",
            "Same footing: one base optimizer, schedule and weight decay for every method; "
            "the pruned methods take their gradient at the pruned weights through the "
            "step's grad_fn (a second loss and gradient per step: equal steps, not equal "
            "compute), and their logged mini-batch loss is the dense weights' loss.",
            "Methods: " + "; ".join(f"{m.name} = {m.label}" for m in methods) + ".",
        ],
        config=config.to_dict(),
    )


validate, plan, run = st.runner_functions(build_study)

"""The `width` experiment: do wider networks tolerate larger batches than deeper ones?

Methods are MLP architectures of (nearly) the same parameter count, one wide and shallow,
one narrow and deep (``spec["model"] = "mlp_<width>x<depth>"``); tasks are batch sizes on
the same data. Every (architecture, batch size) trains with momentum SGD at a constant
learning rate (scaled with the batch by ``lr_scaling`` from ``base_batch_size``), tuned
per batch size on the validation split, for the same number of epochs; the training
accuracy on the whole training split is measured at every epoch end
(:class:`experiments.runners.divebatch.EpochTracker`), giving the epochs (and steps) to
the task's target training accuracy. At initialisation (each seed's initial weights), the
gradient diversity ``Σ‖g_i‖² / ‖Σ g_i‖²`` of the cross-entropy over the whole training
split is measured exactly (``optlab.gradient_diversity_update_from_loss``, in chunks).

Claims (Chen et al., NeurIPS 2018): the wider network has the larger gradient diversity
at initialisation, and its epochs to target grow less from the smallest to the largest
batch (the ``drop`` of ``epochs_to_target`` over the batch-size tasks). The notes add,
per architecture, the largest batch size whose epochs to target are no more than the
smallest batch's (mean over seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import optlab
from experiments import study as st
from experiments.models import make_model, param_count
from experiments.registry import get_experiment
from experiments.runners.divebatch import TARGET_METRICS, Hooks, _validate, check_tasks, make_tx

NAME = "width"
CLAIM = get_experiment(NAME).claim


def diversity_at_init_fn(data: st.TaskData, model_name: str, chunk_size: int):
    """``seed -> Δ`` of the cross-entropy over the whole training split at ``key(seed)``."""
    model = make_model(model_name, num_classes=data.dataset.num_classes)
    batch = {"x": jnp.asarray(data.dataset.x_train), "y": jnp.asarray(data.dataset.y_train)}
    x_example = batch["x"][:1]

    @jax.jit
    def diversity(key):
        params, model_state = model.init(key, x_example)

        def loss(p, example):
            logits, _ = model.apply(p, model_state, example["x"][None], train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"][None])[0]

        acc = optlab.gradient_diversity_init(params)
        acc = optlab.gradient_diversity_update_from_loss(
            acc, loss, params, batch, chunk_size=chunk_size
        )
        return optlab.gradient_diversity_result(acc)

    return lambda seed: float(diversity(jax.random.key(seed)))


class WidthHooks(Hooks):
    """The epoch tracker of :mod:`divebatch`, plus the diversity at initialisation."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.diversity: dict[tuple[str, str], Any] = {}
        self.cache: dict[tuple[str, str], dict[int, float]] = {}

    def final_metrics(self, data, method, spec, params, model_state) -> dict[str, Any]:
        out = super().final_metrics(data, method, spec, params, model_state)
        key = (data.task.dataset, spec["model"])  # the same for every batch-size task
        if key not in self.diversity:
            self.diversity[key] = diversity_at_init_fn(data, spec["model"], self.config.chunk_size)
            self.cache[key] = {}
        seeds = [seed for _ in st.points(method) for seed in self.config.seeds]
        for seed in set(seeds):
            if seed not in self.cache[key]:
                self.cache[key][seed] = self.diversity[key](seed)
        out["diversity_at_init"] = np.array([self.cache[key][s] for s in seeds])
        return out


def tolerated_batch(records: Sequence[dict[str, Any]], tasks: Sequence[st.Task]) -> list[str]:
    """Per method: the largest batch whose epochs to target are <= the smallest batch's.

    Per (batch size, method) the learning rate with the fewest mean epochs to target over
    the seeds (tuning for speed, as the paper does); then per seed, the largest batch
    whose epochs are no more than the smallest batch's; mean ± std over seeds.
    """
    sizes = sorted(tasks, key=lambda t: t.batch_size)
    lines = []
    for method in sorted({r["method"] for r in records}):
        epochs: dict[str, dict[int, float]] = {}
        for task in sizes:
            rows = [r for r in records if r["method"] == method and r["task"] == task.name]
            by_point: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                by_point.setdefault(st.point_label(r["point"]), []).append(r)
            if not by_point:
                continue
            fastest = min(
                by_point.values(), key=lambda rs: np.nanmean([r["epochs_to_target"] for r in rs])
            )
            epochs[task.name] = {r["seed"]: r["epochs_to_target"] for r in fastest}
        if sizes[0].name not in epochs:
            continue
        best = []
        for seed, base in epochs[sizes[0].name].items():
            ok = [
                t.batch_size
                for t in sizes
                if t.name in epochs and epochs[t.name].get(seed, np.inf) <= base
            ]
            best.append(max(ok))
        lines.append(
            f"{method}: largest batch reaching the target in no more epochs than batch "
            f"{sizes[0].batch_size} (learning rate per batch size: the fastest on average): "
            f"{np.mean(best):.0f} ± {np.std(best):.0f} over seeds (per seed {best})."
        )
    return lines


def build_study(config: ml_collections.ConfigDict) -> st.Study:
    tasks = st.tasks_from_config(config)
    methods = st.methods_from_config(config)
    check_tasks(config, tasks)
    if config.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {config.chunk_size}.")
    for t in tasks:
        for m in methods:
            if not m.spec.get("model"):
                raise ValueError(f"methods.{m.name}.model must name an MLP, e.g. mlp_256x1.")
            if m.spec.get("rule", "fixed") != "fixed":
                raise ValueError(f"methods.{m.name}.rule must be 'fixed' in this experiment.")
            _validate(m, None, t.batch_size)
    hooks = WidthHooks(config)
    counts = []
    for m in methods:
        model = make_model(m.spec["model"], num_classes=10)
        params, _ = jax.eval_shape(
            lambda k, model=model: model.init(k, jnp.zeros((1, *config.input_shape))),
            jax.random.key(0),
        )
        counts.append(f"{m.name} ({m.spec['model']}): {param_count(params)} parameters")

    def notes(records: Sequence[dict[str, Any]]) -> list[str]:
        return [
            "Architectures: " + "; ".join(counts) + f" (for inputs {tuple(config.input_shape)}).",
            "Each batch size is its own task: the learning rate is tuned per batch size and "
            "architecture on the validation split (by validation accuracy, the study's rule); "
            "epochs_to_target counts epochs until the training accuracy on the whole training "
            "split first reaches the target, censored at one epoch past the budget.",
            "diversity_at_init: Σ‖g_i‖² / ‖Σ g_i‖² over the whole training split at each "
            "seed's initial weights (evaluation mode, no L2 term); the same for every task.",
            *tolerated_batch(records, tasks),
        ]

    return st.Study(
        name=NAME,
        claim=CLAIM,
        tasks=tasks,
        methods=methods,
        seeds=tuple(config.seeds),
        make_tx=make_tx,
        claims=st.claims_from_config(config, methods),
        make_plan=hooks.make_plan,
        final_metrics=hooks.final_metrics,
        table_metrics=(
            "diversity_at_init",
            *TARGET_METRICS[:2],
            "reached_target",
            "test_accuracy",
            "train_accuracy",
        ),
        notes=notes,
        config=config.to_dict(),
    )


validate, plan, run = st.runner_functions(build_study)

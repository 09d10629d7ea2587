"""The `divebatch` experiment: does a diversity-driven batch size converge faster?

Four ways to choose the batch size, on the same data, seeds, epoch budget and footing
(momentum SGD, a constant learning rate tuned on the validation split per method, the
same linear scaling of the rate with the batch, ``optlab.scale_by_batch_size``):

- ``sgd_small`` and ``sgd_large``: a fixed small and a fixed large batch;
- ``adabatch``: the batch multiplied by 2 every ``every`` epochs up to ``B_max``
  (``optlab.adabatch_batch_size``);
- ``divebatch``: every ``resize_every`` epochs the batch becomes
  ``clip(δ·n·Δ̂, B, B_max)`` (``optlab.divebatch``), with the gradient diversity ``Δ̂``
  measured at the run's current weights on a fixed subset of training examples
  (``optlab.gradient_diversity_update_from_loss``, in chunks).

Every batch is a whole number of micro-batches of the small batch, accumulated in one
compiled step (``experiments.train.plans.EpochBatchPlan``): nothing recompiles when a
batch grows. At every epoch end of every run the validation accuracy is measured; the
records hold the epochs, optimizer steps, examples (gradient evaluations, the diversity
probes included) and training wall time until the validation accuracy first reaches the
task's ``target``, and the final test accuracy. A run that never reaches the target counts
as reaching it one epoch after its budget (a censored lower bound, stated in the notes).

The diversity estimator deviates from the public DiveBatch code, which accumulates
per-example squared norms and batch-gradient sums over the resize epoch (gradients at
different iterates); here it is Yin et al.'s diversity at one point, the quantity of the
``B <= δ·n·Δ`` bound, measured on the first ``k = probe.diversity_examples`` training
examples and carried over to all ``n``: ``δ·n·Δ_n = δ·S/‖ḡ‖²`` (``S`` the mean squared
per-example norm, ``ḡ`` the mean gradient) and ``k·Δ_k`` estimates the same ratio, so
the controller receives ``Δ_n ≈ (k/n)·Δ_k``. ``δ = 1`` then allows batches up to the
gradient noise scale ``S/‖ḡ‖²`` (McCandlish et al.'s simple noise scale).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import optlab
from experiments import study as st
from experiments.models import make_model
from experiments.optimizers import make_optimizer, validate_spec
from experiments.registry import get_experiment
from experiments.train.plans import EpochBatchPlan

NAME = "divebatch"
CLAIM = get_experiment(NAME).claim
RULES = ("fixed", "adabatch", "divebatch")
TARGET_METRICS = (
    "epochs_to_target",
    "steps_to_target",
    "examples_to_target",
    "time_to_target_s",
    "reached_target",
)


def make_tx(spec: Mapping[str, Any], ctx: st.TxContext) -> optax.GradientTransformation:
    """The base optimizer (constant rate for ``base_batch_size``) scaled with the batch."""
    base = make_optimizer({**spec, "schedule": "constant"}, steps=ctx.steps)
    return optax.chain(
        base, optlab.scale_by_batch_size(spec["base_batch_size"], spec.get("lr_scaling", "linear"))
    )


def _validate(method: st.Method, data_size: int | None, micro: int) -> None:
    spec = method.spec
    validate_spec(method.name, spec)
    rule = spec.get("rule", "fixed")
    if rule not in RULES:
        raise ValueError(f"methods.{method.name}.rule must be one of {RULES}, got {rule!r}.")
    for key in ("batch_size", "max_batch_size"):
        value = spec.get(key, spec.get("batch_size", micro))
        if not isinstance(value, int) or value < micro or value % micro:
            raise ValueError(
                f"methods.{method.name}.{key} must be a multiple of the task batch size "
                f"({micro}, the micro-batch), got {value!r}."
            )
    try:
        optlab.scale_by_batch_size(spec.get("base_batch_size", 0), spec.get("lr_scaling", "linear"))
        if rule == "divebatch":
            optlab.divebatch(
                data_size or 10**9,
                delta=spec.get("delta", 0.0),
                min_batch_size=spec.get("batch_size", micro),
                max_batch_size=spec.get("max_batch_size", micro),
                resize_every=spec.get("resize_every", 0),
                multiple_of=micro,
            )
        if rule == "adabatch":
            optlab.adabatch_batch_size(
                0,
                initial_batch_size=spec.get("batch_size", micro),
                max_batch_size=spec.get("max_batch_size", micro),
                every=spec.get("every", 0),
            )
    except (ValueError, KeyError) as error:
        raise ValueError(f"methods.{method.name}: {error}") from None


class EpochTracker:
    """One group's measurements at every run's epoch ends, and its batch-size decisions.

    Used as the ``decide`` of an :class:`EpochBatchPlan`: for every run that ends an
    epoch it records the epoch, the run's own step count, the examples it has trained on
    (whole batches; plus the diversity probes' per-example gradients), the group's
    training wall time so far (without the time spent here) and the ``accuracy_on``
    accuracy; then it sets the run's next batch size by ``spec["rule"]``.
    """

    def __init__(self, data: st.TaskData, spec: Mapping[str, Any], probe: Any, n_runs: int):
        # Without its own batch_size a method trains at the task's (the micro-batch).
        self.spec = {"batch_size": data.batch_size, **spec}
        self.spec.setdefault("max_batch_size", self.spec["batch_size"])
        self.micro = data.batch_size
        self.n = len(data.dataset.x_train)
        self.epochs = data.task.epochs
        self.rule = spec.get("rule", "fixed")
        self.target = float(probe.targets[data.task.name])
        model = make_model(spec.get("model") or data.task.model, data.dataset.num_classes)
        if probe.accuracy_on == "val" and len(data.x_val):
            x_acc, y_acc = data.x_val, data.y_val
        else:
            x_acc, y_acc = data.dataset.x_train, data.dataset.y_train
        self.accuracy = _accuracy_fn(model, x_acc, y_acc)
        k = min(int(probe.diversity_examples), self.n)
        self.diversity = _diversity_fn(
            model, data.dataset.x_train[:k], data.dataset.y_train[:k], int(probe.chunk_size)
        )
        self.probe_examples = k
        self.controller = None
        if self.rule == "divebatch":
            self.controller = optlab.divebatch(
                self.n,
                delta=spec["delta"],
                min_batch_size=self.spec["batch_size"],
                max_batch_size=self.spec["max_batch_size"],
                resize_every=spec["resize_every"],
                multiple_of=self.micro,
            )
        self.log: list[list[dict[str, float]]] = [[] for _ in range(n_runs)]
        self.batch = [int(self.spec["batch_size"]) for _ in range(n_runs)]
        self.examples = [0 for _ in range(n_runs)]  # gradient evaluations so far
        self.started = time.perf_counter()
        self.own_time = 0.0

    def plan(self) -> EpochBatchPlan:
        return EpochBatchPlan(
            self.n,
            self.micro,
            int(self.spec.get("max_batch_size", self.spec["batch_size"])) // self.micro,
            self.epochs,
            initial_micro=int(self.spec["batch_size"]) // self.micro,
            decide=self.decide,
        )

    def decide(self, ended: list[tuple[int, int]], state: Any, step: int) -> list[int]:
        tick = time.perf_counter()
        wall = tick - self.started - self.own_time
        del step
        steps = np.asarray(state.step)
        out = []
        for run, epoch in ended:
            params, model_state = jax.tree.map(
                lambda a, r=run: a[r], (state.params, state.model_state)
            )
            accuracy = float(self.accuracy(params, model_state))
            done = epoch + 1
            new = self.batch[run]
            # The epoch's steps times its batch (the remainder of the epoch is dropped).
            self.examples[run] += (self.n // new) * new
            diversity = float("nan")
            if self.rule == "adabatch":
                new = optlab.adabatch_batch_size(
                    done,
                    initial_batch_size=int(self.spec["batch_size"]),
                    max_batch_size=int(self.spec["max_batch_size"]),
                    every=int(self.spec["every"]),
                )
            elif self.rule == "divebatch" and done % int(self.spec["resize_every"]) == 0:
                assert self.controller is not None
                # Δ over the probe's k examples, as an estimate of Δ over all n:
                # δ·n·Δ_n = δ·S/‖ḡ‖² (S the mean squared norm, ḡ the mean gradient), and
                # k·Δ_k estimates the same S/‖ḡ‖², so Δ_n ≈ (k/n)·Δ_k.
                diversity = (
                    float(self.diversity(params, model_state)) * self.probe_examples / self.n
                )
                self.examples[run] += self.probe_examples
                new = int(self.controller.batch_size_for(diversity, self.batch[run]))
            self.log[run].append(
                {
                    "epoch": done,
                    "step": int(steps[run]),
                    "examples": self.examples[run],
                    "time": wall,
                    "accuracy": accuracy,
                    "batch_size": self.batch[run],
                    "diversity": diversity,
                }
            )
            self.batch[run] = new
            out.append(new // self.micro)
        self.own_time += time.perf_counter() - tick
        return out

    def metrics(self) -> dict[str, np.ndarray]:
        """Per run: the target metrics (censored one epoch past the budget), final batch."""
        out: dict[str, list[float]] = {k: [] for k in (*TARGET_METRICS, "final_batch_size")}
        for log in self.log:
            hit = next((e for e in log if e["accuracy"] >= self.target), None)
            last = log[-1]
            if hit is None:  # censored: one more epoch at the last epoch's pace
                scale = (last["epoch"] + 1) / last["epoch"]
                hit = {
                    "epoch": last["epoch"] + 1,
                    "step": last["step"] * scale,
                    "examples": last["examples"] * scale,
                    "time": last["time"] * scale,
                }
                out["reached_target"].append(0.0)
            else:
                out["reached_target"].append(1.0)
            out["epochs_to_target"].append(float(hit["epoch"]))
            out["steps_to_target"].append(float(hit["step"]))
            out["examples_to_target"].append(float(hit["examples"]))
            out["time_to_target_s"].append(float(hit["time"]))
            out["final_batch_size"].append(float(last["batch_size"]))
        return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _accuracy_fn(model: Any, x: np.ndarray, y: np.ndarray):
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def accuracy(params, model_state):
        logits, _ = model.apply(params, model_state, xs, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == ys)

    return accuracy


def _diversity_fn(model: Any, x: np.ndarray, y: np.ndarray, chunk_size: int):
    """``(params, model_state) -> Δ`` of the cross-entropy over ``(x, y)``, evaluation mode."""
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}

    @jax.jit
    def diversity(params, model_state):
        def loss(p, example):
            logits, _ = model.apply(p, model_state, example["x"][None], train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"][None])[0]

        acc = optlab.gradient_diversity_init(params)
        acc = optlab.gradient_diversity_update_from_loss(
            acc, loss, params, batch, chunk_size=min(chunk_size, len(x))
        )
        return optlab.gradient_diversity_result(acc)

    return diversity


class Hooks:
    """``make_plan`` and ``final_metrics``: one tracker per (task, method) group."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.trackers: dict[tuple[str, str], EpochTracker] = {}

    def make_plan(self, data: st.TaskData, method: st.Method) -> EpochBatchPlan:
        n_runs = len(self.config.seeds) * len(st.points(method))
        tracker = EpochTracker(data, method.spec, self.config.probe, n_runs)
        self.trackers[(data.task.name, method.name)] = tracker
        return tracker.plan()

    def final_metrics(self, data, method, spec, params, model_state) -> dict[str, Any]:
        del spec, params, model_state
        return self.trackers.pop((data.task.name, method.name)).metrics()


def check_tasks(config: ml_collections.ConfigDict, tasks: tuple[st.Task, ...]) -> None:
    for task in tasks:
        if not task.epochs:
            raise ValueError(f"tasks.{task.name}.epochs must be >= 1 (the budget is in epochs).")
        if task.checkpoint_every:
            raise ValueError(
                f"tasks.{task.name}.checkpoint_every must be 0: batch-size decisions are not "
                "checkpointed (a group restarts)."
            )
    for task in tasks:
        target = dict(config.probe.targets).get(task.name)
        if target is None or not 0 < target <= 1:
            raise ValueError(
                f"probe.targets.{task.name} must lie in (0, 1] (the task's target accuracy), "
                f"got {target!r}."
            )
    if config.probe.diversity_examples < 2 or config.probe.chunk_size < 1:
        raise ValueError(
            "probe.diversity_examples must be >= 2 and probe.chunk_size >= 1, got "
            f"{config.probe.diversity_examples}, {config.probe.chunk_size}."
        )
    if config.probe.accuracy_on not in ("val", "train"):
        raise ValueError(
            f"probe.accuracy_on must be 'val' or 'train', got {config.probe.accuracy_on!r}."
        )


def build_study(config: ml_collections.ConfigDict) -> st.Study:
    tasks = st.tasks_from_config(config)
    methods = st.methods_from_config(config)
    check_tasks(config, tasks)
    for t in tasks:
        for m in methods:
            _validate(m, None, t.batch_size)
    hooks = Hooks(config)
    rules = ", ".join(f"{m.name}: {m.spec.get('rule', 'fixed')}" for m in methods)
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
            "test_accuracy",
            "val_accuracy",
            *TARGET_METRICS,
            "final_batch_size",
        ),
        notes=[
            f"Batch rules: {rules}. Every batch is a whole number of micro-batches of the task "
            "batch size, accumulated in one compiled step; the learning rate scales with the "
            "batch (optlab.scale_by_batch_size, the method's lr_scaling) from base_batch_size.",
            f"Target: {config.probe.accuracy_on} accuracy >= "
            + ", ".join(f"{v:g} ({k})" for k, v in config.probe.targets.items())
            + ", checked at every epoch end; a run that never reaches it is censored at one "
            "epoch past its budget (a lower bound on its true cost).",
            "steps_to_target: optimizer steps (the parallel time on hardware where a larger "
            "batch costs no more per step); examples_to_target: gradient evaluations, the "
            "diversity probes included; time_to_target_s: this machine's training wall time "
            "of the whole vectorized group (all seeds and grid points together), where a "
            "k-micro-batch step costs about k small steps.",
            f"DiveBatch's diversity: Yin et al.'s Δ at the run's weights on the first "
            f"k = {config.probe.diversity_examples} training examples (per-example gradients "
            "of the cross-entropy, evaluation mode), carried over to the n training examples "
            "as Δ_n ≈ (k/n)·Δ_k (both give δ·n·Δ = δ times the gradient noise scale); not the "
            "public code's accumulation over the resize epoch's iterates. δ is fixed, not "
            "tuned (a validation-accuracy selection would always pick the smallest batch).",
        ],
        config=config.to_dict(),
    )


validate, plan, run = st.runner_functions(build_study)

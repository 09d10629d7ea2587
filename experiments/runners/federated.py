"""The `federated` experiment: FedAvg against FedAWARE and FedGA on label-skewed clients.

Every method trains the same clients (one worker each, the study's worker mode), on the
same partitions, seeds, client-sampling sequence, number of rounds, local steps, client
optimizer and learning rate; only the server side differs (``optlab.fedavg``,
``optlab.fedaware``, ``optlab.fedga``), and each method's server learning rate is tuned
on the validation split. Clients are sampled as the official FedAWARE code explores them:
the first rounds visit every client once (a seeded permutation, ``per_round`` at a time),
then ``per_round`` clients are drawn uniformly without replacement each round. Models are
evaluated on the server model (``optlab.federated_server_params``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

import optlab
from experiments import study as st
from experiments.optimizers import make_optimizer, validate_spec
from experiments.registry import get_experiment
from experiments.train import TrainState
from experiments.train.plans import ClientSamplingPlan, WorkerPlan

NAME = "federated"
CLAIM = get_experiment(NAME).claim
TRANSFORMS = ("fedavg", "fedaware", "fedga")


class ExploringClientPlan(ClientSamplingPlan):
    """Client sampling as the official FedAWARE sampler: every client once first, then uniform.

    Round ``r < ceil(W / per_round)`` takes the next ``per_round`` clients of the
    permutation ``default_rng([seed, 0xE7B, 0])`` (the last of those rounds is topped up
    with uniformly drawn clients that were already seen); later rounds are
    :class:`ClientSamplingPlan`'s uniform draws. A pure function of ``(seed, step)``.
    """

    def active(self, seed: int, step: int) -> np.ndarray:
        r = step // self.round_steps
        explore_rounds = -(-self.workers // self.per_round)
        if r >= explore_rounds:
            return super().active(seed, step)
        order = np.random.default_rng([seed, 0xE7B, 0]).permutation(self.workers)
        chosen = order[r * self.per_round : (r + 1) * self.per_round]
        mask = np.zeros(self.workers, bool)
        mask[chosen] = True
        missing = self.per_round - len(chosen)
        if missing:
            rest = np.flatnonzero(~mask)
            mask[np.random.default_rng([seed, 0xE7B, 1]).choice(rest, missing, replace=False)] = (
                True
            )
        return mask


def make_tx(spec: Mapping[str, Any], ctx: st.TxContext) -> optax.GradientTransformation:
    """The federated transform of one method spec (see ``experiments/configs/federated.py``)."""
    if ctx.axis_name is None:  # replicated mode: one client that always takes part
        return _one_client(make_tx(spec, dataclasses.replace(ctx, axis_name=ONE_CLIENT)))
    client = make_optimizer(spec, steps=ctx.steps)
    momentum = spec.get("server_momentum", 0.0)
    server = optax.sgd(spec["server_lr"], momentum=momentum or None)
    local_steps = int(spec["local_steps"])
    transform = spec["transform"]
    if transform == "fedavg":
        return optlab.fedavg(client, server, local_steps, ctx.axis_name)
    if transform == "fedaware":
        return optlab.fedaware(
            client,
            server,
            local_steps,
            ctx.axis_name,
            alpha=spec.get("alpha", 0.5),
            projection=bool(spec.get("projection", False)),
        )
    if transform == "fedga":
        return optlab.fedga(client, server, local_steps, ctx.axis_name, beta=spec["beta"])
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}.")


ONE_CLIENT = "one_client"


def _one_client(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` run as a single client: ``update`` inside a one-member named ``vmap``."""
    tx = optax.with_extra_args_support(tx)
    add = lambda tree: jax.tree.map(lambda v: v[None], tree)
    drop = lambda tree: jax.tree.map(lambda v: v[0], tree)

    def update(updates, state, params=None, **extra):
        fn = lambda u, s, p: tx.update(u, s, p, **extra)
        return drop(jax.vmap(fn, axis_name=ONE_CLIENT)(add(updates), add(state), add(params)))

    return optax.GradientTransformationExtraArgs(tx.init, update)


def server_model(state: TrainState) -> Any:
    return optlab.federated_server_params(state.opt_state)


def _validate(method: st.Method, config: ml_collections.ConfigDict) -> None:
    spec = method.spec
    prefix = f"methods.{method.name}"
    if spec.get("transform") not in TRANSFORMS:
        raise ValueError(
            f"{prefix}.transform must be one of {TRANSFORMS}, got {spec.get('transform')!r}."
        )
    validate_spec(method.name, spec)
    if spec.get("local_steps") != config.local_steps:
        raise ValueError(
            f"{prefix}.local_steps ({spec.get('local_steps')}) must equal local_steps "
            f"({config.local_steps}), the round length of the client-sampling plan."
        )
    try:  # optlab validates its own arguments at construction time
        for point in st.points(method):
            make_tx({**spec, **point}, st.TxContext(None, 1, "workers", 10))  # type: ignore[arg-type]
    except (ValueError, KeyError) as error:
        raise ValueError(f"{prefix}: {error}") from None


def build_study(config: ml_collections.ConfigDict) -> st.Study:
    tasks = st.tasks_from_config(config)
    for task in tasks:
        if task.workers < 1:
            raise ValueError(f"tasks.{task.name}.workers must be >= 1 (clients), got 0.")
    if not 0.0 < config.sample_fraction <= 1.0:
        raise ValueError(f"sample_fraction must lie in (0, 1], got {config.sample_fraction}.")
    if config.local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {config.local_steps}.")
    methods = st.methods_from_config(config)
    for m in methods:
        _validate(m, config)

    def make_plan(data: st.TaskData, method: st.Method) -> ExploringClientPlan:
        workers = data.task.workers
        per_round = max(1, round(config.sample_fraction * workers))
        base = WorkerPlan(data.partitions, data.task.batch_size)
        return ExploringClientPlan(base, per_round, round_steps=config.local_steps)

    labels = {m.name: describe(m.spec) for m in methods}
    return st.Study(
        name=NAME,
        claim=CLAIM,
        tasks=tasks,
        methods=tuple(
            m if m.label else st.Method(m.name, m.spec, m.axes, m.tune, labels[m.name])
            for m in methods
        ),
        seeds=tuple(config.seeds),
        make_tx=make_tx,
        claims=st.claims_from_config(config, methods),
        eval_params=lambda m: server_model,
        make_plan=make_plan,
        notes=[
            f"A round is {config.local_steps} client steps (the curves' x axis counts steps: "
            f"round = step / {config.local_steps}); {config.sample_fraction:.0%} of the "
            "clients take part in a round, the same clients for every method (every client "
            "once first, then uniform draws). Clients outside a round compute a gradient "
            "that is discarded (a simulation cost only).",
            "Equal local work: every participant takes the same number of local steps on "
            "batches of the same size, and the server averages participants equally "
            "(FedGA's official code does; client data-size weights are an optlab option).",
            "FedAWARE: per-client momenta of the pseudo-gradients, min-norm combination of "
            "their directions by Frank-Wolfe (official solver: best pair, exact line "
            "search, <= 1000 iterations, tol 1e-5) once every client has taken part; its "
            "server step length is eta_g * |e| with |e| <= 1, unlike FedAvg's. The "
            "official feedback sampler (lambda as sampling probabilities) is not used.",
            "FedGA: the round's first gradient (one mini-batch, not the client's whole "
            "data) sets the displacement beta (g_i - mean g) of each client's start point; "
            "one more gradient and one more all-reduce per round.",
            "Methods: " + "; ".join(f"{k} = {v}" for k, v in labels.items()) + ".",
        ],
        table_metrics=("test_accuracy", "val_accuracy", "train_loss"),
        config=config.to_dict(),
    )


def describe(spec: Mapping[str, Any]) -> str:
    """E.g. ``"FedAWARE (alpha 0.5): client sgd lr 0.05, server sgd"``."""
    name = {"fedavg": "FedAvg", "fedaware": "FedAWARE", "fedga": "FedGA"}[spec["transform"]]
    if spec["transform"] == "fedaware":
        name += f" (alpha {spec.get('alpha', 0.5):g})"
    if spec["transform"] == "fedga":
        name += f" (beta {spec['beta']:g})"
    server = "sgd" + (
        f" momentum {spec['server_momentum']:g}" if spec.get("server_momentum") else ""
    )
    return (
        f"{name}: client {spec['optimizer']} lr {spec['learning_rate']:g}, "
        f"{spec['local_steps']} local steps, server {server}"
    )


validate, plan, run = st.runner_functions(build_study)

"""The `federated` runner's own pieces: the exploring client sampler and the one-client
fallback of its make_tx (the end-to-end smoke run is in test_experiments.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import study as st
from experiments.runners.federated import ExploringClientPlan, make_tx
from experiments.train.plans import WorkerPlan


def test_exploring_plan_visits_every_client_once_first():
    parts = [np.arange(3 * i, 3 * i + 3) for i in range(7)]
    plan = ExploringClientPlan(WorkerPlan(parts, 2), per_round=3, round_steps=2)
    masks = np.array([plan.active(5, step) for step in range(0, 40, 2)])
    assert (masks.sum(axis=1) == 3).all()
    first = masks[:3].sum(axis=0)  # ceil(7 / 3) = 3 exploring rounds: 7 + 2 top-ups
    assert (first >= 1).all()
    assert first.sum() == 9
    assert (masks[:2].sum(axis=0) <= 1).all()  # no client twice before all are seen
    # A pure function of (seed, step): the same mask on every step of a round, any order.
    np.testing.assert_array_equal(plan.active(5, 7), plan.active(5, 6))
    again = plan.indices(5, [39, 0])["active"]
    np.testing.assert_array_equal(again, masks[[19, 0]])
    assert not np.array_equal(plan.active(6, 0), plan.active(5, 0))


def test_replicated_context_is_one_client_that_always_takes_part():
    """Without a worker axis, FedAvg with server sgd(1.0) is its client optimizer."""
    spec = {
        "transform": "fedavg",
        "optimizer": "sgd",
        "learning_rate": 0.1,
        "local_steps": 2,
        "server_lr": 1.0,
    }
    tx = make_tx(spec, st.TxContext(None, 10, None, 10))  # type: ignore[arg-type]
    params = {"w": jnp.arange(3.0)}
    state, update = tx.init(params), jax.jit(tx.update)
    sgd, sgd_state = optax.sgd(0.1), optax.sgd(0.1).init(params)
    for t in range(3):
        grads = {"w": params["w"] * (t + 1)}
        updates, state = update(grads, state, params)
        expected, sgd_state = sgd.update(grads, sgd_state, params)
        jax.tree.map(np.testing.assert_allclose, updates, expected)
        params = optax.apply_updates(params, updates)

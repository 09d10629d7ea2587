"""optlab.fedavg against a float64 loop over clients written from the equations (client
sampling, data-size weights, an empty round, FedOpt servers), one client = the client
optimizer, vmap vs shard_map, the compiled off-round step, composition and validation.
The Orbax mid-round resume of the shared round skeleton is checked in test_fedaware.py
(FedAWARE's state is FedAvg's plus the client momenta)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from federated_checks import (
    random_masks,
    reference_rounds,
    shard_map_run_and_check,
    with_extras,
)
from worker_axis_checks import (
    AXIS,
    NumpyAdam,
    NumpySGD,
    clip,
    run_vmap,
    worker_problem,
)

import optlab

WORKERS = 4
H = 3
STEPS = 14  # four rounds and two steps into the fifth


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


def _masks(rng, workers=WORKERS):
    masks = random_masks(rng, STEPS // H + 1, workers, 2)
    masks[2] = False  # a round without participants: the server must not move
    return masks


def test_matches_reference_loop(rng, x64):
    """FedAdam with client momentum (reset every round), client sampling, data-size
    weights and a round without participants."""
    a, data, x0 = worker_problem(rng, WORKERS, STEPS)
    grad = lambda i, t, x: a @ x - data[t, i]
    masks, weights, reset = _masks(rng), np.array([1.0, 3.0, 0.5, 2.0]), True
    client, server = optax.sgd(0.05, momentum=0.9), optax.adam(0.2)
    np_client, np_server = NumpySGD(0.05, 0.9), NumpyAdam(0.2)
    tx = optlab.fedavg(client, server, H, AXIS, client_weights=weights, reset_client_state=reset)
    xs, (_, state) = run_vmap(with_extras(tx, H, masks), a, data, x0)
    ref, server_x = reference_rounds(
        grad, x0, STEPS, WORKERS, np_client, np_server, H, masks=masks, weights=weights,
        reset=reset,
    )  # fmt: skip
    _close(xs, ref)
    anchors = np.asarray(optlab.federated_server_params(state)["w"])
    _close(anchors, np.broadcast_to(server_x, anchors.shape))
    for t in (t for t in range(STEPS) if (t + 1) % H):  # within rounds, clients outside
        idle = ~masks[t // H]  # the round sit on the server model
        start = ref[t // H * H - 1] if t >= H else np.broadcast_to(x0, ref[0].shape)
        _close(xs[t][idle], start[idle])
    _close(xs[3 * H - 1], xs[2 * H - 1])  # the empty round changed nothing


def test_one_client_is_the_client_optimizer(rng, x64):
    a, data, x0 = worker_problem(rng, 1, STEPS)
    client = optax.sgd(0.05, momentum=0.9)
    tx = optlab.fedavg(client, optax.sgd(1.0), H, AXIS, reset_client_state=False)
    xs, _ = run_vmap(tx, a, data, x0)
    ys, _ = run_vmap(client, a, data, x0)
    _close(xs, ys)


def test_vmap_equals_shard_map_and_off_round_steps_move_no_bytes(rng):
    workers = 8
    a, data, x0 = worker_problem(rng, workers, 7)
    masks = random_masks(rng, 4, workers, 3)
    tx = with_extras(
        optlab.fedavg(optax.sgd(0.05), optax.adam(0.1), 2, AXIS, client_weights=np.arange(8.0)),
        2,
        masks,
    )
    xs, (_, v_state) = run_vmap(tx, a, data, x0)
    ys, (_, s_state) = shard_map_run_and_check(tx, a, data, x0, conditionals=1)
    np.testing.assert_allclose(ys, xs, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6), s_state, v_state
    )
    assert isinstance(s_state, optlab.FedAvgState)


def test_chain_inject_hyperparams_multi_steps_and_donation(rng, x64):
    """clip -> inject_hyperparams(fedavg) with traced rates and an integer round length,
    inside MultiSteps(k=2) (each client step on the mean of two gradients), in a jitted
    step that donates params and state."""
    a, data, x0 = worker_problem(rng, WORKERS, 2 * STEPS)
    masks = _masks(rng)

    def factory(client_lr, server_lr, local_steps):
        fed = optlab.fedavg(
            optax.sgd(client_lr), optax.sgd(server_lr, momentum=0.5), local_steps, AXIS
        )
        return optax.chain(optax.clip_by_global_norm(1.0), fed)

    inner = optax.inject_hyperparams(factory)(client_lr=0.0625, server_lr=0.75, local_steps=H)
    tx = optax.MultiSteps(with_extras(inner, H, masks), every_k_schedule=2)
    xs, (_, state) = run_vmap(tx, a, data, x0, donate=True)
    pairs = 0.5 * (data[0::2] + data[1::2])  # the mean gradient of a pair is A x - mean data
    grad = lambda i, t, x: clip(a @ x - pairs[t, i], 1.0)
    ref, _ = reference_rounds(
        grad, x0, STEPS, WORKERS, NumpySGD(0.0625), NumpySGD(0.75, 0.5), H, masks=masks
    )
    # MultiSteps keeps its accumulator in float32 (its default accumulator dtype).
    np.testing.assert_allclose(xs[1::2], ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.inner_opt_state.hyperparams["server_lr"], 0.75)


def test_trace_time_errors():
    tx = optlab.fedavg(optax.sgd(0.1), optax.sgd(1.0), 2, AXIS)
    params = jnp.ones((2, 3))
    state = jax.vmap(tx.init)(params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params[0], tx.init(params[0]))
    with pytest.raises(ValueError, match=r"active must hold one entry per client, shape \(2,\)"):
        jax.vmap(lambda p, s: tx.update(p, s, p, active=jnp.ones(3, bool)), axis_name=AXIS)(
            params, state
        )
    weighted = optlab.fedavg(optax.sgd(0.1), optax.sgd(1.0), 1, AXIS, client_weights=[1.0] * 3)
    with pytest.raises(ValueError, match="client_weights must hold one entry per client"):
        jax.vmap(lambda p, s: weighted.update(p, s, p), axis_name=AXIS)(
            params, jax.vmap(weighted.init)(params)
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"local_steps": 0}, r"local_steps must be an integer in \[1, "),
        ({"local_steps": 2.0}, "local_steps must be an integer"),
        ({"axis_name": None}, "axis_name must be a string"),
        ({"client_weights": [1.0, -1.0]}, "client_weights must be a non-empty 1-D"),
        ({"client_weights": [[1.0]]}, "client_weights"),
        ({"client_weights": [0.0, 0.0]}, "positive sum"),
        ({"reset_client_state": 1}, "reset_client_state must be a bool"),
        ({"server": None}, "client and server must be optax transforms"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"server": optax.sgd(1.0), "local_steps": 5, "axis_name": AXIS, **kwargs}
    with pytest.raises(ValueError, match=match):
        optlab.fedavg(optax.sgd(0.1), **args)

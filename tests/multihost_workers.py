"""The worker-axis optimizers over one global mesh of 8 CPU devices, one worker per device.

``tests/test_multihost.py`` runs this file as a script in 2 processes x 4 CPU devices (joined
by ``jax.distributed.initialize`` over gloo on localhost) and compares what process 0 writes
with :func:`train_all` called in the test process itself (1 process x 8 devices). The code is
the same in both: a global ``Mesh``, ``jax.shard_map`` over the worker axis, inputs built as
global arrays from the same NumPy data, and the final params gathered back to every process.

Usage: ``python tests/multihost_workers.py OUT.npz COORDINATOR NUM_PROCESSES PROCESS_ID``.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "workers"
WORKERS = 8
DIM = 5
STEPS = 7  # ends between syncs (sync_period 3), so the workers' params differ


def problem():
    """grad_i(t, x) = A x - data[t, i]: every worker has its own quadratic and noise."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=(DIM, DIM))
    a = (m @ m.T / DIM + np.eye(DIM)).astype(np.float32)
    data = 2.0 * rng.normal(size=(1, WORKERS, DIM)) + 0.3 * rng.normal(size=(STEPS, WORKERS, DIM))
    return a, data.astype(np.float32), rng.normal(size=DIM).astype(np.float32)


def transforms() -> dict[str, optax.GradientTransformation]:
    import optlab

    sgd = optax.sgd(0.1)
    return {
        "local_sgd": optlab.local_sgd(sgd, sync_period=3, axis_name=AXIS),
        "post_local_sgd": optlab.local_sgd(sgd, sync_period=3, axis_name=AXIS, start_step=2),
        "diloco": optlab.diloco(
            optax.adam(0.05), optax.sgd(0.7, momentum=0.9, nesterov=True), 3, AXIS
        ),
        "palsgd": optlab.palsgd(optax.sgd(0.1), None, 3, AXIS, learning_rate=0.1, prob=0.5, seed=1),
        "dsgd_ring": optlab.dsgd(sgd, "ring", AXIS),
        "dsgd_one_peer_exp": optlab.dsgd(sgd, "one_peer_exponential", AXIS, order="atc"),
        "gradalign": optlab.gradalign(sgd, 0.05, AXIS),
    }


def _step(tx, a):
    def step(params, state, data):
        grad_fn = lambda p: {"w": a @ p["w"] - data}
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    return step


def train_all() -> dict[str, np.ndarray]:
    """Every transform of :func:`transforms` for ``STEPS`` steps; the final params of every
    worker, shape (WORKERS, DIM), as NumPy arrays on every process."""
    from jax.experimental import multihost_utils

    a, data, x0 = problem()
    mesh = jax.make_mesh((WORKERS,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P(AXIS))

    def global_array(x: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    out = {}
    for name, tx in transforms().items():
        tx = optax.with_extra_args_support(tx)
        step = _step(tx, jnp.asarray(a))

        def body(params, state, data, step=step):
            new = step(*jax.tree.map(lambda v: v[0], (params, state, data)))
            return jax.tree.map(lambda v: v[None], new)

        sharded = jax.jit(
            jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS),) * 3, out_specs=P(AXIS))
        )
        params = {"w": np.broadcast_to(x0, (WORKERS, DIM)).copy()}
        state = jax.tree.map(
            lambda v: np.broadcast_to(np.asarray(v), (WORKERS, *np.shape(v))).copy(),
            tx.init({"w": jnp.asarray(x0)}),
        )
        params, state = jax.tree.map(global_array, (params, state))
        for t in range(STEPS):
            params, state = sharded(params, state, global_array(data[t]))
        out[name] = np.asarray(multihost_utils.process_allgather(params["w"], tiled=True))
    return out


def main(argv: list[str]) -> None:
    path, coordinator, num_processes, process_id = argv
    jax.config.update("jax_num_cpu_devices", WORKERS // int(num_processes))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(num_processes),
        process_id=int(process_id),
    )
    assert jax.device_count() == WORKERS, jax.devices()
    result = train_all()
    if jax.process_index() == 0:
        np.savez(path, **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Many workers, one code path: simulated with `vmap`, then sharded with `shard_map`
#
# Every multi-worker optimizer of optlab (synchronous data parallelism, Local SGD, DiLoCo,
# decentralized SGD) takes an `axis_name` and talks over it with `lax.pmean` / `lax.ppermute`
# inside its `update`. The same step function therefore runs
#
# 1. **simulated** on one device: `jax.vmap(step, axis_name="workers")` over a leading worker
#    axis, and
# 2. **sharded** over real devices: `jax.shard_map(step, mesh, ...)` with a mesh axis of the
#    same name (here 8 virtual CPU devices; on a TPU pod or GPU cluster the same call).
#
# Each of 8 workers owns a different shard of a linear-regression problem (heterogeneous
# data), trains on its own mini-batches, and we compare four ways to combine them. At the end
# the sharded run is checked to give the same params as the simulation. Works on Colab and
# locally; edit the next cell to change the budget.

# %% tags=["parameters"]
STEPS = 300  # training steps
WORKERS = 8  # simulated workers, and CPU devices for the sharded run
BATCH = 16  # examples per worker per step
LEARNING_RATE = 0.05
SYNC_PERIOD = 10  # Local SGD and DiLoCo: steps between averaging rounds
REPO_DIR = ".."  # where the optlab checkout is, if it still has to be installed

# %%
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("optlab") is None:
    # On Colab: upload or clone the repository first and point REPO_DIR at it.
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", REPO_DIR])

import jax

# The CPU device count must be set before JAX's first operation (a restarted kernel).
jax.config.update("jax_num_cpu_devices", WORKERS)
print(jax.default_backend(), jax.devices("cpu"))

# %% [markdown]
# ## A heterogeneous problem
# Worker `w` sees `y = X (theta + delta_w) + noise`: the workers agree on `theta` but each has
# its own shift `delta_w`, so their local optima differ and averaging matters. The
# mini-batches of every step are drawn here once (NumPy, fixed seed), so both runs below
# see exactly the same data.

# %%
import jax.numpy as jnp
import numpy as np
import optax

import optlab

DIM, PER_WORKER = 10, 256
rng = np.random.default_rng(0)
theta = rng.normal(size=DIM)
delta = 0.5 * rng.normal(size=(WORKERS, DIM))
X = rng.normal(size=(WORKERS, PER_WORKER, DIM)).astype(np.float32)
Y = np.einsum("wnd,wd->wn", X, theta + delta) + 0.1 * rng.normal(size=(WORKERS, PER_WORKER))
Y = Y.astype(np.float32)
picks = rng.integers(0, PER_WORKER, size=(WORKERS, STEPS, BATCH))  # per worker, per step
batches = {  # leaves [WORKERS, STEPS, BATCH, ...]
    "x": np.take_along_axis(X[:, None], picks[..., None], axis=2),
    "y": np.take_along_axis(Y[:, None], picks, axis=2),
}
shards = {"x": X, "y": Y}  # every worker's whole shard, to measure the global objective


def loss_fn(params, batch):
    return 0.5 * jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


# %% [markdown]
# ## One worker's step, written once
# `run` trains ONE worker for all steps (`lax.scan`); the optimizer does the communication.
# Along the way it records the global objective at the workers' average
# (`pmean` of every worker's loss on its whole shard) and the consensus distance
# (`optlab.consensus_distance`: RMS distance of the workers' params from their mean).

# %%
AXIS = "workers"


def make_run(tx):
    def run(params, batches, shard):
        def step(carry, batch):
            params, state = carry
            grads = jax.grad(loss_fn)(params, batch)  # this worker's own gradient
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            average = jax.lax.pmean(params, AXIS)
            objective = jax.lax.pmean(loss_fn(average, shard), AXIS)
            return (params, state), (objective, optlab.consensus_distance(params, AXIS))

        (params, _), trace = jax.lax.scan(step, (params, tx.init(params)), batches)
        return params, trace

    return run


METHODS = {
    "synchronous DP": optax.chain(optlab.mean_gradients(AXIS), optax.sgd(LEARNING_RATE)),
    "Local SGD": optlab.local_sgd(optax.sgd(LEARNING_RATE), SYNC_PERIOD, AXIS),
    "DiLoCo": optlab.diloco(
        optax.sgd(LEARNING_RATE), optax.sgd(0.7, momentum=0.9, nesterov=True), SYNC_PERIOD, AXIS
    ),
    "D-SGD ring": optlab.dsgd(optax.sgd(LEARNING_RATE), "ring", AXIS),
}
params0 = {"w": jnp.zeros((WORKERS, DIM)), "b": jnp.zeros((WORKERS,))}  # replicated start

# %% [markdown]
# ## 1. Simulated workers: `vmap` with a named axis, on one device

# %%
simulated = {}
for name, tx in METHODS.items():
    run = jax.jit(jax.vmap(make_run(tx), axis_name=AXIS))
    simulated[name] = run(params0, batches, shards)
    params, (objective, consensus) = simulated[name]
    print(f"{name:>15}: objective {float(objective[0, -1]):.4f}, "
          f"consensus distance {float(consensus[0, -1]):.2e}")  # fmt: skip

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for name, (_, (objective, consensus)) in simulated.items():
    axes[0].plot(objective[0], label=name)  # every worker holds the same value: take worker 0
    axes[1].plot(consensus[0], label=name)
axes[0].set_yscale("log")
axes[0].set_ylabel("global objective at the average params")
axes[1].set_yscale("symlog", linthresh=1e-4)
axes[1].set_ylabel("consensus distance")
for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
axes[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Synchronous DP keeps the workers equal (consensus distance 0). Local SGD and DiLoCo let them
# drift for `SYNC_PERIOD` steps, then average (the saw-tooth); D-SGD never averages exactly
# but keeps the workers close through gossip with its two ring neighbours.

# %% [markdown]
# ## 2. The same code on devices: `jax.shard_map` over a `"workers"` mesh axis
# One worker per CPU device: each device gets a slice of size 1 of the worker axis, drops it,
# runs the very same `run`, and the collectives inside the optimizers now cross devices.

# %%
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

mesh = jax.make_mesh(
    (WORKERS,),
    (AXIS,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=jax.devices("cpu")[:WORKERS],
)
spec = P(AXIS)


def sharded(run):
    def per_device(*args):  # leaves [1, ...] on each device
        out = run(*jax.tree.map(lambda a: a[0], args))
        return jax.tree.map(lambda a: a[None], out)

    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec))


put = lambda tree: jax.device_put(tree, NamedSharding(mesh, spec))
for name, tx in METHODS.items():
    params, (objective, consensus) = sharded(make_run(tx))(put(params0), put(batches), put(shards))
    reference = simulated[name][0]
    gap = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True)
    )
    print(f"{name:>15}: on {len(params['w'].sharding.device_set)} devices, "
          f"max |shard_map - vmap| = {gap:.1e}")  # fmt: skip
    np.testing.assert_allclose(params["w"], reference["w"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(params["b"], reference["b"], rtol=1e-5, atol=1e-5)
print("shard_map and vmap give the same params for every method.")

# %% [markdown]
# The harness does the same for real models: `python -m experiments run dsgd` (C-SGD vs
# D-SGD at two total batches) and `python -m experiments run gradalign` train their workers
# simulated with `vmap`, or one per device with `--devices 8`.

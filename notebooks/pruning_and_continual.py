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
# # Regularizers for continual learning (and pruning)
#
# A network trained on one task after another can lose its *plasticity*: later tasks are
# learned worse than the first one. Lewandowski et al. (ICLR 2025) keep every layer's largest
# singular value near 1 (`optlab.spectral_regularization`); an earlier version regularized
# each layer's weight *distribution* toward its initial one
# (`optlab.wasserstein_regularization`), a looser cousin of L2 toward the initial weights
# (`optlab.l2_init_regularization`, Kumar et al. 2023). All three are optax transforms placed
# before the base optimizer, like weight decay. Works on Colab (CPU, GPU or TPU runtime) and
# locally. Edit the next cell to change the budget.

# %% tags=["parameters"]
STREAM = "label_flip"  # "permuted", "label_flip" or "class_incremental"
NUM_TASKS = 8  # tasks in the stream (class_incremental: a divisor of 10)
STEPS_PER_TASK = 150  # SGD steps on each task (batch 32)
SEEDS = (0, 1, 2)
METHODS = ("sgd", "l2_init", "wasserstein", "spectral")
STRENGTHS = {"l2_init": 1e-3, "wasserstein": 1e-3, "spectral": 1e-3}
PRUNE_SPARSITY = 0.9  # DPF section: fraction of the kernels' weights pruned at the end
PRUNE_STEPS = 1500  # DPF section: SGD steps (batch 32); the mask ramps up over 2/3 of them
REPO_DIR = ".."  # where the optlab checkout is, if it still has to be installed

# %%
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("optlab") is None:
    # On Colab: upload or clone the repository first and point REPO_DIR at it.
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", REPO_DIR])

import jax

print(jax.default_backend(), jax.devices())

# %% [markdown]
# ## The regularizers on one matrix
# The spectral regularizer runs one power iteration per step, with its vectors `u`, `v` kept
# in the optimizer state, and adds the closed-form gradient of
# `strength * (sigma_max**2 - 1)**2`, `4 * strength * (sigma**2 - 1) * sigma * u v^T`. On a
# fixed matrix its estimate converges to the SVD's top singular value. The Wasserstein
# regularizer does not care where each weight sits, only about the sorted values: a
# permutation of the initial weights costs nothing, while L2 Init pulls every moved weight
# back.

# %%
import jax.numpy as jnp
import numpy as np
import optax

import optlab

w = jax.random.normal(jax.random.key(0), (32, 16)) / 4
params = {"w": w}
spectral = optlab.spectral_regularization(1e-2)
state, update = spectral.init(params), jax.jit(spectral.update)
zeros = optax.tree.zeros_like(params)
for step in range(1, 13):
    added, state = update(zeros, state, params)
    if step in (1, 2, 4, 12):
        print(f"power iteration step {step:2d}: sigma = {float(state.sigma['w']):.5f}")
print(f"SVD:                      sigma = {float(optlab.spectral_norms(params)['w']):.5f}")

permuted = {"w": jax.random.permutation(jax.random.key(1), w.ravel()).reshape(w.shape)}
for name, tx in [
    ("wasserstein", optlab.wasserstein_regularization(1.0)),
    ("l2_init", optlab.l2_init_regularization(1.0)),
]:
    pull, _ = tx.update(zeros, tx.init(params), permuted)
    print(
        f"{name:12s} gradient norm at a permutation of the initial weights: "
        f"{float(jnp.linalg.norm(pull['w'])):.3f}"
    )

# %% [markdown]
# ## A small continual stream
# The `continual` experiment's quick config, reduced to one stream of `NUM_TASKS` tasks on
# the offline digits data: plain SGD (lr 0.1) and the regularizers at fixed strengths (the
# experiment tunes them on the last task's validation split). Every task trains for
# `STEPS_PER_TASK` steps, nothing is reset between tasks, and the probes evaluate every
# task's test set and every kernel's exact `sigma_max` at each task boundary.

# %%
import tempfile
from pathlib import Path

from experiments import study as st
from experiments.configs.continual import get_config
from experiments.runners import continual
from experiments.train.metrics import read_metrics

config = get_config("quick")
config.task_names = (STREAM,)
config.streams[STREAM].num_tasks = NUM_TASKS
config.tasks[STREAM].steps = STEPS_PER_TASK * NUM_TASKS
config.tasks[STREAM].eval_every = STEPS_PER_TASK
config.log_every = STEPS_PER_TASK
config.seeds = tuple(SEEDS)
for name, strength in STRENGTHS.items():  # fixed strengths: drop the grids
    spec = {k: v for k, v in config.methods[name].to_dict().items() if k not in ("axes", "tune")}
    config.methods[name] = {**spec, "strength": strength}
config.method_names = tuple(METHODS)
study = continual.build_study(config)
print(st.describe(study))

workdir = Path(tempfile.mkdtemp(prefix="continual-"))
results = st.run_study(study, workdir, progress=False)
print((workdir / "results.md").read_text().split("## Verdicts")[0])

# %% [markdown]
# ## Plasticity and spectral norms along the stream
# Left: the test accuracy on each task right after training on it (mean over seeds); a
# falling curve is lost plasticity. Right: the largest singular value of the first hidden
# layer's kernel at every task boundary.

# %%
import matplotlib.pyplot as plt

metrics = read_metrics(workdir / STREAM / "metrics.jsonl")
after = continual.accuracy_after_each_task(metrics, STEPS_PER_TASK, NUM_TASKS)
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
for method in METHODS:
    rows = np.array([v for (m, _, _), v in after.items() if m == method])
    left.plot(range(1, NUM_TASKS + 1), 100 * np.nanmean(rows, 0), marker="o", label=method)
    sigma = {}
    for r in metrics:
        if r["method"] == method and "sigma_dense_0" in r:
            sigma.setdefault(r["step"], []).append(r["sigma_dense_0"])
    steps = sorted(sigma)
    right.plot(steps, [np.mean(sigma[s]) for s in steps], marker=".", label=method)
left.set(xlabel="task", ylabel="test accuracy after training on it (%)")
right.set(xlabel="step", ylabel="sigma_max of dense_0")
for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Dynamic pruning with feedback
#
# DPF (Lin et al., ICLR 2020) keeps the dense weights, evaluates the loss at the pruned
# ones (`optlab.masked_params`) and applies that gradient, unmasked, to the dense weights:
# a pruned weight keeps receiving gradient and comes back if it grows past the magnitude
# threshold at the next mask refresh (every 16 steps, one global threshold over the
# kernels, sparsity ramped up on the cubic schedule). Gradual magnitude pruning
# (`feedback=False`) zeroes the pruned weights and their updates instead, so they never
# return. Here: an MLP on digits, dense vs DPF vs gradual pruning at `PRUNE_SPARSITY`,
# all with momentum SGD; the `dpf` experiment runs the full comparison over sparsities.

# %%
from experiments.data import load_dataset
from experiments.models import make_model

digits = load_dataset("digits", seed=0)
mlp = make_model("mlp", num_classes=10)


def train_pruned(kind, seed=0, batch=32, lr=0.05):
    """``kind``: "dense", "dpf" or "gmp"; returns test accuracy every 50 steps and the
    final sparsity of the weights the model is evaluated with."""
    params, model_state = mlp.init(jax.random.key(seed), jnp.asarray(digits.x_train[:1]))
    tx = optax.sgd(lr, momentum=0.9)
    if kind != "dense":
        tx = optlab.dpf(
            tx,
            PRUNE_SPARSITY,
            end_step=2 * PRUNE_STEPS // 3,
            feedback=kind == "dpf",
            prunable=lambda path, leaf: leaf.ndim >= 2 and "head" not in str(path),
        )
    opt_state = tx.init(params)

    def weights(p, s):
        return p if kind == "dense" else optlab.masked_params(s, p)

    def loss(p, x, y):
        logits, _ = mlp.apply(p, model_state, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        grads = jax.grad(loss)(weights(p, s), x, y)  # at the pruned weights
        updates, s = tx.update(grads, s, p)  # applied to the dense ones
        return optax.apply_updates(p, updates), s

    @jax.jit
    def accuracy(p, s):
        logits, _ = mlp.apply(weights(p, s), model_state, digits.x_test, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == digits.y_test)

    rng = np.random.default_rng(seed)
    curve = []
    for t in range(PRUNE_STEPS):
        i = rng.integers(0, len(digits.x_train), batch)
        params, opt_state = step(params, opt_state, digits.x_train[i], digits.y_train[i])
        if (t + 1) % 50 == 0 or t + 1 == PRUNE_STEPS:
            curve.append((t + 1, float(accuracy(params, opt_state))))
    return np.array(curve), optlab.sparsity(weights(params, opt_state))


pruning = {kind: train_pruned(kind) for kind in ("dense", "dpf", "gmp")}
fig, ax = plt.subplots(figsize=(6, 4))
for kind, (curve, sparse) in pruning.items():
    label = f"{kind} (sparsity {float(sparse.prunable):.2f} of the kernels)"
    ax.plot(curve[:, 0], 100 * curve[:, 1], marker=".", label=label)
    print(f"{kind:5s}: test accuracy {100 * curve[-1, 1]:.2f} %, {sparse}")
ax.axvline(2 * PRUNE_STEPS // 3, color="grey", ls=":", lw=1)  # the mask is frozen after
ax.set(xlabel="step", ylabel="test accuracy (%)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

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
# # Diagnostics: gradient diversity, DiveBatch and path geometry
#
# Gradient diversity (Yin et al., AISTATS 2018) is `Σ‖g_i‖² / ‖Σ g_i‖²` over per-example
# gradients: `1/n` when every example pulls the same way, large when they disagree.
# Mini-batch SGD with a batch up to `δ·n·Δ` keeps the per-example progress of small
# batches, which DiveBatch (Chen, Wang, Sundaram, 2025) uses to grow the batch during
# training. Here we measure the diversity of an MLP on the offline digits data as it trains
# (`optlab.gradient_diversity_update_from_loss`, chunked per-example gradients), then run
# the `divebatch` experiment's methods (fixed small batch, AdaBatch, DiveBatch) for a few
# epochs. Works on Colab (CPU, GPU or TPU runtime) and locally. Edit the next cell to
# change the budget.

# %% tags=["parameters"]
EPOCHS = 8  # epochs of every training run
SEEDS = (0, 1)
DIVERSITY_EXAMPLES = 256  # training examples the diversity is measured on
DELTA = 0.5  # DiveBatch: batches up to DELTA x the gradient noise scale
ARCHITECTURES = ("mlp_266x1", "mlp_70x4")  # wide and deep MLPs, about 20 k parameters each
METHODS = ("sgd_small", "adabatch", "divebatch")
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
# ## Gradient diversity along training
# Plain momentum SGD (batch 16) on digits; at every epoch end, the diversity `Δ_k` of the
# cross-entropy over the first `DIVERSITY_EXAMPLES` training examples, for a wide
# (1 x 266) and a deep (4 x 70) MLP of about 20 k parameters each. `k·Δ_k = S/‖ḡ‖²` (mean
# squared per-example norm over the squared mean gradient) is the gradient noise scale:
# the batch size up to which DiveBatch grows (times `δ`).

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import optlab
from experiments.data import load_dataset
from experiments.models import make_model

data = load_dataset("digits", seed=0)
k = min(DIVERSITY_EXAMPLES, len(data.x_train))
probe = {"x": jnp.asarray(data.x_train[:k]), "y": jnp.asarray(data.y_train[:k])}


def diversity_along_training(model_name, seed=0, batch=16, lr=0.03):
    model = make_model(model_name, num_classes=10)
    params, model_state = model.init(jax.random.key(seed), probe["x"][:1])
    tx = optax.sgd(lr, momentum=0.9)
    opt_state = tx.init(params)

    def loss(p, x, y):
        logits, _ = model.apply(p, model_state, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        updates, s = tx.update(jax.grad(loss)(p, x, y), s)
        return optax.apply_updates(p, updates), s

    @jax.jit
    def diversity(p):
        one = lambda q, ex: loss(q, ex["x"][None], ex["y"][None])
        acc = optlab.gradient_diversity_init(p)
        acc = optlab.gradient_diversity_update_from_loss(acc, one, p, probe, chunk_size=64)
        return optlab.gradient_diversity_result(acc)

    rng = np.random.default_rng(seed)
    values = [float(diversity(params))]
    for _ in range(EPOCHS):
        order = rng.permutation(len(data.x_train))
        for s in range(len(order) // batch):
            i = order[s * batch : (s + 1) * batch]
            params, opt_state = step(params, opt_state, data.x_train[i], data.y_train[i])
        values.append(float(diversity(params)))
    return np.array(values)


curves = {name: diversity_along_training(name) for name in ARCHITECTURES}
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for name, values in curves.items():
    axes[0].plot(values, marker="o", label=name)
    axes[1].plot(k * values, marker="o", label=name)
axes[0].set_ylabel(f"gradient diversity over {k} examples")
axes[1].set_ylabel("noise scale k·Δ_k (batch bound at δ = 1)")
for ax in axes:
    ax.set_xlabel("epoch")
    ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## DiveBatch against a fixed batch and AdaBatch
# The `divebatch` experiment's methods on digits at one learning rate (the experiment tunes
# it on a validation split): a fixed batch of 16, AdaBatch (doubling every 4 epochs up to
# 256) and DiveBatch (every 2 epochs, the batch becomes `δ × k·Δ_k`, up to 256). Batches are
# whole numbers of 16-example micro-batches accumulated in one compiled step, and the
# learning rate scales linearly with the batch. The tables count epochs, optimizer steps and
# gradient evaluations until the validation accuracy first reaches the target.

# %%
import dataclasses
import tempfile
from pathlib import Path

from IPython.display import Image, Markdown, display

from experiments import study as st
from experiments.configs.divebatch import get_config
from experiments.runners import divebatch as divebatch_experiment

config = get_config("quick")
config.tasks = {"digits": {**config.tasks.digits.to_dict(), "epochs": EPOCHS}}
config.seeds = tuple(SEEDS)
config.method_names = tuple(METHODS)
for name in config.method_names:  # one learning rate: no tuning
    spec = {k: v for k, v in config.methods[name].to_dict().items() if k not in ("axes", "tune")}
    config.methods[name] = spec
config.methods.divebatch.delta = DELTA
config.probe.diversity_examples = DIVERSITY_EXAMPLES
study = divebatch_experiment.build_study(config)
print(st.describe(study))

hooks = study.make_plan.__self__  # the experiment's per-group epoch trackers
logs = {}


def final_metrics(data, method, spec, params, model_state):
    logs[method.name] = hooks.trackers[(data.task.name, method.name)].log  # per run, per epoch
    return hooks.final_metrics(data, method, spec, params, model_state)


workdir = Path(tempfile.mkdtemp(prefix="optlab-divebatch-"))
results = st.run_study(
    dataclasses.replace(study, final_metrics=final_metrics), workdir, progress=False
)
display(Markdown((workdir / "results.md").read_text().split("\n## Plots")[0]))

# %% [markdown]
# Left: validation accuracy against optimizer steps (a larger batch takes fewer steps per
# epoch). Right: each run's batch size, epoch by epoch.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for color, (name, runs) in zip(("C0", "C1", "C2"), logs.items(), strict=False):
    for r, log in enumerate(runs):
        label = name if r == 0 else None
        axes[0].plot([e["step"] for e in log], [e["accuracy"] for e in log], color=color,
                     label=label)  # fmt: skip
        axes[1].step([e["epoch"] for e in log], [e["batch_size"] for e in log], where="post",
                     color=color, label=label)  # fmt: skip
axes[0].set_xlabel("optimizer steps")
axes[0].set_ylabel("validation accuracy")
axes[1].set_xlabel("epoch")
axes[1].set_ylabel("batch size during the epoch")
axes[1].set_yscale("log", base=2)
for ax in axes:
    ax.legend()
fig.tight_layout()
fig.savefig(workdir / "batches.png", dpi=110)  # the study switched matplotlib to Agg
plt.close(fig)
display(Image(str(workdir / "batches.png")))

# %% [markdown]
# ## Path geometry (RSI / EB)
# "No wrong turns" (Guille-Escuret et al., ICML 2024): along a training path, the
# restricted secant inequality `RSI = <g, w - w*> / ||w - w*||²` and the error bound
# `EB = ||g|| / ||w - w*||` against the path's own end point `w*`. Their ratio is the
# cosine between the gradient and the direction to `w*`, and `RSI / EB²` is the step size
# that would shrink the distance to `w*` the most (the locally optimal learning rate).
# `w*` is only known after training, so the run is trained once, then replayed bitwise
# (same data order, same jitted step) while `optlab.path_geometry` measures every step.
# (`python -m experiments run geometry` does this for whole studies, with
# `experiments/train/replay.py`.)


# %%
def sgd_path(model_name, seed=0, batch=16, lr=0.03, reference=None):
    """Momentum SGD for EPOCHS epochs; with ``reference``, the geometry of every step's
    mini-batch gradient against it. Returns (final params, geometry per step or None)."""
    model = make_model(model_name, num_classes=10)
    params, model_state = model.init(jax.random.key(seed), probe["x"][:1])
    tx = optax.sgd(lr, momentum=0.9)
    opt_state = tx.init(params)

    def loss(p, x, y):
        logits, _ = model.apply(p, model_state, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y, ref):
        grads = jax.grad(loss)(p, x, y)
        geometry = optlab.path_geometry(grads, p, ref)
        updates, s = tx.update(grads, s)
        return optax.apply_updates(p, updates), s, geometry

    rng = np.random.default_rng(seed)
    ref = params if reference is None else reference  # the first pass measures nothing
    rows = []
    for _ in range(EPOCHS):
        order = rng.permutation(len(data.x_train))
        for s in range(len(order) // batch):
            i = order[s * batch : (s + 1) * batch]
            params, opt_state, g = step(params, opt_state, data.x_train[i], data.y_train[i], ref)
            rows.append(g)
    geometry = None if reference is None else jax.tree.map(lambda *v: np.stack(v), *rows)
    return params, geometry


final, _ = sgd_path(ARCHITECTURES[0])
replayed, geometry = sgd_path(ARCHITECTURES[0], reference=final)
same = all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), final, replayed)))
print("the replay reproduces the first run bitwise:", same)
print(f"steps with a positive cosine: {100 * np.mean(geometry.cosine > 0):.1f} %")

fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
for ax, (label, values) in zip(
    axes,
    [
        ("cos(g, w - w*)", geometry.cosine),
        ("RSI / EB² (optimal lr)", geometry.optimal_lr),
        ("||w - w*||", geometry.distance),
    ],
    strict=True,
):
    ax.plot(values, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
axes[1].set_yscale("log")
fig.tight_layout()
plt.show()

# %% [markdown]
# The full experiments (`python -m experiments run divebatch`, `python -m experiments run
# width`) add the fixed large batch, MNIST-1D, learning rates tuned on a validation split,
# 5 seeds, and wide against deep networks across batch sizes, with `results.md` verdicts.

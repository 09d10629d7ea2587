# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Multilayer Lookahead: fast and slow weights
#
# `optlab.multilayer_lookahead` nests Lookahead (Zhang et al., NeurIPS 2019) inside itself
# (Pushkin & Barba, arXiv:2110.14254): the fast weights take `k_1` steps of the inner optimizer,
# then level 1's slow weights move a fraction `alpha_1` towards them and the fast weights are
# reset to them; every `k_2` such syncs level 2 does the same with level 1's slow weights, and
# so on. The params stay the model's own tree (the fast weights); the slow weights live in the
# optimizer state, and `optlab.slow_params(opt_state)` returns the slowest ones, the weights to
# evaluate.
#
# This notebook trains a small MLP on the offline digits dataset and evaluates the fast weights
# and every level's slow weights on the test set as training goes, next to plain SGD with the
# same learning rate and batches. Works on Colab (CPU, GPU or TPU runtime) and locally.

# %% tags=["parameters"]
STEPS = 400  # training steps
EVAL_EVERY = 1  # evaluate fast and slow weights every this many steps
LEVELS = ((5, 0.5), (5, 0.5))  # (k, alpha) per level, fastest first
LEARNING_RATE = 0.1  # of the inner SGD
BATCH_SIZE = 64
SEED = 0
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
# ## Data, model and the two optimizers
# The inner optimizer is plain SGD; `multilayer_lookahead` wraps it (one level is
# `optlab.lookahead`). Lookahead must be the outermost transform: it emits `slow - params` on
# sync steps, which a later learning-rate scaling would corrupt.

# %%
import optax

import optlab
from experiments.data import BatchIterator, load_dataset
from experiments.models import make_model, param_count
from experiments.train import classification_loss, init_train_state, make_evaluator, make_train_step

data = load_dataset("digits")
model = make_model("mlp", num_classes=data.num_classes, hidden=(64,))
params, model_state = model.init(jax.random.key(SEED), data.x_train[:1])
print(f"{len(data.x_train)} training and {len(data.x_test)} test images, {param_count(params):,} parameters")

optimizers = {
    "sgd": optax.sgd(LEARNING_RATE),
    "lookahead": optlab.multilayer_lookahead(optax.sgd(LEARNING_RATE), levels=LEVELS),
}
evaluate = make_evaluator(model, data.x_test, data.y_test)

# %% [markdown]
# ## Training, evaluating every level
# `LookaheadState.slow` holds one tree of slow weights per level, fastest first; it sits inside
# the train state's `opt_state` (wrapped by optax), and `slow_params` finds the slowest.

# %%
import numpy as np


def lookahead_state(opt_state):
    """The LookaheadState inside a (wrapped) optimizer state."""
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, optlab.LookaheadState))
    return next(n for n in nodes if isinstance(n, optlab.LookaheadState))


history = {}  # curve name -> list of (step, test accuracy, test loss)
for name, tx in optimizers.items():
    compiled = make_train_step(classification_loss(model), tx)
    state = compiled.put_state(init_train_state(params, model_state, tx, jax.random.key(SEED)))
    batches = BatchIterator(data.x_train, data.y_train, BATCH_SIZE, seed=SEED)
    for step in range(1, STEPS + 1):
        state, _ = compiled.step(state, compiled.put_batch(batches.batch_at(step - 1)))
        if step % EVAL_EVERY and step != STEPS:
            continue
        weights = {f"{name}: fast (params)": state.params}
        if name == "lookahead":
            slow = lookahead_state(state.opt_state).slow
            weights.update({f"{name}: level {i + 1} slow": w for i, w in enumerate(slow)})
            # slow_params is what an experiment evaluates: the slowest level.
            assert optlab.slow_params(state.opt_state) is slow[-1]
        for label, w in weights.items():
            result = evaluate(w, state.model_state)
            history.setdefault(label, []).append((step, result["accuracy"], result["loss"]))

for label, rows in history.items():
    _, acc, loss = rows[-1]
    print(f"{label:26s} final test accuracy {100 * acc:6.2f}%  loss {loss:.4f}")

# %% [markdown]
# ## Slow versus fast weights
# Between syncs the fast weights wander with the SGD noise; each level's slow weights move only
# at its syncs (every `k_1`, `k_1 k_2`, ... steps), as an interpolation of the weights below, so
# their curves are steps. Right after a level-l sync the fast weights and levels 1..l coincide
# (the last of the default 400 steps is such a point for both levels). With the same learning
# rate the slow weights progress more slowly (each sync keeps a fraction `1 - alpha` of the old
# point): compare with plain SGD.

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for label, rows in history.items():
    steps, acc, loss = (np.array(c) for c in zip(*rows, strict=True))
    style = "--" if label.startswith("sgd") else "-"
    axes[0].plot(steps, 100 * acc, style, label=label, lw=1.2)
    axes[1].plot(steps, loss, style, label=label, lw=1.2)
axes[0].set_ylabel("test accuracy (%)")
axes[1].set_ylabel("test loss")
axes[1].set_yscale("log")
for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
axes[0].set_ylim(bottom=max(0.0, axes[0].get_ylim()[0]))
axes[0].legend(fontsize=8)
fig.suptitle(f"digits MLP, SGD lr {LEARNING_RATE}, Multilayer Lookahead levels {LEVELS}")
fig.tight_layout()
plt.show()

# %% [markdown]
# The `lookahead` experiment (`python -m experiments run lookahead`) makes the same comparison
# over 5 seeds, with Adam as well, 1 to 3 levels, two datasets and a learning-rate sweep, and
# states whether the papers' claims held.

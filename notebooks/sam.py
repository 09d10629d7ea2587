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
# # SAM vs SGD: a flatter minimum, and does it generalise better?
#
# Sharpness-Aware Minimization (Foret et al., ICLR 2021) takes each gradient at the worst
# nearby point `x + rho g/|g|`. Here `optlab.sam` and SGD train the same MLP on the offline
# digits data over a few seeds; at the end we measure test accuracy, the top eigenvalue of the
# training loss's Hessian (`optlab.hessian_top_eigenvalue`, power iteration on
# Hessian-vector products) and its trace (`optlab.hessian_trace`), and look at the loss along
# the top eigenvector. Works on Colab (CPU, GPU or TPU runtime) and locally. Edit the next
# cell to change the budget.

# %% tags=["parameters"]
STEPS = 500  # training steps per run (batch 64)
SEEDS = (0, 1, 2)
RHO = 0.05  # SAM's radius
SHARPNESS_EXAMPLES = 512  # training examples the Hessian is measured on
POWER_ITERS = 20  # Hessian-vector products of the power iteration
TRACE_SAMPLES = 10  # Hutchinson probes of the Hessian trace
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
# ## Train SGD and SAM
# The `sam` experiment's quick config, reduced to two methods on digits: SGD with momentum
# 0.9 and cosine decay, and the same SGD fed SAM's gradient at a fixed `RHO` (the experiment
# tunes rho on a validation split; 15% of the training set is held out for it here too).
# Both losses carry the same L2 term. The Hessian is measured in evaluation mode on the first
# `SHARPNESS_EXAMPLES` training examples, the same for every run, by the experiment's
# `final_metrics` hook; we wrap that hook to also keep the final weights for the plot below.

# %%
import dataclasses
import tempfile
from pathlib import Path

from experiments import study as st
from experiments.configs.sam import get_config
from experiments.runners import sam as sam_experiment

config = get_config("quick")
config.tasks = {"digits": {**config.tasks.digits.to_dict(), "steps": STEPS, "epochs": 0}}
config.seeds = tuple(SEEDS)
config.log_every = max(1, STEPS // 20)
config.eval_every = 5 * config.log_every  # test accuracy along the way, for the curves
# SAM at a fixed RHO: drop its rho grid (and the tuning over it)
sam_spec = {k: v for k, v in config.methods.sam.to_dict().items() if k not in ("axes", "tune")}
config.methods.sam = {**sam_spec, "rho": RHO}
config.method_names = ("sgd", "sam")  # the claims of other methods are skipped
config.sharpness.num_examples, config.sharpness.iters = SHARPNESS_EXAMPLES, POWER_ITERS
config.sharpness.trace_samples = TRACE_SAMPLES
study = sam_experiment.build_study(config)  # validates the config
print(st.describe(study))

measure = study.final_metrics
final = {}  # method -> (the last seed's final weights and model state, the task's data)


def final_metrics(data, method, spec, params, model_state):
    # params: the weights of every run of the method, stacked along a leading axis (seeds)
    final[method.name] = (jax.tree.map(lambda a: a[-1], (params, model_state)), data)
    return measure(data, method, spec, params, model_state)


workdir = Path(tempfile.mkdtemp(prefix="optlab-sam-"))
results = st.run_study(
    dataclasses.replace(study, final_metrics=final_metrics), workdir, progress=False
)

# %% [markdown]
# ## Test accuracy and sharpness
# Mean ± std over seeds. Each verdict is a paired t-interval of the per-seed difference.

# %%
from IPython.display import Image, Markdown, display

# results.md without its "Plots" section (relative image links); the curves follow.
report = (workdir / "results.md").read_text().split("\n## Plots")[0]
display(Markdown(report))
display(Image(str(workdir / "curves_digits.png")))

# %% [markdown]
# ## The loss along the top Hessian eigenvector
# Left, for the last seed's final weights of each method: the training loss (eval mode, the
# same examples as above, without the L2 term) at `x + t v`, with `v` the unit top
# eigenvector. A flatter minimum rises more slowly. Right: sharpness against test accuracy,
# mean ± std over seeds, from `results["summaries"]`.

# %%
import functools

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import optlab
from experiments.models import make_model


def make_train_loss(model, model_state):
    """The training cross-entropy (eval mode, without the L2 term) of ``params`` on ``batch``."""

    def train_loss(params, batch):
        logits, _ = model.apply(params, model_state, batch["x"], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return train_loss


@functools.partial(jax.jit, static_argnums=0)
def flatness(train_loss, params, batch, ts):
    """The top Hessian eigenvalue, and the loss at ``params + t v`` for each t (v: its eigenvector)."""
    top, v = optlab.hessian_top_eigenvalue(
        train_loss, params, batch, key=jax.random.key(0), iters=POWER_ITERS, return_vector=True
    )
    along = lambda t: train_loss(jax.tree.map(lambda p, d: p + t * d, params, v), batch)
    return top, jax.vmap(along)(ts)


ts = jnp.linspace(-1.0, 1.0, 41)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for method, ((params, model_state), data) in final.items():
    model = make_model(data.task.model, num_classes=data.dataset.num_classes)
    n = SHARPNESS_EXAMPLES
    batch = {"x": jnp.asarray(data.dataset.x_train[:n]), "y": jnp.asarray(data.dataset.y_train[:n])}
    top, losses = flatness(make_train_loss(model, model_state), params, batch, ts)
    axes[0].plot(ts, losses, label=f"{method} (top eigenvalue {float(top):.2f})")
for row in results["summaries"]:  # one per (task, method, point); NaN (diverged) is null
    eig, acc = (
        np.array([row[k]["mean"], row[k]["std"]], float)
        for k in ("hessian_top_eigenvalue", "test_accuracy")
    )
    axes[1].errorbar(eig[0], 100 * acc[0], xerr=eig[1], yerr=100 * acc[1], marker="o",
                     capsize=4, label=row["method"])  # fmt: skip
axes[0].set_xlabel("t (distance along the top eigenvector)")
axes[0].set_ylabel("training loss")
axes[0].legend()
axes[1].set_xlabel("top Hessian eigenvalue (mean ± std over seeds)")
axes[1].set_ylabel("test accuracy (%)")
axes[1].legend()
fig.tight_layout()
fig.savefig(workdir / "flatness.png", dpi=110)  # the study switched matplotlib to Agg
plt.close(fig)
display(Image(str(workdir / "flatness.png")))

# %% [markdown]
# The full experiment (`python -m experiments run sam`) adds ASAM, SA-SAM, average-direction
# SAM, a rho grid picked on the validation split, MNIST-1D, and writes `results.md` with
# the verdicts.

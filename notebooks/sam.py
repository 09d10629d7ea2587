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
# # SAM vs SGD: a flatter minimum, and does it generalise better?
#
# Sharpness-Aware Minimization (Foret et al., ICLR 2021) takes each gradient at the worst
# nearby point `x + rho g/|g|`. Here `optlab.sam` and plain SGD train the same MLP on the
# offline digits data over a few seeds; at the end we measure test accuracy and the top
# eigenvalue of the training loss's Hessian (`optlab.hessian_top_eigenvalue`, power
# iteration on Hessian-vector products), and look at the loss along that eigenvector.
# Works on Colab (CPU, GPU or TPU runtime) and locally. Edit the next cell to change the budget.

# %% tags=["parameters"]
STEPS = 500  # training steps per run (batch 64)
SEEDS = (0, 1, 2)
RHO = 0.05  # SAM's radius
SHARPNESS_EXAMPLES = 512  # training examples the Hessian is measured on
POWER_ITERS = 20  # Hessian-vector products of the power iteration
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
# The `sam` experiment's quick config, reduced to two methods on digits: plain SGD at a
# constant 0.1, and the same SGD fed SAM's gradient. 15% of the training set is held out
# (the experiment uses it to pick rho); the Hessian is measured in evaluation mode on a
# fixed subset of the training set, the same for every run.

# %%
import tempfile

from experiments import reporting
from experiments.configs.sam import get_config
from experiments.models import make_model
from experiments.runners import sam as sam_experiment
from experiments.suite import load_suite_data, run_suite

config = get_config("quick")
config.datasets, config.models = ("digits",), ("mlp",)
config.dataset, config.model = "digits", "mlp"
config.steps, config.task_steps = STEPS, ()
config.seeds = tuple(SEEDS)
config.checkpoint_every = config.log_every = max(1, STEPS // 20)
sgd = config.methods.sgd.to_dict()
config.methods = {"sgd": sgd, "sam": {**sgd, "transform": "sam", "rho": RHO}}
config.method_names = ("sgd", "sam")
config.sharpness.num_examples, config.sharpness.iters = SHARPNESS_EXAMPLES, POWER_ITERS
sam_experiment.validate(config)

data, x_val, y_val = sam_experiment.split_validation(
    load_suite_data(config), config.validation_fraction, seed=config.data_seed
)
model = make_model(config.model, num_classes=data.num_classes)
measure = sam_experiment.make_final_metrics(model, data, x_val, y_val, **config.sharpness.to_dict())
final_params = {}


def final_metrics(method, params, model_state, dataset):
    final_params[method] = params  # the last seed's weights, for the plot below
    return measure(method, params, model_state, dataset)


workdir = tempfile.mkdtemp(prefix="optlab-sam-")
runs = run_suite(
    config,
    workdir,
    dataset=data,
    tx_factory=sam_experiment.make_tx,
    final_metrics=final_metrics,
)

# %% [markdown]
# ## Test accuracy and sharpness
# Mean ± std over seeds. Verdicts compare the seed means against twice their standard error.

# %%
from IPython.display import Image, Markdown, display

metrics = ("test_accuracy", "hessian_top_eigenvalue", "hessian_trace", "train_loss")
summary = reporting.summarize(runs, metrics)
verdicts = [
    reporting.compare(summary, "sam", "sgd", claim="SAM >= SGD in test accuracy"),
    reporting.compare(
        summary,
        "sam",
        "sgd",
        metric="hessian_top_eigenvalue",
        higher_is_better=False,
        scale=1.0,
        unit="",
        claim="SAM ends in a flatter minimum than SGD (lower top Hessian eigenvalue)",
    ),
]
display(Markdown(reporting.markdown_table(summary, metrics)))
display(Markdown("\n".join(v.line() for v in verdicts)))
display(Image(f"{workdir}/{reporting.plot_curves(workdir, ['sgd', 'sam'])}"))

# %% [markdown]
# ## The loss along the top Hessian eigenvector
# For the last seed's final weights of each method: the training loss (eval mode, the same
# examples as above) at `x + t v`, with `v` the unit top eigenvector. A flatter minimum
# rises more slowly.

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import optlab

x = jnp.asarray(data.x_train[:SHARPNESS_EXAMPLES])
y = jnp.asarray(data.y_train[:SHARPNESS_EXAMPLES])


def train_loss(params, batch):
    logits, _ = model.apply(params, {}, batch["x"], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


ts = np.linspace(-1.0, 1.0, 41)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for method, params in final_params.items():
    top, v = optlab.hessian_top_eigenvalue(
        train_loss,
        params,
        {"x": x, "y": y},
        key=jax.random.key(0),
        iters=POWER_ITERS,
        return_vector=True,
    )
    losses = [
        float(train_loss(jax.tree.map(lambda p, d, t=t: p + t * d, params, v), {"x": x, "y": y}))
        for t in ts
    ]
    axes[0].plot(ts, losses, label=f"{method} (top eigenvalue {float(top):.2f})")
for i, method in enumerate(("sgd", "sam")):
    stats = summary[method]
    axes[1].bar(
        i,
        stats["hessian_top_eigenvalue"]["mean"],
        yerr=stats["hessian_top_eigenvalue"]["std"],
        capsize=4,
        label=f"{method}: test acc {100 * stats['test_accuracy']['mean']:.2f}%",
    )
axes[0].set_xlabel("t (distance along the top eigenvector)")
axes[0].set_ylabel("training loss")
axes[0].legend()
axes[1].set_xticks([0, 1], ["sgd", "sam"])
axes[1].set_ylabel("top Hessian eigenvalue (mean ± std over seeds)")
axes[1].legend()
fig.tight_layout()
fig.savefig(f"{workdir}/flatness.png", dpi=110)  # reporting switched matplotlib to Agg
plt.close(fig)
display(Image(f"{workdir}/flatness.png"))

# %% [markdown]
# The full experiment (`python -m experiments run sam`) adds ASAM, SA-SAM, average-direction
# SAM, a rho grid picked on the validation split, MNIST-1D, and writes `results.md` with
# the verdicts.

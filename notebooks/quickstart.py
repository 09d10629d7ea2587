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
# # optlab quickstart
#
# Train a small classifier on the offline digits dataset with the optlab harness, compare
# optimizers over seeds, and run the same step data parallel over several devices.
# Works on Colab (CPU, GPU or TPU runtime) and locally. Edit the next cell to change the budget.

# %% tags=["parameters"]
STEPS = 400  # training steps per run
SEEDS = (0, 1, 2)
METHODS = ("sgd", "momentum", "adam")
REPO_DIR = ".."  # where the optlab checkout is, if it still has to be installed

# %%
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("optlab") is None:
    # On Colab: upload or clone the repository first and point REPO_DIR at it.
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", REPO_DIR])

import jax

# Four virtual CPU devices, to see data parallelism without accelerators (this only affects
# the CPU backend, and only works before JAX's first operation: restart the kernel if not).
try:
    jax.config.update("jax_num_cpu_devices", 4)
except RuntimeError as error:
    print("keeping the current devices:", error)
print(jax.default_backend(), jax.devices())

# %% [markdown]
# ## The data and the baselines study
# The `baselines` experiment's quick config, with the budget set above. Every method sees the
# same data split, the same seeds and the same number of steps; the seeds of one method train
# as one vectorized program. `run` returns what it writes to `results.json` (runs, summaries,
# verdicts) and also writes `results.md` and the plots into the workdir.

# %%
import tempfile
from pathlib import Path

from experiments.configs.baselines import get_config
from experiments.runners import baselines

config = get_config("quick")
config.tasks.digits.steps, config.tasks.digits.epochs = STEPS, 0  # steps, not epochs
config.seeds = tuple(SEEDS)
config.method_names = tuple(METHODS)
config.log_every = max(1, STEPS // 20)
config.eval_every = 5 * config.log_every  # test accuracy along the way, for the curves
print(baselines.plan(config))
workdir = Path(tempfile.mkdtemp(prefix="optlab-quickstart-"))
results = baselines.run(config, workdir, progress=False)

# %%
from IPython.display import Image, Markdown, display

# results.md without its "Plots" section (relative image links); the plots follow.
report = (workdir / "results.md").read_text().split("\n## Plots")[0]
display(Markdown(report))
for plot in results["plots"]:
    display(Image(str(workdir / plot)))

# %% [markdown]
# ## The same step, data parallel
# `make_train_step(..., num_devices=N)` shards the batch over N devices with `jax.shard_map`
# and averages gradients; the result equals the single-device step up to float rounding.

# %%
import numpy as np
import optax

from experiments.data import BatchIterator, load_dataset
from experiments.models import make_model
from experiments.train import classification_loss, init_train_state, make_train_step

data = load_dataset("digits")
model = make_model("mlp", num_classes=data.num_classes)
params, model_state = model.init(jax.random.key(0), data.x_train[:1])
batches = BatchIterator(data.x_train, data.y_train, 64, seed=0)
final = {}
for n in sorted({1, len(jax.devices())}):
    compiled = make_train_step(classification_loss(model), optax.adam(1e-3), num_devices=n)
    state = compiled.put_state(
        init_train_state(params, model_state, optax.adam(1e-3), jax.random.key(0))
    )
    for step in range(20):
        state, metrics = compiled.step(state, compiled.put_batch(batches.batch_at(step)))
    final[n] = jax.tree.leaves(jax.device_get(state.params))
    print(f"{n} device(s): loss after 20 steps {float(metrics['loss']):.5f}")
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(final[1], final[max(final)], strict=True))
print(f"largest parameter difference, 1 vs {max(final)} devices: {diff:.2e}")

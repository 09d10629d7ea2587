"""The experiments ``python -m experiments`` knows, with what ``list`` shows about them.

Importing this module imports neither the runners nor JAX, so ``python -m experiments list``
is instant; :meth:`Experiment.runner_module` and :meth:`Experiment.config_module` import
them on demand. Each runner's ``CLAIM`` is the ``claim`` here, and ``runtime`` repeats the
measured runtime of the config module's header.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

VARIANTS = ("smoke", "quick", "full")
DEFAULT_VARIANT = "quick"


class Experiment(NamedTuple):
    """One experiment.

    Attributes:
      name: what ``python -m experiments run NAME`` takes.
      runner: the runner module (``validate``, ``run``, optionally ``plan``).
      config: the config module (``get_config(variant)``).
      claim: the claim the experiment checks, one sentence or two.
      variants: the config variants ``get_config`` accepts, a subset of :data:`VARIANTS`.
      runtime: the measured runtime of each variant, as in the config's header.
    """

    name: str
    runner: str
    config: str
    claim: str
    variants: tuple[str, ...]
    runtime: str

    def runner_module(self) -> ModuleType:
        return importlib.import_module(self.runner)

    def config_module(self) -> ModuleType:
        return importlib.import_module(self.config)


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "baselines",
            "experiments.runners.baselines",
            "experiments.configs.baselines",
            claim=(
                "Reference numbers, no paper claim: SGD, momentum SGD and Adam trained on the "
                "same data, seeds and budget; later methods are compared with these."
            ),
            variants=("smoke", "quick", "full"),
            runtime="quick: 9 s on a 2-core CPU; full: hours on one GPU",
        ),
        Experiment(
            "lookahead",
            "experiments.runners.lookahead",
            "experiments.configs.lookahead",
            claim=(
                "Lookahead (Zhang et al., NeurIPS 2019) reaches at least its inner optimizer's "
                "accuracy with lower learning-rate sensitivity; Multilayer Lookahead (Pushkin "
                "& Barba 2021) outperforms Lookahead."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 150 s on a 2-core CPU (cold compilation cache); full: days on one GPU"
            ),
        ),
        Experiment(
            "sam",
            "experiments.runners.sam",
            "experiments.configs.sam",
            claim=(
                "SAM, ASAM, SA-SAM and average-direction SAM find flatter minima (smaller top "
                "Hessian eigenvalue) than SGD and generalise better; SA-SAM needs no rho "
                "tuning to match SAM with a tuned rho (Foret et al. ICLR 2021; Kwon et al. "
                "ICML 2021; Naganuma et al. ICLR 2024 TP; Zhu et al. ICML 2023)."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 103-109 s on a 2-core CPU (cold compilation cache); "
                "full: about a day on one GPU"
            ),
        ),
        Experiment(
            "extrapolation",
            "experiments.runners.extrapolation",
            "experiments.configs.extrapolation",
            claim=(
                "At a fixed number of epochs with linear LR scaling and warm-up, EXTRAP-SGD "
                "(and its past/noise variants) keeps more test accuracy than mini-batch SGD as "
                "the batch grows (Lin, Kong, Stich, Jaggi, ICML 2020)."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 94 s on a 2-core CPU (cold compilation cache); full: about a day on one GPU"
            ),
        ),
        Experiment(
            "dpf",
            "experiments.runners.dpf",
            "experiments.configs.dpf",
            claim=(
                "Dynamic Pruning with Feedback (Lin et al., ICLR 2020) reaches the dense "
                "model's accuracy at high sparsity in one pass and beats gradual magnitude "
                "pruning without feedback."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 395 CPU-seconds on a contended 2-core CPU (digits CNN 357, MNIST-1D "
                "MLP 38; cold compilation cache); full: days on one GPU"
            ),
        ),
    )
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]

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
            "geometry",
            "experiments.runners.geometry",
            "experiments.configs.geometry",
            claim=(
                "Along SGD, momentum and Adam paths the mini-batch gradient's cosine with "
                "w - w* (w* the final iterate) stays positive, and the locally optimal "
                "learning rate RSI/EB² traces warm-up, plateau and decay (Guille-Escuret, "
                "Naganuma, Fatras, Mitliagkas, ICML 2024)."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 260-328 s wall on a shared 2-core CPU at load 15-20 (65-94 s CPU); "
                "full: about a day on one GPU"
            ),
        ),
        Experiment(
            "local_sgd",
            "experiments.runners.local_sgd",
            "experiments.configs.local_sgd",
            claim=(
                "On 8 workers DiLoCo matches synchronous data parallelism while communicating "
                "H times less (Douillard et al. 2023), and PALSGD reaches the same quality in "
                "less time than DiLoCo and data parallelism (Naganuma et al., TMLR 2025); "
                "Local SGD and post-local SGD (Stich 2019; Lin et al. 2020) as references."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 50 s on a 2-core CPU (cold compilation cache); full: GPU/TPU"
            ),
        ),
        Experiment(
            "ood",
            "experiments.runners.ood",
            "experiments.configs.ood",
            claim=(
                "Adaptive optimizers (Adam) generalise worse out of distribution (rotated, "
                "noisy, spurious-feature test sets) than SGD and momentum SGD at equal "
                "in-distribution accuracy (Naganuma et al., TMLR 2023)."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 130-244 s wall on a shared 2-core CPU at load 15-20 (30-43 s CPU); "
                "full: about a day on one GPU"
            ),
        ),
        Experiment(
            "dsgd",
            "experiments.runners.dsgd",
            "experiments.configs.dsgd",
            claim=(
                "Decentralized SGD (ring, exponential graph) generalises better than C-SGD "
                "(synchronous data parallelism), and its advantage widens as the total batch "
                "grows: it implicitly minimises an average-direction SAM loss whose radius is "
                "the consensus distance (Zhu et al., ICML 2023)."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 469 s on a 2-core CPU under load (83 s of CPU time); "
                "full: about a day on one GPU"
            ),
        ),
        Experiment(
            "gradalign",
            "experiments.runners.gradalign",
            "experiments.configs.gradalign",
            claim=(
                "GradAlign (Dandi, Barba, Jaggi, AAAI 2022) reaches a higher test accuracy than "
                "large batch (synchronous data parallel) SGD at a suitable beta and reduces "
                "the normalised variance of the workers' gradients."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 637 s on a 2-core CPU under load (103 s of CPU time); "
                "full: hours on one GPU"
            ),
        ),
        Experiment(
            "continual",
            "experiments.runners.continual",
            "experiments.configs.continual",
            claim=(
                "Spectral regularization (Lewandowski et al., ICLR 2025) sustains trainability "
                "on streams of tasks (permuted pixels, label flips, class-incremental): a late "
                "task's accuracy after training on it beats plain SGD's, and it is less "
                "sensitive to its strength than L2, L2 Init and the Wasserstein regularizer."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 232 s of CPU (22.5 min wall at a 17 % share of a shared 2-core CPU); "
                "full: days on one GPU"
            ),
        ),
        Experiment(
            "divebatch",
            "experiments.runners.divebatch",
            "experiments.configs.divebatch",
            claim=(
                "DiveBatch (Chen, Wang, Sundaram, arXiv:2509.16173), growing the batch to "
                "delta * n * gradient diversity, converges 1.06-5x faster than a fixed small "
                "batch and than AdaBatch, with a slight loss of final accuracy."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 517 s on a 2-core CPU under heavy contention (78 s CPU time); "
                "full: about a day on one GPU"
            ),
        ),
        Experiment(
            "width",
            "experiments.runners.width",
            "experiments.configs.width",
            claim=(
                "At a fixed number of parameters, wider networks have a larger gradient "
                "diversity and tolerate larger batches (no more epochs to a target) than "
                "deeper ones (Chen, Wang, Zhao, Papailiopoulos, Koutris, NeurIPS 2018)."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 260 s on a 2-core CPU under heavy contention (59 s CPU time); "
                "full: hours on one GPU"
            ),
        ),
        Experiment(
            "federated",
            "experiments.runners.federated",
            "experiments.configs.federated",
            claim=(
                "FedAWARE (Zeng et al., arXiv:2310.02702) improves on FedAvg under "
                "label-skewed clients, and FedGA (Dandi, Barba, Jaggi, AAAI 2022) improves on "
                "FedAvg, at equal rounds, local steps and client learning rate."
            ),
            variants=("smoke", "quick", "full"),
            runtime=(
                "quick: 254 s on a shared 2-core CPU (190 s CPU time, cold compilation "
                "cache); full: hours on one GPU"
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

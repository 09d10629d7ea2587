"""Config of the `sam` experiment: SGD vs SAM, ASAM, SA-SAM and average-direction SAM.

Command:  python -m experiments run sam [--variant quick|full] [--config.key=value ...]
Runtime:  quick: 118 s measured on a 2-core CPU shared with other jobs (load average 1.2-1.7;
          a busier machine is several times slower): MLPs on digits (500 steps) and
          MNIST-1D (2000 steps), 10 methods x 5 seeds, batch 64, plus a Hessian power
          iteration and trace per run.
          A second invocation on the same workdir resumes (about 15 s: re-evaluation only).
          full: ResNet-20 on CIFAR-10 (TFDS or raw files in --config.data_dir), 200 epochs
          (78k steps of batch 128) per run, 10 methods x 3 seeds; about a day on one GPU.
Claim:    SAM (Foret et al., ICLR 2021), ASAM (Kwon et al., ICML 2021), SA-SAM (Naganuma
          et al., ICLR 2024 Tiny Papers) and average-direction SAM (Zhu et al., ICML 2023)
          find flatter minima (smaller top Hessian eigenvalue of the training loss) than
          SGD and generalise better (higher test accuracy); SA-SAM does so without tuning
          rho, matching SAM with a tuned rho.

Methods are specs of ``experiments.optimizers`` (the base optimizer) plus a ``transform``:
``"none"`` (the base optimizer alone), ``"sam"``, ``"asam"`` (``optlab.sam(...,
adaptive=True)``), ``"sa_sam"`` (``optlab.sa_sam``: its own step size from the local
smoothness, ``learning_rate`` is its initial step size and ``optimizer`` is ignored) or
``"average_direction_sam"``. Methods sharing a ``tune_group`` form a grid: the runner picks
the member with the best mean accuracy on a validation split held out of the training set
(``validation_fraction``), the same choice for every seed, and reports it as the tuned
method (e.g. SAM with its rho picked from {0.02, 0.05, 0.1}).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments.suite import suite_config

SAM_RHOS = (0.02, 0.05, 0.1)
AVG_SIGMAS = (0.01, 0.02, 0.05)


def _methods(base: dict[str, Any], *, asam_rho: float, sa_sam_lr: float) -> dict:
    """The method specs; ``base`` is the base optimizer every method wraps."""
    methods: dict[str, dict[str, Any]] = {"sgd": {**base, "transform": "none"}}
    for rho in SAM_RHOS:
        methods[_name("sam_rho", rho)] = {
            **base,
            "transform": "sam",
            "rho": rho,
            "tune_group": "sam",
        }
    methods["asam"] = {**base, "transform": "asam", "rho": asam_rho, "adaptive_eps": 0.01}
    # SA-SAM: "practical" is the rule the authors' deep-learning code runs, "paper" the
    # published one (see optlab.sa_sam). No weight decay: the harness has no L2 term in the
    # loss, which is where SA-SAM's smoothness estimate needs it.
    sa_sam = {**base, "transform": "sa_sam", "learning_rate": sa_sam_lr, "weight_decay": 0.0}
    methods["sa_sam"] = {**sa_sam, "form": "practical"}
    methods["sa_sam_paper"] = {**sa_sam, "form": "paper"}
    # The paper has no standalone sigma (in D-SGD it is the consensus distance): a grid.
    for sigma in AVG_SIGMAS:
        methods[_name("avg_sam_sigma", sigma)] = {
            **base,
            "transform": "average_direction_sam",
            "sigma": sigma,
            "num_samples": 1,
            "tune_group": "avg_sam",
        }
    return methods


def _name(prefix: str, value: float) -> str:
    # No "." in names: the command line splits --config.methods.NAME.field at dots.
    return prefix + f"{value:g}".replace(".", "p")


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant == "quick":
        # Plain SGD at a constant rate for every method: SA-SAM sets its own step size
        # from the local smoothness (it starts at the same 0.1), so a schedule would only
        # apply to the others.
        base = {"optimizer": "sgd", "learning_rate": 0.1}
        methods = _methods(base, asam_rho=0.5, sa_sam_lr=0.1)
        config = suite_config(
            dataset="digits",  # the first of `datasets`; each task overrides dataset/model
            model="mlp",
            seeds=(0, 1, 2, 3, 4),
            steps=500,
            batch_size=64,
            log_every=25,
            eval_every=0,
            checkpoint_every=250,
            method_names=tuple(methods),
            methods=methods,
        )
        config.datasets = ("digits", "mnist1d")
        # 2000 steps on MNIST-1D: at 500 the MLP still underfits (62% train accuracy), at
        # 2000 it overfits (92% train, 59% test), where a generalisation gain can show.
        config.task_steps = (500, 2000)
        # MLPs: the Hessian power iteration of the 1-D CNN costs ~10 s per run on this CPU
        # (XLA:CPU runs the convolutions inside its fori_loop ~20x slower than unrolled).
        # SA-SAM (base_lr 0.1) sits at its step-size cap 1.0 (rho = 1) for ~90% of the steps
        # here; compare it with SGD at that rate before crediting sharpness awareness.
        config.models = ("mlp", "mlp")
        config.validation_fraction = 0.15
        config.sharpness = {"num_examples": 512, "iters": 20, "trace_samples": 10}
        return config
    if variant == "full":
        # The SAM paper's CIFAR protocol (Foret et al. 2021, sec. 3.1): SGD momentum 0.9,
        # lr 0.1 with cosine decay, weight decay 5e-4, batch 128 (256 in some tables),
        # 200 epochs, rho 0.05 (grid 0.01..0.5 in the paper). ASAM's CIFAR-10 setting:
        # rho 0.5, eta 0.01 (Kwon et al. 2021). SA-SAM: initial step size 0.05, batch 256
        # in its code; here batch 128 like the others. WRN-28-10 in the papers, ResNet-20
        # here (the largest CIFAR model this harness ships is ResNet-110); no data
        # augmentation in this harness (the papers use crop+flip): absolute accuracies are
        # lower, the comparison is on equal terms.
        base = {
            "optimizer": "momentum",
            "learning_rate": 0.1,
            "momentum": 0.9,
            "schedule": "cosine",
            "weight_decay": 5e-4,
        }
        methods = _methods(base, asam_rho=0.5, sa_sam_lr=0.05)
        config = suite_config(
            dataset="cifar10",
            model="resnet20",
            seeds=(0, 1, 2),
            steps=78_000,
            batch_size=128,
            log_every=100,
            eval_every=2_000,
            checkpoint_every=2_000,
            method_names=tuple(methods),
            methods=methods,
        )
        config.datasets = ("cifar10",)
        config.task_steps = ()  # `steps` for every dataset
        config.models = ("resnet20",)
        config.validation_fraction = 0.1
        config.sharpness = {"num_examples": 1024, "iters": 20, "trace_samples": 20}
        return config
    raise ValueError(f"variant must be 'quick' or 'full', got {variant!r}.")

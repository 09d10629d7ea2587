"""Config of the `ood` experiment: SGD, momentum and Adam under distribution shift.

Command:  python -m experiments run ood [--variant smoke|quick|full] [--config.key=value ...]
Runtime:  smoke: about 7 s (tests). quick: 130-244 s wall on the shared 2-core CPU under a
          load average of 15-20 (30-43 s of CPU time): an MLP on digits
          (clean training; rotated and noisy test sets) and on digits with a spurious
          border marker (90 % label-correlated in training, independent at test), 40
          epochs, cosine decay, 3 optimizers x 4 learning rates x 5 seeds per task (each
          optimizer's grid and seeds train as one program). full: ResNet-20 on CIFAR-10
          (TFDS or raw files in --config.data_dir) with the same three shifts, 3 seeds,
          100 epochs: about a day on one GPU.
Claim:    Adaptive optimizers (Adam) generalise worse out of distribution than SGD and
          momentum SGD at equal in-distribution accuracy (Naganuma, Ahuja, Takagi,
          Motokawa, Yoshizoe, Sato, Mitliagkas, "Empirical Study on Optimizer Selection for
          Out-of-Distribution Generalization", TMLR 2023, arXiv:2211.08583 [recall]; there
          on DomainBed, WILDS and shift benchmarks, here on offline data with synthetic
          shifts).

Methods are specs of ``experiments.optimizers``; each tunes its learning rate over its own
grid on the in-distribution validation split. ``ood`` holds the shifts: ``rotation``
(degrees), ``noise_std`` (standardized units), ``spurious_tasks`` (task names trained
with the marker) and ``spurious_correlation``.
"""

from __future__ import annotations

import ml_collections

from experiments.study import study_config


def _methods(sgd, momentum, adam, schedule: str) -> dict:
    def method(spec, grid):
        return {
            **spec,
            "schedule": schedule,
            "axes": {"learning_rate": grid},
            "tune": ("learning_rate",),
        }

    return {
        "sgd": method({"optimizer": "sgd", "learning_rate": sgd[0]}, sgd),
        "momentum": method(
            {"optimizer": "momentum", "learning_rate": momentum[0], "momentum": 0.9}, momentum
        ),
        "adam": method({"optimizer": "adam", "learning_rate": adam[0]}, adam),
    }


def _ood(spurious_tasks: tuple[str, ...]) -> dict:
    return {
        "rotation": 30.0,
        "noise_std": 1.0,
        "spurious_tasks": spurious_tasks,
        "spurious_correlation": 0.9,
    }


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant in ("smoke", "quick"):
        smoke = variant == "smoke"
        if smoke:
            methods = _methods((0.1, 0.3), (0.03,), (1e-3, 3e-3), "cosine")
        else:
            methods = _methods(
                (0.03, 0.1, 0.3, 1.0), (0.01, 0.03, 0.1, 0.3), (1e-3, 3e-3, 1e-2, 3e-2), "cosine"
            )
        config = study_config(
            seeds=(0, 1) if smoke else (0, 1, 2, 3, 4),
            log_every=5 if smoke else 50,
            tasks={
                "digits": {"dataset": "digits", "model": "mlp", "epochs": 1 if smoke else 40},
                "spurious": {"dataset": "digits", "model": "mlp", "epochs": 40},
            },
            task_names=("digits",) if smoke else (),
            method_names=("sgd", "adam") if smoke else tuple(methods),
            methods=methods,
        )
        config.ood = _ood(("spurious",))
        return config
    if variant == "full":
        # CIFAR-10, ResNet-20, batch 128, cosine decay, each optimizer's LR grid tuned on
        # the validation split; the same shifts (rotation, noise, a spurious marker on a
        # second task).
        methods = _methods((0.03, 0.1, 0.3), (0.01, 0.03, 0.1), (1e-4, 3e-4, 1e-3), "cosine")
        config = study_config(
            seeds=(0, 1, 2),
            model="resnet20",
            batch_size=128,
            validation_fraction=0.1,
            log_every=100,
            tasks={
                "cifar10": {"dataset": "cifar10", "epochs": 100},
                "cifar10_spurious": {"dataset": "cifar10", "epochs": 100},
            },
            method_names=tuple(methods),
            methods=methods,
        )
        config.ood = _ood(("cifar10_spurious",))
        config.ood.noise_std = 0.5
        return config
    raise ValueError(f"variant must be 'smoke', 'quick' or 'full', got {variant!r}.")

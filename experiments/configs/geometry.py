"""Config of the `geometry` experiment: RSI, EB and their cosine along SGD/momentum/Adam paths.

Command:  python -m experiments run geometry [--variant smoke|quick|full] [--config.key=value ...]
Runtime:  smoke: about 7 s (tests). quick: 260-328 s wall on the shared 2-core CPU under a
          load average of 15-20 (65-94 s of CPU time; 19-48 s in the study's training): MLPs
          on digits (30 epochs) and MNIST-1D (15 epochs), constant learning rates, 3 optimizers x 5
          seeds, each trained by the study and then twice more by the replay (train, keep
          w_T, replay measuring every step). full: ResNet-20 on CIFAR-10 (TFDS or raw files
          in --config.data_dir), batch 256, 100 epochs, 3 seeds, 3 optimizers; the replay
          triples the training: about a day on one GPU.
Claim:    Guille-Escuret, Naganuma, Fatras, Mitliagkas, "No Wrong Turns: The Simple Geometry
          Of Neural Networks Optimization Paths", ICML 2024: along the path, the mini-batch
          gradient's cosine with w − w* (w* the final iterate) stays positive, and the locally
          optimal learning rate RSI/EB² traces warm-up, plateau and decay.

Methods are specs of ``experiments.optimizers`` with a constant learning rate (the official
code's default, no scheduler), one point each (no axes). ``geometry`` holds the measurement
settings: ``measure_examples`` (the fixed measurement batch, the first training examples;
0: none, as in the smoke variant),
``windows`` (the shape test's windows), ``plot_windows`` (curve resolution) and the claims'
bounds ``positive_bound`` (fraction of steps with a positive cosine) and ``shape_bound``
(start and end of the locally optimal LR relative to its peak).
"""

from __future__ import annotations

import ml_collections

from experiments.study import study_config


def _methods(sgd: float, momentum: float, adam: float) -> dict:
    return {
        "sgd": {"optimizer": "sgd", "learning_rate": sgd},
        "momentum": {"optimizer": "momentum", "learning_rate": momentum, "momentum": 0.9},
        "adam": {"optimizer": "adam", "learning_rate": adam},
    }


def _geometry(measure_examples: int, windows: int = 20) -> dict:
    return {
        "measure_examples": measure_examples,
        "windows": windows,
        "plot_windows": 50,
        "positive_bound": 0.9,
        "shape_bound": 0.75,
    }


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant in ("smoke", "quick"):
        smoke = variant == "smoke"
        methods = _methods(sgd=0.1, momentum=0.01, adam=1e-3)
        config = study_config(
            seeds=(0, 1) if smoke else (0, 1, 2, 3, 4),
            validation_fraction=0.15,
            log_every=5 if smoke else 50,
            tasks={
                "digits": {"dataset": "digits", "model": "mlp", "epochs": 1 if smoke else 30},
                "mnist1d": {"dataset": "mnist1d", "model": "mlp", "epochs": 15},
            },
            task_names=("digits",) if smoke else (),
            method_names=("sgd",) if smoke else tuple(methods),
            methods=methods,
        )
        config.geometry = _geometry(
            measure_examples=0 if smoke else 256, windows=5 if smoke else 20
        )
        if smoke:
            config.geometry.plot_windows = 5
        return config
    if variant == "full":
        # The paper's CIFAR-10 protocol (official scripts): batch 256, momentum 0.9, no
        # scheduler, lr 1e-3 (its grid 1e-4, 5e-4, 1e-3), 100-epoch budget; ResNet-18 there,
        # ResNet-20 here; no data augmentation in this harness.
        methods = _methods(sgd=1e-3, momentum=1e-3, adam=1e-3)
        config = study_config(
            seeds=(0, 1, 2),
            model="resnet20",
            batch_size=256,
            validation_fraction=0.1,
            log_every=100,
            tasks={"cifar10": {"dataset": "cifar10", "epochs": 100}},
            method_names=tuple(methods),
            methods=methods,
        )
        config.geometry = _geometry(measure_examples=1024, windows=20)
        return config
    raise ValueError(f"variant must be 'smoke', 'quick' or 'full', got {variant!r}.")

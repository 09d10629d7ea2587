"""Config of the `extrapolation` experiment: a batch-size sweep, SGD vs EXTRAP-SGD and variants.

Command:  python -m experiments run extrapolation [--variant quick|full] [--config.key=value ...]
Runtime:  quick: 46 s measured on a 2-core CPU shared with other jobs (load average about 2):
          MLP on digits, batch sizes 32, 128, 512 and 1437 (the whole training set), 5
          methods x 3 seeds x 30 epochs each.
          full: ResNet-20 on CIFAR-10 (TFDS or raw files in --config.data_dir), batch sizes
          128..8192, 5 methods x 3 seeds x 300 epochs; about a day on one GPU.
Claim:    Lin, Kong, Stich, Jaggi, "Extrapolation for Large-batch Training in Deep
          Learning", ICML 2020 (arXiv:2006.05720): with linear learning-rate scaling and
          warm-up, mini-batch SGD loses accuracy as the batch grows at a fixed number of
          epochs; extrapolating (EXTRAP-SGD: the gradient at x - gamma g) keeps more of it.

Every method trains for the same number of epochs at every batch size b of
``batch_sizes`` (0 stands for the whole training set): ``epochs * (n // b)`` steps (n =
training examples; an epoch's last incomplete batch is dropped). Its learning rate is
``learning_rate * b / base_batch_size`` (linear scaling rule, Goyal et al. 2017) with a
linear warm-up over ``warmup_epochs``, then ``schedule``: ``"warmup_cosine"`` (cosine decay
to 0) or ``"warmup_step"`` (x0.1 at each fraction in ``decay_fractions`` of
training). Extrapolation methods (``transform: "extrapolation"``) use
``gamma_t = gamma_ratio * lr_t`` (tied to the schedule, warm-up included) with ``direction``
``"gradient"`` (EXTRAP-SGD), ``"past"`` (extrapolation from the past, no extra gradient) or
``"noise"`` (Gaussian noise; ``gamma_ratio`` scales N(0, I) per coordinate, so it is much
smaller); extrapolation stops after ``extrapolation_stop_epoch`` epochs (0: never).
"""

from __future__ import annotations

from typing import Any

import ml_collections


def _methods(base: dict[str, Any], *, noise_ratio: float) -> dict[str, dict[str, Any]]:
    # gamma = 0.1 lr: with heavy-ball momentum beta = 0.9 and the sharpness at the edge of
    # stability, lambda ~ 2 (1 + beta) / lr, the look-ahead x - gamma g stays on the stable
    # side (gamma lambda < 1) only for gamma_ratio < 1 / (2 (1 + beta)) ~ 0.26. The literal
    # tie gamma = lr (ratio 1) is run as well, to show what happens outside that range.
    extrap = {**base, "transform": "extrapolation", "gamma_ratio": 0.1}
    return {
        "sgd": {**base, "transform": "none"},
        "extrap_sgd": {**extrap, "direction": "gradient"},
        "extrap_sgd_c1": {**extrap, "direction": "gradient", "gamma_ratio": 1.0},
        "extrap_past": {**extrap, "direction": "past"},
        # ||N(0, I)|| = sqrt(d) (about 160 for the 26k-parameter MLP): a ratio of 1/200 makes
        # the noise step about as long as a gradient step of norm ~1.
        "extrap_noise": {**extrap, "direction": "noise", "gamma_ratio": noise_ratio},
    }


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant == "quick":
        base = {"optimizer": "momentum", "learning_rate": 0.01, "momentum": 0.9}
        return ml_collections.ConfigDict(
            {
                "dataset": "digits",
                "data_dir": "",
                "data_seed": 0,
                "model": "mlp",
                "seeds": (0, 1, 2),
                "epochs": 30,
                "batch_sizes": (32, 128, 512, 0),  # 0: the whole training set (1437 for digits)
                "base_batch_size": 32,
                "warmup_epochs": 5,
                "schedule": "warmup_cosine",
                "decay_fractions": (0.5, 0.75),
                "extrapolation_stop_epoch": 0,
                "log_points": 10,
                "method_names": (
                    "sgd",
                    "extrap_sgd",
                    "extrap_sgd_c1",
                    "extrap_past",
                    "extrap_noise",
                ),
                "methods": _methods(base, noise_ratio=0.005),
            }
        )
    if variant == "full":
        # Lin et al. 2020, CIFAR-10 ResNet-20: momentum SGD (Nesterov), lr 0.1 per 128
        # examples scaled linearly, 5-epoch warm-up, 300 epochs, x0.1 at 50% and 75%,
        # weight decay 1e-4; extrapolation matters before the first decay, where it stops.
        # No data augmentation in this harness (the paper uses crop+flip).
        base = {
            "optimizer": "nesterov",
            "learning_rate": 0.1,
            "momentum": 0.9,
            "weight_decay": 1e-4,
        }
        return ml_collections.ConfigDict(
            {
                "dataset": "cifar10",
                "data_dir": "",
                "data_seed": 0,
                "model": "resnet20",
                "seeds": (0, 1, 2),
                "epochs": 300,
                "batch_sizes": (128, 1024, 4096, 8192),
                "base_batch_size": 128,
                "warmup_epochs": 5,
                "schedule": "warmup_step",
                "decay_fractions": (0.5, 0.75),
                "extrapolation_stop_epoch": 150,
                "log_points": 100,
                "method_names": (
                    "sgd",
                    "extrap_sgd",
                    "extrap_sgd_c1",
                    "extrap_past",
                    "extrap_noise",
                ),
                "methods": _methods(base, noise_ratio=0.002),  # sqrt(d) ~ 520
            }
        )
    raise ValueError(f"variant must be 'quick' or 'full', got {variant!r}.")

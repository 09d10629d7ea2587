"""Config of the `extrapolation` experiment: a batch-size sweep, SGD vs EXTRAP-SGD and variants.

Command:  python -m experiments run extrapolation [--variant smoke|quick|full]
                                                [--config.key=value ...]
Runtime:  smoke: about 25 s (tests). quick: 94 s wall on a 2-core CPU, with a cold
          compilation cache: MLP on digits, batch
          sizes 32, 128, 512 and the whole training split, 5 seeds x 60 epochs each, momentum
          SGD with linear scaling, 5 warm-up epochs and cosine decay; gamma_ratio (and the
          noise scale) tuned on validation per batch size, trained vectorized with the seeds.
          full: ResNet-20 on CIFAR-10 (TFDS or raw files in --config.data_dir), batch sizes
          128..8192, 300 epochs, 3 seeds; about a day on one GPU.
Claim:    Lin, Kong, Stich, Jaggi, "Extrapolation for Large-batch Training in Deep
          Learning", ICML 2020 (arXiv:2006.05720): with linear learning-rate scaling and
          warm-up, mini-batch SGD loses accuracy as the batch grows at a fixed number of
          epochs; extrapolating (EXTRAP-SGD: the gradient at x - gamma g) keeps more of it.

Tasks are the batch sizes (``tasks.<name>.batch_size``, 0 for the whole training split),
each trained for the same ``epochs``. Methods: an SGD base (``optimizer``, ``learning_rate``
per ``base_batch_size`` examples, ``schedule`` ``"warmup_cosine"`` or ``"warmup_step"`` with
``decay_fractions``, ``warmup_epochs``) and ``transform`` ``"none"`` or ``"extrapolation"``
with ``direction`` (``"gradient"``, ``"past"``, ``"noise"``) and ``gamma_ratio`` (an axis,
tuned); ``stop_epoch`` ends extrapolation (0: never).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments.study import study_config

# About 10 evaluations per run at 60 epochs (steps: 2280, 540, 120 and 60).
EVAL_EVERY = {"b32": 230, "b128": 60, "b512": 20, "full": 10}


def _methods(base: dict[str, Any], noise: tuple[float, ...]) -> dict[str, dict[str, Any]]:
    # gamma = c lr: with heavy-ball momentum 0.9 at the edge of stability the look-ahead
    # x - gamma g stays stable only for c < 1 / (2 (1 + beta)) ~ 0.26; the literal tie
    # gamma = lr (c = 1) is in the grid to show what happens outside that range.
    extrap = {**base, "transform": "extrapolation", "tune": ("gamma_ratio",)}
    return {
        "sgd": {**base, "transform": "none"},
        "extrap_sgd": {
            **extrap,
            "direction": "gradient",
            "gamma_ratio": 0.1,
            "axes": {"gamma_ratio": (0.03, 0.1, 0.3, 1.0)},
        },
        "extrap_past": {
            **extrap,
            "direction": "past",
            "gamma_ratio": 0.1,
            "axes": {"gamma_ratio": (0.03, 0.1, 0.3)},
        },
        # ||N(0, I)|| = sqrt(d): a ratio of ~1/200 makes a noise step about as long as a
        # gradient step of norm ~1 for the 26k-parameter MLP.
        "extrap_noise": {
            **extrap,
            "direction": "noise",
            "gamma_ratio": noise[1],
            "axes": {"gamma_ratio": noise},
        },
    }


def _claims(small: str, large: str) -> dict[str, Any]:
    claims: dict[str, Any] = {}
    for m in ("extrap_sgd", "extrap_past", "extrap_noise"):
        claims[f"{m}_large"] = {"method": m, "baseline": "sgd", "tasks": (large,)}
        claims[f"{m}_drop"] = {
            "method": m,
            "baseline": "sgd",
            "over": "task",
            "aggregate": "drop",
            "tasks": (small, large),
        }
    return claims


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant in ("smoke", "quick"):
        smoke = variant == "smoke"
        base = {
            "optimizer": "momentum",
            "learning_rate": 0.01,
            "momentum": 0.9,
            "base_batch_size": 32,
            "warmup_epochs": 0 if smoke else 5,
            "schedule": "warmup_cosine",
        }
        epochs = 1 if smoke else 60
        sizes = {"b32": 32, "b128": 128, "b512": 512, "full": 0}
        if smoke:
            sizes = {"b32": 32, "full": 0}
        return study_config(
            seeds=(0, 1) if smoke else (0, 1, 2, 3, 4),
            log_every=1 if smoke else 10,
            task_names=tuple(sizes),  # the sweep's order (ConfigDict keys sort otherwise)
            tasks={
                k: {
                    "dataset": "digits",
                    "batch_size": b,
                    "epochs": epochs,
                    "eval_every": 0 if smoke else EVAL_EVERY[k],
                }
                for k, b in sizes.items()
            },
            method_names=("sgd", "extrap_sgd", "extrap_past")
            if smoke
            else ("sgd", "extrap_sgd", "extrap_past", "extrap_noise"),
            methods=_methods(base, noise=(0.002, 0.005, 0.01)),
            claims=_claims("b32", "full"),
        )
    if variant == "full":
        # Lin et al. 2020, CIFAR-10 ResNet-20: Nesterov momentum SGD, lr 0.1 per 128
        # examples scaled linearly, 5-epoch warm-up, 300 epochs, x0.1 at 50 % and 75 %,
        # weight decay 1e-4; extrapolation matters before the first decay, where it stops.
        # No data augmentation in this harness (the paper uses crop+flip).
        base = {
            "optimizer": "nesterov",
            "learning_rate": 0.1,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "base_batch_size": 128,
            "warmup_epochs": 5,
            "schedule": "warmup_step",
            "decay_fractions": (0.5, 0.75),
            "stop_epoch": 150,
        }
        sizes = {"b128": 128, "b1024": 1024, "b4096": 4096, "b8192": 8192}
        return study_config(
            seeds=(0, 1, 2),
            model="resnet20",
            validation_fraction=0.1,
            log_every=10,
            task_names=tuple(sizes),
            tasks={
                k: {"dataset": "cifar10", "batch_size": b, "epochs": 300} for k, b in sizes.items()
            },
            method_names=("sgd", "extrap_sgd", "extrap_past", "extrap_noise"),
            methods=_methods(base, noise=(0.001, 0.002, 0.005)),  # sqrt(d) ~ 520
            claims=_claims("b128", "b8192"),
        )
    raise ValueError(f"variant must be 'smoke', 'quick' or 'full', got {variant!r}.")

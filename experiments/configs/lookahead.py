"""Config of the `lookahead` experiment: (Multilayer) Lookahead vs its inner optimizer.

Command:  python -m experiments run lookahead [--variant smoke|quick|full] [--config.key=value ...]
Runtime:  smoke: about 10 s (tests). quick: 150 s wall on a 2-core CPU, with a cold
          compilation cache (116 s of it training). 8 methods x 5 seeds on digits and
          MNIST-1D (MLP), 60 and 40 epochs, the step schedule
          (x0.2 at 30/60/80 %), momentum 0.9 and weight decay 5e-4 for every SGD method,
          plus SGD, Lookahead and 2-level Lookahead over 5 learning rates (100x, log-spaced):
          200 runs, each method's seeds and rates trained as one program.
          full: ResNet-20 on CIFAR-10 and CIFAR-100 (TFDS or raw files in
          --config.data_dir), 200 epochs, 3 seeds: days on one GPU; run a subset with
          --config.method_names=... and --config.tasks.cifar100.epochs=...
Claim:    Zhang et al. (NeurIPS 2019, arXiv:1907.08610): Lookahead reaches at least the accuracy
          of its inner optimizer (SGD or Adam) and is much less sensitive to the learning rate.
          Pushkin & Barba (arXiv:2110.14254): Multilayer Lookahead (Lookahead nested 2-3 times)
          outperforms Lookahead. Judged with paired per-seed t-intervals: held,
          inconclusive or did not hold.

Methods: ``methods.<m>`` is an ``experiments.optimizers`` spec plus ``lookahead: {"levels":
((k, alpha), ...), "momentum": "keep"|"reset"|"pullback"}`` (one level: ``optlab.lookahead``;
more: ``optlab.multilayer_lookahead``) and ``axes: {"learning_rate": (...)}`` for the
sensitivity sweep (the method's own rate must be one of them: it is the reported point).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments.study import study_config

SGD_FAMILY = ("sgd", "la_sgd", "ml2_sgd", "ml3_sgd")
ADAM_FAMILY = ("adam", "la_adam", "ml2_adam", "ml3_adam")
LR_FACTORS = (0.1, 0.316, 1.0, 3.16, 10.0)  # 100x, log-spaced, centred on the method's rate


def _family(prefix: str, base: dict[str, Any], levels: dict[str, tuple]) -> dict[str, Any]:
    """``{prefix: base, la_prefix: base + lookahead, ml2_prefix: ..., ml3_prefix: ...}``."""
    out: dict[str, Any] = {prefix: dict(base)}
    for tag, lv in levels.items():
        out[f"{tag}_{prefix}"] = {**base, "lookahead": {"levels": lv, "momentum": "keep"}}
    return out


def _claims(prefix: str) -> dict[str, Any]:
    return {
        f"la_{prefix}": {"method": f"la_{prefix}", "baseline": prefix},
        f"ml2_{prefix}": {"method": f"ml2_{prefix}", "baseline": f"la_{prefix}"},
        f"ml3_{prefix}": {"method": f"ml3_{prefix}", "baseline": f"la_{prefix}"},
    }


def _sweep(methods: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        lr = methods[name]["learning_rate"]
        methods[name]["axes"] = {"learning_rate": tuple(round(lr * f, 6) for f in LR_FACTORS)}


SENSITIVITY = {
    "la_sgd_lr": {
        "method": "la_sgd",
        "baseline": "sgd",
        "over": "learning_rate",
        "aggregate": "sensitivity",
    },
    "ml2_sgd_lr": {
        "method": "ml2_sgd",
        "baseline": "la_sgd",
        "over": "learning_rate",
        "aggregate": "sensitivity",
    },
}


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant in ("smoke", "quick"):
        smoke = variant == "smoke"
        # Paper defaults k=5, alpha=0.5 at every level (ALGORITHMS.md 1.3-1.4).
        levels = {"la": ((5, 0.5),), "ml2": ((5, 0.5),) * 2, "ml3": ((5, 0.5),) * 3}
        common = {"schedule": "step", "weight_decay": 5e-4}
        methods = {
            **_family(
                "sgd",
                {"optimizer": "momentum", "learning_rate": 0.05, "momentum": 0.9, **common},
                levels,
            ),
            **_family("adam", {"optimizer": "adam", "learning_rate": 1e-3, **common}, levels),
        }
        _sweep(methods, ("sgd", "la_sgd", "ml2_sgd"))
        return study_config(
            seeds=(0, 1) if smoke else (0, 1, 2, 3, 4),
            log_every=5 if smoke else 38,
            eval_every=0 if smoke else 190,
            task_names=("digits",) if smoke else (),
            tasks={
                "digits": {"dataset": "digits", "epochs": 1 if smoke else 60},
                "mnist1d": {"dataset": "mnist1d", "epochs": 1 if smoke else 40},
            },
            method_names=("sgd", "la_sgd", "ml2_sgd") if smoke else SGD_FAMILY + ADAM_FAMILY,
            methods=methods,
            claims={**_claims("sgd"), **_claims("adam"), **SENSITIVITY},
        )
    if variant == "full":
        # Lookahead paper's CIFAR protocol (ResNet-18 there; ResNet-20 here): batch 128,
        # 200 epochs, SGD momentum 0.9, lr 0.1, weight decay 5e-4, step decay; k=5 with
        # alpha 0.8 (the official code's default) for Lookahead and the first level of
        # Multilayer Lookahead, alpha 0.5 above it. Adam: lr 1e-3, same weight decay.
        levels = {
            "la": ((5, 0.8),),
            "ml2": ((5, 0.8), (5, 0.5)),
            "ml3": ((5, 0.8),) + ((5, 0.5),) * 2,
        }
        common = {"schedule": "step", "weight_decay": 5e-4}
        methods = {
            **_family(
                "sgd",
                {"optimizer": "momentum", "learning_rate": 0.1, "momentum": 0.9, **common},
                levels,
            ),
            **_family("adam", {"optimizer": "adam", "learning_rate": 1e-3, **common}, levels),
        }
        _sweep(methods, ("sgd", "la_sgd", "ml2_sgd"))
        return study_config(
            seeds=(0, 1, 2),
            model="resnet20",
            batch_size=128,
            validation_fraction=0.1,
            log_every=100,
            eval_every=3_500,
            checkpoint_every=3_500,
            tasks={
                "cifar10": {"dataset": "cifar10", "epochs": 200},
                "cifar100": {"dataset": "cifar100", "epochs": 200},
            },
            method_names=SGD_FAMILY + ADAM_FAMILY,
            methods=methods,
            claims={**_claims("sgd"), **_claims("adam"), **SENSITIVITY},
        )
    raise ValueError(f"variant must be 'smoke', 'quick' or 'full', got {variant!r}.")

"""Config of the `divebatch` experiment: fixed small/large batches, AdaBatch and DiveBatch.

Command:  python -m experiments run divebatch [--variant smoke|quick|full] [--config.key=value ...]
Runtime:  smoke: about 10 s (tests). quick: 517 s wall on a 2-core CPU shared with other jobs
          (load average 15-20; 78 s of CPU time in the process), cold compilation cache:
          MLP on digits (30 epochs) and MNIST-1D (20 epochs), micro-batch
          16, batches up to 256, momentum SGD with a constant rate tuned over 3 values on the
          validation split (linear scaling with the batch), 5 seeds, 4 methods: 120 runs.
          full: ResNet-20 on CIFAR-10 (TFDS or raw files in --config.data_dir), micro-batch
          128 up to 4096, 200 epochs, 3 seeds; about a day on one GPU.
Claim:    Chen, Wang, Sundaram (arXiv:2509.16173, 2025): DiveBatch, which grows the batch to
          delta * n * (gradient diversity), converges 1.06-5x faster than SGD with a fixed
          small batch and than AdaBatch (Devarakonda et al., arXiv:1712.02029), with a slight
          loss of final accuracy.

Methods are ``experiments.optimizers`` specs (a constant ``learning_rate`` for
``base_batch_size`` examples, scaled with the batch by ``lr_scaling``: ``"linear"``,
``"sqrt"`` or ``"none"``) plus a batch ``rule``: ``"fixed"`` (``batch_size``),
``"adabatch"`` (``batch_size`` doubled every ``every`` epochs up to ``max_batch_size``) or
``"divebatch"`` (``delta``, ``resize_every``, from ``batch_size`` up to ``max_batch_size``).
Batch sizes are multiples of the task's ``batch_size`` (the micro-batch). ``probe``: the
``targets`` (per task) accuracy on ``accuracy_on`` (``"val"`` or ``"train"``) checked at every epoch
end, and the diversity probe's ``diversity_examples`` and ``chunk_size``.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments.study import study_config

LEARNING_RATES = (0.01, 0.03, 0.1)


def _methods(micro: int, large: int, *, delta: float, resize_every: int, every: int, lr: float):
    lrs = {*LEARNING_RATES, lr}
    base: dict[str, Any] = {
        "optimizer": "momentum",
        "momentum": 0.9,
        "learning_rate": lr,
        "base_batch_size": micro,
        "lr_scaling": "linear",
        "axes": {"learning_rate": tuple(sorted(lrs))},
        "tune": ("learning_rate",),
    }
    return {
        "sgd_small": {**base, "rule": "fixed", "batch_size": micro, "max_batch_size": micro},
        "sgd_large": {**base, "rule": "fixed", "batch_size": large, "max_batch_size": large},
        "adabatch": {
            **base,
            "rule": "adabatch",
            "batch_size": micro,
            "max_batch_size": large,
            "every": every,
        },
        "divebatch": {
            **base,
            "rule": "divebatch",
            "batch_size": micro,
            "max_batch_size": large,
            "delta": delta,
            "resize_every": resize_every,
        },
    }


def _claims() -> dict[str, Any]:
    claims: dict[str, Any] = {}
    for baseline in ("sgd_small", "adabatch"):
        for metric in ("steps_to_target", "epochs_to_target"):
            claims[f"{metric}_vs_{baseline}"] = {
                "method": "divebatch",
                "baseline": baseline,
                "metric": metric,
                "higher_is_better": False,
            }
    # "A slight accuracy trade-off": the final test accuracy against the small batch.
    claims["accuracy_vs_sgd_small"] = {"method": "divebatch", "baseline": "sgd_small"}
    return claims


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant in ("smoke", "quick"):
        smoke = variant == "smoke"
        # delta = 0.5: batches up to half the gradient noise scale S / |g|^2, which an MLP
        # on digits / MNIST-1D measures at ~100-330 over training (probe of 256 examples).
        methods = _methods(16, 256, delta=0.5, resize_every=2, every=4, lr=0.03)
        if smoke:
            for spec in methods.values():
                spec["axes"] = {"learning_rate": (0.03,)}
        tasks: dict[str, Any] = {
            "digits": {"dataset": "digits", "epochs": 30},
            "mnist1d": {"dataset": "mnist1d", "epochs": 20},
        }
        if smoke:
            tasks = {"digits": {"dataset": "digits", "epochs": 2}}
        config = study_config(
            seeds=(0, 1) if smoke else (0, 1, 2, 3, 4),
            batch_size=16,
            log_every=50,
            tasks=tasks,
            method_names=("sgd_small", "divebatch")
            if smoke
            else ("sgd_small", "sgd_large", "adabatch", "divebatch"),
            methods=methods,
            claims=_claims(),
        )
        config.probe = ml_collections.ConfigDict(
            {
                "targets": {"digits": 0.9 if smoke else 0.95, "mnist1d": 0.55},
                "accuracy_on": "val",
                "diversity_examples": 64 if smoke else 256,
                "chunk_size": 32 if smoke else 64,
            }
        )
        if smoke:
            for spec in config.methods.values():
                spec.every = 1
                spec.resize_every = 1
        return config
    if variant == "full":
        # The paper's setting: ResNet on CIFAR-10, B_min 128, B_max 4096, resize every 5
        # epochs [code-3p: scripts]; delta tuned in the paper (0.1 / 0.02 with the epoch
        # estimator over n = 50 000; here delta multiplies the noise scale, see the runner).
        methods = _methods(128, 4096, delta=0.5, resize_every=5, every=20, lr=0.1)
        for spec in methods.values():
            spec["weight_decay"] = 5e-4
            spec["axes"] = {"learning_rate": (0.05, 0.1, 0.2)}
        config = study_config(
            seeds=(0, 1, 2),
            model="resnet20",
            batch_size=128,
            validation_fraction=0.1,
            log_every=50,
            tasks={"cifar10": {"dataset": "cifar10", "epochs": 200}},
            method_names=("sgd_small", "sgd_large", "adabatch", "divebatch"),
            methods=methods,
            claims=_claims(),
        )
        config.probe = ml_collections.ConfigDict(
            {
                "targets": {"cifar10": 0.9},
                "accuracy_on": "val",
                "diversity_examples": 1024,
                "chunk_size": 128,
            }
        )
        return config
    raise ValueError(f"variant must be 'smoke', 'quick' or 'full', got {variant!r}.")

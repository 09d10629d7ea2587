"""Config of the `baselines` experiment: SGD, momentum SGD and Adam, same data/seeds/budget.

Command:  python -m experiments run baselines [--variant quick|full] [--config.key=value ...]
Runtime:  quick: about 30 s on a 2-core CPU (3 methods x 3 seeds x 600 steps, MLP on digits).
          full: ResNet-20 on CIFAR-10 (TFDS or raw files in --config.data_dir), 3 x 3 runs of
          64k steps; hours on one GPU.
Claim:    none from a paper: these are the reference numbers every later method is compared
          with (same data, seeds and budget).
"""

from __future__ import annotations

import ml_collections

from experiments.suite import suite_config


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant == "quick":
        return suite_config(
            dataset="digits",
            model="mlp",
            seeds=(0, 1, 2),
            steps=600,
            batch_size=64,
            log_every=20,
            eval_every=100,
            checkpoint_every=200,
            method_names=("sgd", "momentum", "adam"),
            methods={
                "sgd": {"optimizer": "sgd", "learning_rate": 0.1},
                "momentum": {"optimizer": "momentum", "learning_rate": 0.02, "momentum": 0.9},
                "adam": {"optimizer": "adam", "learning_rate": 1e-3},
            },
        )
    if variant == "full":
        # He et al. 2016 CIFAR protocol: batch 128, 64k steps, weight decay 1e-4.
        sched = {"schedule": "cosine", "weight_decay": 1e-4}
        return suite_config(
            dataset="cifar10",
            model="resnet20",
            seeds=(0, 1, 2),
            steps=64_000,
            batch_size=128,
            log_every=100,
            eval_every=2_000,
            checkpoint_every=2_000,
            method_names=("sgd", "momentum", "adam"),
            methods={
                "sgd": {"optimizer": "sgd", "learning_rate": 0.1, **sched},
                "momentum": {
                    "optimizer": "momentum",
                    "learning_rate": 0.1,
                    "momentum": 0.9,
                    **sched,
                },
                "adam": {"optimizer": "adam", "learning_rate": 1e-3, **sched},
            },
        )
    raise ValueError(f"variant must be 'quick' or 'full', got {variant!r}.")

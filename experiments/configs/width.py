"""Config of the `width` experiment: wide vs deep MLPs of matched size across batch sizes.

Command:  python -m experiments run width [--variant smoke|quick|full] [--config.key=value ...]
Runtime:  smoke: about 10 s (tests). quick: 260 s wall on a 2-core CPU shared with other jobs
          (load average ~20; 59 s of CPU time in the process), cold compilation cache:
          digits, a 1-hidden-layer MLP (266 units) against a 4-hidden-layer one (70 units),
          about 20 k parameters each, batch sizes 8, 32, 128 and 512, 20 epochs, momentum
          SGD with a constant rate tuned over 3 values per batch size (square-root scaling
          with the batch), 5 seeds: 120 runs.
          full: MNIST-1D (a stand-in for the paper's MNIST, offline) with 1, 2, 4 and 8
          hidden layers at about 20 k parameters, batch sizes 8..2048, 100 epochs, 5 seeds;
          a GPU, or hours on a CPU.
Claim:    Chen, Wang, Zhao, Papailiopoulos, Koutris, "The Effect of Network Width on the
          Performance of Large-batch Training" (NeurIPS 2018, arXiv:1806.03791): at a fixed
          number of parameters, wider networks have a larger gradient diversity and can be
          trained with larger batches without needing more epochs than deeper ones.

Methods are architectures (``model``: ``mlp_<width>x<depth>``) with an
``experiments.optimizers`` spec, a constant ``learning_rate`` for ``base_batch_size``
examples scaled by ``lr_scaling``; tasks are batch sizes (``tasks.<name>.batch_size``).
``probe.targets``: the training accuracy each task must reach (checked at every epoch end).
``chunk_size``: examples per vmap when measuring the diversity at initialisation.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments.study import study_config


def _method(model: str, lr: float, lrs: tuple[float, ...]) -> dict[str, Any]:
    return {
        "model": model,
        "optimizer": "momentum",
        "momentum": 0.9,
        "learning_rate": lr,
        "base_batch_size": 8,
        "lr_scaling": "sqrt",
        "rule": "fixed",
        "axes": {"learning_rate": lrs},
        "tune": ("learning_rate",),
    }


def _claims(deep: str, small: str, large: str, sweep: bool) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "diversity": {
            "method": "wide",
            "baseline": deep,
            "metric": "diversity_at_init",
            "tasks": (small,),
        },
    }
    if sweep:
        # Epochs to target from the smallest to the largest batch: first - last, so the
        # "drop" is minus the slow-down; with a lower-is-better metric a larger drop wins.
        claims["slowdown"] = {
            "method": "wide",
            "baseline": deep,
            "metric": "epochs_to_target",
            "higher_is_better": False,
            "over": "task",
            "aggregate": "drop",
            "tasks": (small, large),
        }
    return claims


def _config(dataset, sizes, epochs, archs, lrs, target, seeds, input_shape):
    tasks = {f"b{b}": {"dataset": dataset, "batch_size": b, "epochs": epochs} for b in sizes}
    config = study_config(
        seeds=seeds,
        log_every=50,
        task_names=tuple(tasks),
        tasks=tasks,
        method_names=tuple(archs),
        methods={name: _method(model, lrs[len(lrs) // 2], lrs) for name, model in archs.items()},
        claims=_claims(list(archs)[-1], f"b{sizes[0]}", f"b{sizes[-1]}", len(sizes) > 1),
    )
    config.chunk_size = 128
    config.input_shape = input_shape
    config.probe = ml_collections.ConfigDict(
        {
            "targets": {name: target for name in tasks},
            "accuracy_on": "train",
            "diversity_examples": 2,  # unused: no DiveBatch method here
            "chunk_size": 1,
        }
    )
    return config


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    # About 20 k parameters each on digits (64 inputs, 10 classes): 19 960 and 20 170.
    digits = {"wide": "mlp_266x1", "deep": "mlp_70x4"}
    if variant == "smoke":
        return _config("digits", (64,), 1, digits, (0.03,), 0.5, (0, 1), (8, 8, 1))
    if variant == "quick":
        return _config(
            "digits", (8, 32, 128, 512), 20, digits, (0.01, 0.03, 0.1), 0.98, (0, 1, 2, 3, 4),
            (8, 8, 1),
        )  # fmt: skip
    if variant == "full":
        # MNIST-1D: 40 inputs; 1, 2, 4, 8 hidden layers at ~20 k parameters.
        archs = {"wide": "mlp_400x1", "mid": "mlp_120x2", "deep4": "mlp_75x4", "deep": "mlp_50x8"}
        return _config(
            "mnist1d", (8, 32, 128, 512, 2048), 100, archs, (0.003, 0.01, 0.03, 0.1), 0.9,
            (0, 1, 2, 3, 4), (40, 1),
        )  # fmt: skip
    raise ValueError(f"variant must be 'smoke', 'quick' or 'full', got {variant!r}.")

"""Config of the `continual` experiment: spectral, Wasserstein, L2 and L2-Init regularizers
against plain SGD on streams of tasks.

Command:  python -m experiments run continual [--variant smoke|quick|full] [--config.key=value ...]
Runtime:  smoke: 6 s of CPU (tests; 2 methods, 1 stream of 2 tasks x 5 steps, 1 seed).
          quick: 232 s of CPU (user time; measured at a 17 % CPU share on a shared 2-core
          machine: 22.5 min wall, 728 s of it in training), about half of it the
          Wasserstein groups (a sort of every weight tensor per step). Digits through an
          MLP (64-128-128-10), plain SGD (lr 0.1, batch 32), three streams: 5 pixel-permuted
          tasks, 8 label-permuted tasks ("label flips"), 5 class-incremental tasks (2 new
          classes each, all seen classes trained), 50 steps per task; 5 methods, every
          regularizer's strength over a 3-point grid (100x, log-spaced) tuned on the last
          task's validation split, 5 seeds: 195 runs, each method's seeds and strengths
          trained as one program. At this scale plain SGD loses no plasticity (its last
          task is learned as well as its first), so the claims come out inconclusive.
          full: ResNet-20 on CIFAR-10 (permuted pixels, label flips) and CIFAR-100
          (class-incremental, 10 tasks of 10 classes), 10 tasks of 7,000 steps each, SGD with
          momentum, 3 seeds: days on one GPU; run a subset with --config.task_names=...
Claim:    Lewandowski et al. (ICLR 2025, arXiv:2406.06811): spectral regularization sustains
          trainability on a stream of tasks (the accuracy on a late task after training on
          it is higher than plain SGD's) and is less sensitive to its strength than L2,
          L2 Init (Kumar et al. 2023) and the Wasserstein regularizer. Judged with paired
          per-seed t-intervals: held, inconclusive or did not hold.

Methods: an ``experiments.optimizers`` spec plus ``regularizer`` (``"none"``, ``"l2"``
toward 0, ``"l2_init"``, ``"spectral"``, ``"wasserstein"``) and ``strength`` (the
penalty ``strength * R``, placed before the base optimizer as a loss term), with
``axes: {"strength": (...)}``. ``streams.<task>``: ``kind`` (``"permuted"``,
``"label_flip"``, ``"class_incremental"``) and ``num_tasks``; the task's ``steps`` are split
evenly over its tasks, and ``eval_every`` should be the steps per task (the curves then hold
the accuracy on every task at every task boundary).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from experiments.study import study_config

METHODS = ("sgd", "l2", "l2_init", "spectral", "wasserstein")
GRIDS: dict[
    str, tuple[float, ...]
] = {  # 100x, log-spaced; the spec's own strength is the middle value
    "l2": (1e-5, 1e-4, 1e-3),
    "l2_init": (1e-4, 1e-3, 1e-2),
    "spectral": (1e-4, 1e-3, 1e-2),
    "wasserstein": (1e-4, 1e-3, 1e-2),
}
FULL_GRIDS: dict[str, tuple[float, ...]] = {  # 1000x, log-spaced
    "l2": (1e-6, 1e-5, 1e-4, 1e-3),
    "l2_init": (1e-5, 1e-4, 1e-3, 1e-2),
    "spectral": (1e-5, 1e-4, 1e-3, 1e-2),
    "wasserstein": (1e-5, 1e-4, 1e-3, 1e-2),
}


def _methods(base: dict[str, Any], grids: Mapping[str, tuple[float, ...]]) -> dict[str, Any]:
    methods: dict[str, Any] = {"sgd": {**base, "regularizer": "none"}}
    for name, grid in grids.items():
        methods[name] = {
            **base,
            "regularizer": name,
            "strength": grid[min(1, len(grid) - 1)],  # the reported point if untuned
            "axes": {"strength": grid},
            "tune": ("strength",),
        }
    return methods


def _claims() -> dict[str, Any]:
    claims: dict[str, Any] = {
        "plasticity": {
            "method": "spectral",
            "baseline": "sgd",
            "text": "spectral vs sgd: higher accuracy on the last task after training on it",
        }
    }
    for other in ("l2", "l2_init", "wasserstein"):
        claims[f"sensitivity_{other}"] = {
            "method": "spectral",
            "baseline": other,
            "over": "strength",
            "aggregate": "sensitivity",
        }
    return claims


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant in ("smoke", "quick"):
        smoke = variant == "smoke"
        base = {"optimizer": "sgd", "learning_rate": 0.1}
        per_task = 5 if smoke else 50
        streams: dict[str, dict[str, Any]] = {
            "permuted": {"kind": "permuted", "num_tasks": 2 if smoke else 5},
            "label_flip": {"kind": "label_flip", "num_tasks": 2 if smoke else 8},
            "class_incremental": {"kind": "class_incremental", "num_tasks": 5},
        }
        grids = {k: v[1:] for k, v in GRIDS.items()} if smoke else GRIDS
        return study_config(
            seeds=(0,) if smoke else (0, 1, 2, 3, 4),
            batch_size=32,
            log_every=per_task,
            task_names=("permuted",) if smoke else (),
            tasks={
                name: {
                    "dataset": "digits",
                    "steps": per_task * s["num_tasks"],
                    "eval_every": per_task,
                }
                for name, s in streams.items()
            },
            streams=streams,
            method_names=("sgd", "spectral") if smoke else METHODS,
            methods=_methods(base, grids),
            claims=_claims(),
        )
    if variant == "full":
        # The paper's streams on CIFAR (ResNet-18 there, ResNet-20 here), batch 128, SGD
        # with momentum 0.9, 10 tasks of 20 epochs (7,000 steps of 128 on 45k examples),
        # strengths over the same 1000x grids, 3 seeds.
        base = {"optimizer": "momentum", "learning_rate": 0.01, "momentum": 0.9}
        per_task = 7_000
        streams = {
            "cifar10_permuted": {"kind": "permuted", "num_tasks": 10},
            "cifar10_label_flip": {"kind": "label_flip", "num_tasks": 10},
            "cifar100_class_incremental": {"kind": "class_incremental", "num_tasks": 10},
        }
        datasets = {
            "cifar10_permuted": "cifar10",
            "cifar10_label_flip": "cifar10",
            "cifar100_class_incremental": "cifar100",
        }
        return study_config(
            seeds=(0, 1, 2),
            model="resnet20",
            batch_size=128,
            validation_fraction=0.1,
            log_every=100,
            checkpoint_every=per_task,
            tasks={
                name: {
                    "dataset": datasets[name],
                    "steps": per_task * s["num_tasks"],
                    "eval_every": per_task,
                }
                for name, s in streams.items()
            },
            streams=streams,
            method_names=METHODS,
            methods=_methods(base, FULL_GRIDS),
            claims=_claims(),
        )
    raise ValueError(f"variant must be 'smoke', 'quick' or 'full', got {variant!r}.")

"""Config of the `dsgd` experiment: C-SGD vs D-SGD (ring, exponential) at two total batches.

Command:  python -m experiments run dsgd [--variant smoke|quick|full] [--config.key=value ...]
Runtime:  smoke: a few seconds of CPU (tests). quick: 469 s wall on a 2-core CPU shared
          with other jobs (load average 15-19; 83 s of CPU time, so well under 3 minutes
          alone), cold compilation cache: MLP on digits, 8 simulated workers, total
          batches 32 and 256 (4 and 32 per worker), 400 steps each, 3 methods x 4 base
          rates (tuned) x 5 seeds: 120 runs, each (task, method) one program.
          full: ResNet-20 on CIFAR-10 (TFDS or raw files in --config.data_dir), 16 workers,
          total batches 1024 and 8192, 6,000 steps, 3 seeds: about a day on one GPU.
Claim:    Zhu, He, Chen, Song, Tao, "Decentralized SGD and Average-direction SAM are
          Asymptotically Equivalent", ICML 2023 (arXiv:2306.02913): D-SGD implicitly
          regularises sharpness through the consensus distance, an effect that does not
          shrink with the total batch, so its advantage over C-SGD (synchronous data
          parallelism) widens as the total batch grows (their table, ResNet-18 on CIFAR-10,
          16 workers: C-SGD 93.9 / ring 94.7 % at 1024, 88.2 / 92.2 % at 8192).

Tasks are the total batches: ``tasks.<name>.workers`` simulated workers (vmap over a
"workers" axis; with --devices W one worker per device under shard_map) of
``batch_size`` examples each, iid partitions, every task trained for the same ``steps``.
Methods: ``communication`` ``"centralized"`` (C-SGD) or ``"decentralized"`` (D-SGD with
``topology`` and ``order``), plain SGD at ``learning_rate`` per ``base_batch_size``
examples scaled linearly with the total batch, ``warmup_fraction`` of the steps of linear
warm-up, x0.1 at ``decay_fractions`` of the steps; ``axes.learning_rate`` is tuned on the
validation split. ``sharpness``: the Hessian power iteration on the final average model.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments.study import study_config

METHOD_NAMES = ("csgd", "dsgd_ring", "dsgd_exponential")


def _methods(base: dict[str, Any], rates: tuple[float, ...]) -> dict[str, dict[str, Any]]:
    """The three methods; ``rates`` is the tuned grid of the base rate (``()``: none)."""
    tuned = (
        {**base, "axes": {"learning_rate": rates}, "tune": ("learning_rate",)} if rates else base
    )
    return {
        "csgd": {**tuned, "communication": "centralized"},
        "dsgd_ring": {**tuned, "communication": "decentralized", "topology": "ring"},
        "dsgd_exponential": {
            **tuned,
            "communication": "decentralized",
            "topology": "exponential",
        },
    }


def _claims(small: str | None, large: str, decentralized: tuple[str, ...]) -> dict[str, Any]:
    """Per task: D-SGD vs C-SGD accuracy; at ``large``: sharpness; from ``small`` to
    ``large``: the widening advantage (a difference of differences, the ``drop``)."""
    claims: dict[str, Any] = {}
    for m in decentralized:
        claims[f"{m}_acc"] = {"method": m, "baseline": "csgd"}
        claims[f"{m}_eig"] = {
            "method": m,
            "baseline": "csgd",
            "metric": "hessian_top_eigenvalue",
            "higher_is_better": False,
            "tasks": (large,),
        }
        if small is None:
            continue
        claims[f"{m}_widens"] = {
            "method": m,
            "baseline": "csgd",
            "over": "task",
            "aggregate": "drop",
            "tasks": (small, large),
            "text": f"{m} vs csgd: a larger test-accuracy advantage at the large total "
            "batch than at the small one",
        }
    return claims


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant in ("smoke", "quick"):
        smoke = variant == "smoke"
        base = {
            "learning_rate": 0.1,
            "base_batch_size": 64,
            "warmup_fraction": 0.05,
            "decay_fractions": (0.4, 0.8),  # the reference code: x0.1 at 2400 and 4800 of 6000
        }
        sizes = {"b32": 4, "b256": 32}  # per-worker batch; 8 workers
        steps = 6 if smoke else 400
        methods = _methods(base, () if smoke else (0.1, 0.2, 0.4, 0.8))
        config = study_config(
            seeds=(0,) if smoke else (0, 1, 2, 3, 4),
            model="mlp",
            log_every=3 if smoke else 25,
            task_names=("b256",) if smoke else tuple(sizes),
            tasks={
                k: {
                    "dataset": "digits",
                    "workers": 8,
                    "partition": "iid",
                    "batch_size": b,
                    "steps": steps,
                    "eval_every": 3 if smoke else 100,
                }
                for k, b in sizes.items()
            },
            method_names=("csgd", "dsgd_ring") if smoke else METHOD_NAMES,
            methods=methods,
            # smoke: one task, so no claim across the two batches
            claims=_claims(None if smoke else "b32", "b256", METHOD_NAMES[1:]),
        )
        config.sharpness = {"num_examples": 64 if smoke else 512, "iters": 3 if smoke else 20}
        return config
    if variant == "full":
        # Zhu et al. 2023 (reference code main.py): 16 workers, plain SGD (momentum 0, no
        # weight decay), lr 0.1 per 1024 examples scaled linearly (0.8 at 8192), 60 warm-up
        # iterations, x0.1 at 2400 and 4800, 6000 iterations. ResNet-18 ImageNet-pretrained
        # on 56x56 CIFAR-10 there; ResNet-20 from scratch on 32x32 here (no pretraining, no
        # augmentation in this harness).
        base = {
            "learning_rate": 0.1,
            "base_batch_size": 1024,
            "warmup_fraction": 0.01,
            "decay_fractions": (0.4, 0.8),
        }
        sizes = {"b1024": 64, "b8192": 512}
        return _full(base, sizes)
    raise ValueError(f"variant must be 'smoke', 'quick' or 'full', got {variant!r}.")


def _full(base: dict[str, Any], sizes: dict[str, int]) -> ml_collections.ConfigDict:
    config = study_config(
        seeds=(0, 1, 2),
        model="resnet20",
        validation_fraction=0.1,
        log_every=50,
        task_names=tuple(sizes),
        tasks={
            k: {
                "dataset": "cifar10",
                "workers": 16,
                "partition": "iid",
                "batch_size": b,
                "steps": 6000,
                "eval_every": 500,
                "checkpoint_every": 500,
            }
            for k, b in sizes.items()
        },
        method_names=METHOD_NAMES,
        methods=_methods(base, (0.05, 0.1, 0.2)),
        claims=_claims("b1024", "b8192", METHOD_NAMES[1:]),
    )
    config.sharpness = {"num_examples": 1024, "iters": 20}
    return config

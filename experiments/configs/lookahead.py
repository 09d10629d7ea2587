"""Config of the `lookahead` experiment: (Multilayer) Lookahead vs its inner optimizer.

Command:  python -m experiments run lookahead [--variant quick|full] [--config.key=value ...]
Runtime:  quick: measured 129 s wall (82 s user + 6 s sys CPU) on a 2-core CPU while other
          jobs kept its load average at 9-10 (not measured on an idle machine). 140 trained
          runs: 8 methods x 5 seeds on digits (500 steps) and on MNIST-1D (1,500 steps),
          MLP, batch 64, plus a learning-rate sweep of SGD, Lookahead and 2-level Lookahead at
          4 more rates (5 in all, log-spaced over 100x; the middle one is the main run) on
          digits. JAX's persistent compilation cache (in <workdir>/jax_cache) lets the seeds
          of a method reuse one compilation. Rerunning with the same workdir resumes; when all
          is finished it only re-reads the final checkpoints (13 s).
          full: ResNet-20 on CIFAR-10 and CIFAR-100 (TFDS or raw files in --config.data_dir),
          8 methods x 3 seeds x 200 epochs (78k steps of batch 128) per dataset plus the
          CIFAR-10 sweep: days on one GPU; run a subset with --config.method_names=... and
          --config.datasets=cifar10.
Claim:    Zhang et al. (NeurIPS 2019, arXiv:1907.08610): Lookahead reaches at least the accuracy
          of its inner optimizer (SGD or Adam) and is much less sensitive to the learning rate.
          Pushkin & Barba (arXiv:2110.14254): Multilayer Lookahead (Lookahead nested 2-3 times)
          outperforms Lookahead. The runner states for each whether it held at this scale.

Fields beyond the suite's (see ``experiments.suite.suite_config``):
  datasets:     the datasets to run, each in its own sub-workdir ``<workdir>/<dataset>/``.
  per_dataset:  ``{dataset: {"model": ..., other suite fields}}``: every dataset in ``datasets``
                needs an entry naming its model; its other fields (``steps``, ``batch_size``,
                ``eval_every``, ...) override the shared ones for that dataset.
  methods.<m>.lookahead: ``{"levels": ((k, alpha), ...), "momentum": "keep"|"reset"|"pullback"}``
                wraps the base optimizer of the spec in ``optlab.lookahead`` (one level) or
                ``optlab.multilayer_lookahead`` (two or more); such methods are evaluated on
                their slowest weights (``optlab.slow_params``).
  comparisons:  ``((method, baseline), ...)``: each is the claim "method >= baseline" in final
                test accuracy on every dataset (pairs naming a method left out of
                ``method_names`` are skipped, so ``--config.method_names=sgd,la_sgd`` just works).
  sweep.methods / sweep.factors / sweep.datasets: every sweep method (in ``method_names``) is
                retrained at ``learning_rate * factor`` for each factor (factor 1 is the main
                run) on each sweep dataset (in ``datasets``); a method's LR sensitivity is the
                per-seed spread (max - min) of final test accuracy over the factors, mean ± std
                over seeds. Every comparison whose two methods are both swept is also checked
                as "method is no more sensitive than baseline". A run whose loss turns
                non-finite counts as chance accuracy (1 / number of classes). Empty
                ``sweep.methods``: no sweep.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments.suite import suite_config

SGD_FAMILY = ("sgd", "la_sgd", "ml2_sgd", "ml3_sgd")
ADAM_FAMILY = ("adam", "la_adam", "ml2_adam", "ml3_adam")


def _family(prefix: str, base: dict[str, Any], levels: dict[str, tuple]) -> dict[str, Any]:
    """``{prefix: base, la_prefix: base + lookahead, ml2_prefix: ..., ml3_prefix: ...}``."""
    out: dict[str, Any] = {prefix: dict(base)}
    for tag, lv in levels.items():
        out[f"{tag}_{prefix}"] = {**base, "lookahead": {"levels": lv, "momentum": "keep"}}
    return out


def _comparisons(prefix: str) -> tuple[tuple[str, str], ...]:
    # Lookahead vs its inner optimizer; each Multilayer Lookahead vs (1-level) Lookahead.
    return (
        (f"la_{prefix}", prefix),
        (f"ml2_{prefix}", f"la_{prefix}"),
        (f"ml3_{prefix}", f"la_{prefix}"),
    )


def _per_dataset(config: ml_collections.ConfigDict) -> None:
    # The suite's single dataset/model become the per-dataset `datasets` and `models`.
    del config["dataset"]
    del config["model"]


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant == "quick":
        # Paper defaults k=5, alpha=0.5 at every level (ALGORITHMS.md 1.3-1.4).
        levels = {
            "la": ((5, 0.5),),
            "ml2": ((5, 0.5), (5, 0.5)),
            "ml3": ((5, 0.5), (5, 0.5), (5, 0.5)),
        }
        methods = {
            **_family("sgd", {"optimizer": "sgd", "learning_rate": 0.1}, levels),
            **_family("adam", {"optimizer": "adam", "learning_rate": 1e-3}, levels),
        }
        config = suite_config(
            seeds=(0, 1, 2, 3, 4),
            steps=500,  # 4 top-level syncs of the 3-level method (k1 k2 k3 = 125)
            batch_size=64,
            log_every=20,
            eval_every=100,
            checkpoint_every=500,
            method_names=SGD_FAMILY + ADAM_FAMILY,
            methods=methods,
        )
        _per_dataset(config)
        config.datasets = ("digits", "mnist1d")
        # About 22 epochs on each: 1,437 digits and 4,000 MNIST-1D training examples.
        config.per_dataset = {
            "digits": {"model": "mlp"},
            "mnist1d": {"model": "mlp", "steps": 1500},
        }
        config.comparisons = _comparisons("sgd") + _comparisons("adam")
        config.sweep = {
            "methods": ("sgd", "la_sgd", "ml2_sgd"),
            "factors": (0.1, 0.3162, 1.0, 3.162, 10.0),  # 100x, log-spaced, centred on lr
            "datasets": ("digits",),
        }
        return config
    if variant == "full":
        # Lookahead paper's CIFAR protocol (ResNet-18 there; ResNet-20 here): batch 128,
        # 200 epochs, SGD momentum 0.9, lr 0.1, weight decay 5e-4 (coupled L2), k=5 with
        # alpha 0.8 (the official code's default) for Lookahead and the first level of
        # Multilayer Lookahead, alpha 0.5 above it. Cosine decay replaces the paper's step
        # schedule. Adam: lr 1e-3, same weight decay.
        levels = {
            "la": ((5, 0.8),),
            "ml2": ((5, 0.8), (5, 0.5)),
            "ml3": ((5, 0.8), (5, 0.5), (5, 0.5)),
        }
        common = {"schedule": "cosine", "weight_decay": 5e-4}
        methods = {
            **_family(
                "sgd",
                {"optimizer": "momentum", "learning_rate": 0.1, "momentum": 0.9, **common},
                levels,
            ),
            **_family("adam", {"optimizer": "adam", "learning_rate": 1e-3, **common}, levels),
        }
        config = suite_config(
            seeds=(0, 1, 2),
            steps=78_200,  # 200 epochs of 391 steps
            batch_size=128,
            log_every=100,
            eval_every=3_910,  # every 10 epochs
            checkpoint_every=3_900,
            method_names=SGD_FAMILY + ADAM_FAMILY,
            methods=methods,
        )
        _per_dataset(config)
        config.datasets = ("cifar10", "cifar100")
        config.per_dataset = {"cifar10": {"model": "resnet20"}, "cifar100": {"model": "resnet20"}}
        config.comparisons = _comparisons("sgd") + _comparisons("adam")
        config.sweep = {
            "methods": ("sgd", "la_sgd", "ml2_sgd"),
            "factors": (0.1, 0.3162, 1.0, 3.162, 10.0),
            "datasets": ("cifar10",),
        }
        return config
    raise ValueError(f"variant must be 'quick' or 'full', got {variant!r}.")

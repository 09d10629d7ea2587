"""Config of the `local_sgd` experiment: DP vs Local SGD, post-local SGD, DiLoCo and PALSGD.

Command:  python -m experiments run local_sgd [--variant smoke|quick|full] [--config.key=value ...]
Runtime:  smoke: 10 s of CPU time (50 s wall on the contended 2-core machine; tests).
          quick: 50 s wall on a 2-core CPU (54 s of CPU time), cold compilation cache:
          MLP on digits, 8 workers x batch 16,
          300 steps with cosine decay, 5 methods x 3 inner learning rates (tuned on
          validation) x 5 seeds = 75 runs, evaluations every 10 steps.
          quick, --config.task_names=text (the language model): 220 s (116 s training).
          full: ResNet-20 on CIFAR-10, 8 workers, H = 500, 50k steps, 3 seeds: GPU/TPU
          (not run; it validates).
Claim:    DiLoCo (Douillard et al. 2023, arXiv:2311.08105) on 8 workers matches synchronous
          data parallelism while communicating H times less; PALSGD (Naganuma et al.,
          TMLR 2025, arXiv:2504.18454) reaches the same quality in less time than DiLoCo
          and data parallelism (it skips a fraction p of the gradient computations).
          Local SGD (Stich, ICLR 2019) and post-local SGD (Lin et al., ICLR 2020) are the
          references for periodic averaging. Judged with paired per-seed t-intervals.

Methods: ``methods.<m>`` is an ``experiments.optimizers`` spec (the inner optimizer, the
same for every method) plus ``algorithm`` (``dp``, ``local_sgd``, ``diloco``, ``palsgd``),
``sync_period`` (H), ``start_fraction`` (synchronous steps first: post-local SGD's switch,
PALSGD's DDP warm-up), ``outer_learning_rate`` / ``outer_momentum`` (DiLoCo's and PALSGD's
Nesterov outer step), ``prob`` / ``eta`` / ``shared_coin`` / ``coin_seed`` (PALSGD).
``cost.comm_cost`` prices one all-reduce in forward/backward passes for the cost-model time;
``cost.target_val_accuracy`` is the quality the times to target are measured at
(``cost.task_targets.<task>`` overrides it per task, e.g. for the language model);
``curves_against`` the x axes of the extra curve plots (``comm_rounds``, ``grad_evals``,
``measured_time_s``).

Tasks: one entry per (dataset, model). ``tasks.text`` (smoke and quick) is the
language-model variant: the byte-level transformer (``transformer_lm_tiny``) on the Python
standard library's own source, or any ``--config.text_file=PATH``, 8 iid workers; it runs on
request, ``--config.task_names=text`` (or ``digits,text``), with the same methods and inner
optimizer as the digits task, and ``results.md`` adds validation and test perplexity.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments.study import study_config

METHODS = ("dp", "local_sgd", "post_local_sgd", "diloco", "palsgd")
CURVES = ("comm_rounds", "grad_evals", "measured_time_s")


def _methods(inner: dict[str, Any], lrs: tuple[float, ...], h: int, warmup: float) -> dict:
    """Every method on the same inner optimizer ``inner`` with its rate tuned over ``lrs``
    (``()``: the inner rate as it is)."""
    tuned = {"axes": {"learning_rate": lrs}, "tune": ("learning_rate",)} if lrs else {}
    outer = {"outer_learning_rate": 0.7, "outer_momentum": 0.9}  # DiLoCo's paper values
    return {
        "dp": {**inner, **tuned, "algorithm": "dp"},
        "local_sgd": {**inner, **tuned, "algorithm": "local_sgd", "sync_period": h},
        "post_local_sgd": {
            **inner,
            **tuned,
            "algorithm": "local_sgd",
            "sync_period": h,
            "start_fraction": 0.25,  # Lin et al. switch at the first decay; here a quarter
        },
        "diloco": {**inner, **tuned, **outer, "algorithm": "diloco", "sync_period": h},
        "palsgd": {
            **inner,
            **tuned,
            # PALSGD's README: Nesterov outer lr 0.1-0.25; DiLoCo's 0.7 here for one footing.
            **outer,
            "algorithm": "palsgd",
            "sync_period": h,
            "start_fraction": warmup,
            "prob": 0.2,
            "eta": 0.5,
            "shared_coin": True,
            "coin_seed": 0,
        },
    }


def _claims() -> dict[str, Any]:
    time_claims = {}
    for baseline in ("diloco", "dp"):
        for metric in ("model_time_to_target", "measured_time_s_to_target"):
            time_claims[f"palsgd_{baseline}_{metric}"] = {
                "method": "palsgd",
                "baseline": baseline,
                "metric": metric,
                "higher_is_better": False,
            }
    return {
        "diloco_dp_acc": {
            "method": "diloco",
            "baseline": "dp",
            "text": "diloco vs dp: test accuracy (the claim is a match: inconclusive = within "
            "noise; did not hold = worse)",
        },
        "palsgd_diloco_acc": {
            "method": "palsgd",
            "baseline": "diloco",
            "text": "palsgd vs diloco: test accuracy (same quality: inconclusive = within noise)",
        },
        "local_sgd_dp_acc": {"method": "local_sgd", "baseline": "dp"},
        "post_local_sgd_local_sgd_acc": {"method": "post_local_sgd", "baseline": "local_sgd"},
        **time_claims,
    }


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    if variant in ("smoke", "quick"):
        smoke = variant == "smoke"
        inner = {
            "optimizer": "momentum",
            "learning_rate": 0.05,
            "momentum": 0.9,
            "schedule": "cosine",
        }
        lrs = () if smoke else (0.02, 0.05, 0.1)
        methods = _methods(inner, lrs, h=4 if smoke else 8, warmup=0.05)
        config = study_config(
            seeds=(0,) if smoke else (0, 1, 2, 3, 4),
            l2=5e-4,
            batch_size=16,  # per worker
            log_every=5 if smoke else 10,
            eval_every=10,
            tasks={
                "digits": {
                    "dataset": "digits",
                    "model": "mlp",
                    "workers": 8,
                    "partition": "iid",
                    "steps": 10 if smoke else 300,
                },
                # The language-model variant, on request: --config.task_names=text (the
                # standard library's own source, or --config.text_file=PATH), validation
                # and test perplexity in results.md.
                "text": {
                    "dataset": "text",
                    "model": "transformer_lm_tiny",
                    "workers": 8,
                    "partition": "iid",
                    "steps": 4 if smoke else 200,
                    "batch_size": 8,
                    "text_context": 32,
                    "text_bytes": 1 << 15 if smoke else 1 << 17,
                    "l2": 0.0,
                },
            },
            task_names=("digits",),
            method_names=("dp", "palsgd") if smoke else METHODS,
            methods=methods,
            claims=_claims(),
        )
        config.cost = {
            "comm_cost": 1.0,
            "target_val_accuracy": 0.5 if smoke else 0.93,
            # The language model's per-token validation accuracy (~0.2 after 200 steps).
            "task_targets": {"text": 0.1 if smoke else 0.19},
        }
        # The curves plotted against something else than the step (smoke: one, for speed).
        config.curves_against = ("grad_evals",) if smoke else CURVES
        return config
    if variant == "full":
        # DiLoCo's setting scaled to the harness: 8 workers, H = 500 inner steps, inner
        # AdamW-like Adam with warm-up and cosine decay, outer Nesterov (0.7, 0.9); PALSGD
        # p = 0.2, eta = 0.5, warm-up of synchronous steps, the same H. An image task on
        # CIFAR-10 (ResNet-20, 128 per worker); the text task is one more entry (header).
        inner = {
            "optimizer": "adam",
            "learning_rate": 4e-4,
            "schedule": "warmup_cosine",
            "warmup_steps": 1_000,
        }
        lrs = (2e-4, 4e-4, 8e-4)
        methods = _methods(inner, lrs, h=500, warmup=0.02)
        config = study_config(
            seeds=(0, 1, 2),
            model="resnet20",
            batch_size=128,
            l2=5e-4,
            validation_fraction=0.1,
            log_every=100,
            eval_every=1_000,
            checkpoint_every=5_000,
            tasks={
                "cifar10": {
                    "dataset": "cifar10",
                    "workers": 8,
                    "partition": "iid",
                    "steps": 50_000,
                },
            },
            method_names=METHODS,
            methods=methods,
            claims=_claims(),
        )
        config.cost = {"comm_cost": 1.0, "target_val_accuracy": 0.85}
        config.curves_against = CURVES
        return config
    raise ValueError(f"variant must be 'smoke', 'quick' or 'full', got {variant!r}.")

"""Config of the `baselines` experiment: SGD, momentum SGD and Adam, same data/seeds/budget.

Command:  python -m experiments run baselines [--variant smoke|quick|full] [--config.key=value ...]
Runtime:  smoke: about 6 s. quick: 9 s wall on a 2-core CPU (3 methods x 5 seeds, MLP on
          digits, 60 epochs, cosine decay; each method's 5 seeds train as one program).
          The byte-level language model runs on request, --config.task_names=text:
          transformer_lm (d_model 64, 2 layers) on 256 KiB of the Python standard library's
          source (or --config.text_file=PATH), context 64, 300 steps of batch 32. Measured
          on the 2-core CPU shared with other jobs (load average ~20): one run,
          --config.method_names=adam --config.seeds=0, 198 s wall (116 s training),
          validation perplexity 252 -> 10.2; the three methods with --config.seeds=0,
          472 s wall (306 s training). All five seeds: not measured.
          full: ResNet-20 on CIFAR-10 (TFDS or raw files in --config.data_dir), 3 x 3 runs of
          164 epochs; hours on one GPU.
Claim:    none from a paper: these are the reference numbers every later method is compared
          with (same data, seeds and budget).
"""

from __future__ import annotations

import ml_collections

from experiments.study import study_config


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    methods = {
        "sgd": {"optimizer": "sgd", "learning_rate": 0.1},
        "momentum": {"optimizer": "momentum", "learning_rate": 0.02, "momentum": 0.9},
        "adam": {"optimizer": "adam", "learning_rate": 1e-3},
    }
    if variant in ("smoke", "quick"):
        smoke = variant == "smoke"
        for spec in methods.values():
            spec["schedule"] = "cosine"
        # The byte-level language model runs on request only:
        # --config.task_names=text (the standard library's source, or --config.text_file).
        text = {
            "dataset": "text",
            "model": "transformer_lm_tiny" if smoke else "transformer_lm",
            "steps": 4 if smoke else 300,
            "batch_size": 32,
            "text_context": 64,
            "text_bytes": 1 << 15 if smoke else 1 << 18,
            "log_every": 2 if smoke else 25,
            "eval_every": 0 if smoke else 50,
        }
        return study_config(
            seeds=(0, 1) if smoke else (0, 1, 2, 3, 4),
            log_every=5 if smoke else 44,
            eval_every=0 if smoke else 440,
            tasks={"digits": {"dataset": "digits", "epochs": 1 if smoke else 60}, "text": text},
            task_names=("digits",),
            method_names=tuple(methods),
            methods=methods,
        )
    if variant == "full":
        # He et al. 2016 CIFAR protocol: batch 128, 64k steps (164 epochs), weight decay 1e-4.
        for spec in methods.values():
            spec.update(schedule="cosine", weight_decay=1e-4)
        methods["sgd"]["learning_rate"] = methods["momentum"]["learning_rate"] = 0.1
        return study_config(
            seeds=(0, 1, 2),
            model="resnet20",
            batch_size=128,
            log_every=100,
            eval_every=3_900,
            checkpoint_every=3_900,
            validation_fraction=0.1,
            tasks={"cifar10": {"dataset": "cifar10", "epochs": 164}},
            method_names=tuple(methods),
            methods=methods,
        )
    raise ValueError(f"variant must be 'smoke', 'quick' or 'full', got {variant!r}.")

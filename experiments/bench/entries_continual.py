"""Regularizers for continual learning: spectral regularization before plain SGD.

The entry is ``optlab.spectral_regularization`` (strength 1e-3, the quick study's default)
chained before ``optax.sgd`` at the baselines' learning rate. The train-step benchmark puts
it in the real jitted step next to plain SGD; the goal is the paper's reported cost of spectral
regularization, "approximately 14 % slower" training on a 1080Ti (Lewandowski et al., ICLR
2025): a train-step ratio to ``optax.sgd`` of at most 1.14.

Byte models (float32 bytes per parameter, each array counted once, as in ``baselines.py``):

- ``optlab.spectral_regularization``: reads ``g`` and ``p`` (the power iteration reads each
  kernel twice, ``W^T u`` then ``W v``, and the rank-one gradient adds to ``g`` in a third
  pass), writes ``u = -lr (g + c u v^T)``: 12 B. State: the vectors ``u`` and ``v`` of each
  kernel, ``fan_in + fan_out`` floats per matrix, not per parameter (0 B/param in the model).

The Wasserstein and L2 Init regularizers are not registered (CI time): measure them with a
local entry if needed (their byte models: 16 B/param, state 4 B/param; the Wasserstein sort
adds O(log n) passes).
"""

from __future__ import annotations

import optax

import optlab
from experiments.bench.baselines import LEARNING_RATE
from experiments.bench.registry import SGD_NAME, BenchEntry, BenchGoal, register, register_goal

__all__ = ["SPECTRAL", "SPECTRAL_GOAL"]

STRENGTH = 1e-3

SPECTRAL = register(
    BenchEntry(
        name="optlab.spectral_regularization+sgd",
        make=lambda: optax.chain(
            optlab.spectral_regularization(STRENGTH), optax.sgd(LEARNING_RATE)
        ),
        bytes_per_param=12.0,
    )
)

SPECTRAL_GOAL = register_goal(
    BenchGoal(
        name="spectral regularization train step / sgd",
        numerator=SPECTRAL.name,
        denominator=SGD_NAME,
        max_ratio=1.14,
        part="train_steps",
        source="issue #11: the paper's ~14 % slower training (Lewandowski et al. 2025)",
    )
)

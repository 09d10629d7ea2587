"""The optax baselines every other entry is compared with.

Byte models count the compulsory float32 traffic of one ``update`` per parameter: each
array the arithmetic needs is read once and each result written once (4 bytes each), as a
perfectly fused loop would do. Scalars (step counts, bias-correction factors) are ignored.
``apply_updates`` (params + updates) is not part of the update; it is inside the train step.

- ``optax.sgd``: ``chain(identity, scale_by_learning_rate)``, so ``u = -lr * g``.
  Reads ``g``; writes ``u``. Params are not read. 2 arrays = 8 B/param; no state.
- ``optax.sgd(momentum=0.9)``: ``chain(trace(0.9), scale_by_learning_rate)``, so
  ``m' = g + 0.9 m``, ``u = -lr * m'``. Reads ``g, m``; writes ``m', u``.
  4 arrays = 16 B/param; state ``m`` = 4 B/param.
- ``optax.adam``: ``m' = b1 m + (1-b1) g``, ``v' = b2 v + (1-b2) g^2``,
  ``u = -lr * m_hat / (sqrt(v_hat) + eps)`` with scalar bias corrections. Reads ``g, m, v``;
  writes ``m', v', u``. 6 arrays = 24 B/param; state ``m, v`` = 8 B/param (+ an int32 count).
"""

from __future__ import annotations

import optax

from experiments.bench.registry import SGD_NAME, BenchEntry, register

__all__ = ["ADAM", "LEARNING_RATE", "MOMENTUM", "SGD"]

LEARNING_RATE = 0.01
"""Small enough that no baseline diverges during the train-step benchmark (NaNs can change
arithmetic speed)."""

SGD = register(
    BenchEntry(
        name=SGD_NAME,
        make=lambda: optax.sgd(LEARNING_RATE),
        bytes_per_param=8.0,  # read g, write u
    )
)

MOMENTUM = register(
    BenchEntry(
        name="optax.sgd(momentum=0.9)",
        make=lambda: optax.sgd(LEARNING_RATE, momentum=0.9),
        bytes_per_param=16.0,  # read g, m; write m', u
    )
)

ADAM = register(
    BenchEntry(
        name="optax.adam",
        make=lambda: optax.adam(LEARNING_RATE),
        bytes_per_param=24.0,  # read g, m, v; write m', v', u
    )
)

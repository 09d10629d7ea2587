"""DPF (``optlab.dpf``) on an ordinary step and on a mask-refresh step, against its inner
optimizer ``optax.sgd`` alone.

Every entry wraps ``optax.sgd`` at the baselines' learning rate and prunes to 90 % with the
default selection (every leaf of rank >= 2: the kernels, nearly all of a model-like tree's
parameters; the byte models treat every parameter as prunable). The mask is one ``bool``
(1 B) per prunable parameter.

- ``optlab.dpf(ordinary)``: a schedule that never starts (``begin_step`` beyond the run), so
  every update is an ordinary DPF step: reads ``g``, writes ``u = -lr g``; the mask is not
  touched (the refresh is an untaken ``lax.cond`` branch): 8 B/param, as ``optax.sgd``.
- ``optlab.dpf(refresh every step)``: ``mask_every=1`` inside the ramp, so every update
  recomputes the mask: reads ``g`` and ``p`` (the mask ranks ``|p + u|``), writes ``u`` and
  the new mask: 13 B/param compulsory. The global threshold takes 31 bisection passes over
  the magnitudes (and a position scan when some tied magnitudes stay), so its fraction of
  the bandwidth measures what a refresh costs; with the paper's period of 16 it is
  amortised over 16 ordinary steps. Its counterpart is the ordinary DPF step.

Gradual magnitude pruning (``feedback=False``) is not an entry: off its refresh steps it adds
the mask and params reads of two selects (13 B/param), and its refresh is DPF's.
"""

from __future__ import annotations

import optax

import optlab
from experiments.bench.baselines import LEARNING_RATE
from experiments.bench.registry import SGD_NAME, BenchEntry, register

__all__ = ["DPF_ORDINARY", "DPF_REFRESH", "NEVER", "SPARSITY"]

SPARSITY = 0.9
NEVER = 2**30
"""A step count no benchmark reaches: the schedule of the ordinary entries starts there."""

DPF_ORDINARY = register(
    BenchEntry(
        name="optlab.dpf(ordinary)",
        make=lambda: optlab.dpf(
            optax.sgd(LEARNING_RATE), SPARSITY, begin_step=NEVER, end_step=NEVER + 1
        ),
        bytes_per_param=8.0,
        counterpart=SGD_NAME,
    )
)

DPF_REFRESH = register(
    BenchEntry(
        name="optlab.dpf(refresh every step)",
        make=lambda: optlab.dpf(optax.sgd(LEARNING_RATE), SPARSITY, end_step=NEVER, mask_every=1),
        bytes_per_param=13.0,
        counterpart=DPF_ORDINARY.name,
    )
)

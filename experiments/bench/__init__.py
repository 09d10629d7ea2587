"""Benchmarks of the optimizer transforms: ``python -m experiments bench [--quick] [--out PATH]``.

Everything is measured side by side in one process, repetitions interleaved round-robin:

(a) memory bandwidth from a large jitted in-place `x + c`: the physical limit of an update;
(b) ``jit(tx.update)`` of every registered entry on model-shaped pytrees (1M and 10M float32
    parameters), as time, achieved GB/s from the entry's byte model, fraction of (a), ratio
    to ``optax.sgd`` and to the entry's counterpart, and optimizer-state bytes;
(c) the full jitted train step of every entry on the MLP and the CNN (digits, batch 128),
    relative to plain SGD.

To benchmark a new transform, add ``experiments/bench/entries_<topic>.py`` that calls
:func:`register` with a :class:`BenchEntry` (document its byte model as ``baselines.py``
does) and import it below.
"""

from __future__ import annotations

from experiments.bench import baselines  # registers optax.sgd, sgd+momentum, adam: keep first
from experiments.bench.cli import BenchConfig, main, run_bench
from experiments.bench.registry import SGD_NAME, BenchEntry, Registry, entries, get_entry, register

# Later issues register their transforms here, one module per topic, after the baselines (a
# counterpart must be registered before the entry naming it), e.g.:
#   from experiments.bench import entries_lookahead  # optlab.lookahead vs optax.lookahead

__all__ = [
    "SGD_NAME",
    "BenchConfig",
    "BenchEntry",
    "Registry",
    "baselines",
    "entries",
    "get_entry",
    "main",
    "register",
    "run_bench",
]

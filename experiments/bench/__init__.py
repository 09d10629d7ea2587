"""Benchmarks of the optimizer transforms: ``python -m experiments bench [--quick] [--out PATH]``.

Everything is measured side by side in one process, repetitions interleaved round-robin:

(a) memory bandwidth from a large jitted in-place `x + c`: the physical limit of an update;
(b) ``jit(tx.update)`` of every registered entry on model-shaped pytrees (1M and 10M float32
    parameters), as time, achieved GB/s from the entry's byte model, fraction of (a), ratio
    to ``optax.sgd`` and to the entry's counterpart, and optimizer-state bytes;
(c) the full jitted train step of every entry on the MLP and the CNN (digits, batch 128),
    relative to plain SGD;
(d) the registered goals (:class:`BenchGoal`: a target ratio between two entries, e.g.
    Multilayer Lookahead against nested ``optax.lookahead``), goal against measured.
(e) issue #10's worker-axis methods on W devices under ``shard_map`` (one worker each):
    bytes communicated per step read from the compiled HLO, step time, and PALSGD's
    skipped gradient evaluations, all relative to synchronous DP
    (:mod:`experiments.bench.communication`; ``--comm-workers 0`` skips it).

``--only REGEX`` restricts (b) and (c) to the matching entries (plus ``optax.sgd`` and
their counterparts), e.g. ``python -m experiments bench --only lookahead``.

To benchmark a new transform, add ``experiments/bench/entries_<topic>.py`` that calls
:func:`register` with a :class:`BenchEntry` (document its byte model as ``baselines.py``
does) and import it below.
"""

from __future__ import annotations

# Registration order = import order: the baselines first, then one module per topic (a
# counterpart must be registered before the entry naming it).
from experiments.bench import (
    baselines,  # registers optax.sgd, sgd+momentum, adam: keep first
    entries_continual,  # spectral / Wasserstein / L2 Init regularizers before sgd
    entries_dpf,  # optlab.dpf on ordinary and mask-refresh steps vs its inner sgd
    entries_lookahead,  # optlab (multilayer) lookahead vs optax.lookahead, 1-3 levels
    entries_sam,  # optlab.sam/ASAM vs optax.contrib.sam, extrap_sgd, past, sa_sam
)
from experiments.bench.cli import BenchConfig, main, run_bench
from experiments.bench.registry import (
    SGD_NAME,
    BenchEntry,
    BenchGoal,
    Registry,
    entries,
    get_entry,
    goals,
    register,
    register_goal,
)

__all__ = [
    "SGD_NAME",
    "BenchConfig",
    "BenchEntry",
    "BenchGoal",
    "Registry",
    "baselines",
    "entries",
    "entries_continual",
    "entries_dpf",
    "entries_lookahead",
    "entries_sam",
    "get_entry",
    "goals",
    "main",
    "register",
    "register_goal",
    "run_bench",
]

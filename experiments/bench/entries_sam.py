"""Two-gradient transforms: SAM/ASAM (vs ``optax.contrib.sam``), EXTRAP-SGD, SA-SAM.

Every entry wraps ``optax.sgd`` at the baselines' learning rate. In the train-step benchmark
``grad_fn`` is the real loss on the same batch, so a step of SAM, ASAM or EXTRAP-SGD costs
two forward/backward passes and its ratio to SGD has a floor near 2.0 (3.0 for SA-SAM, 1.0
for extrapolation from the past); how close a ratio gets to its floor is what the
transform's own arithmetic costs. ``optax.contrib.sam`` runs in ``opaque_mode`` (one
``update`` per step, like optlab's), with its documented adversarial optimizer
``chain(normalize(), sgd(rho))`` and ``sync_period=2``; its ``grad_fn(params, i)`` signature
is adapted from the harness's ``grad_fn(params)``.

Byte models (float32 bytes per parameter, as in ``baselines.py``): the arrays a perfectly
fused update must read or write, each counted once. The update benchmark's ``grad_fn``
(:func:`experiments.bench.updates.quadratic_grad_fn`, ``p - target``) is elementwise and
inlined under ``jit``, so XLA fuses it into the update: its input and output are
intermediates that never reach memory, and a call costs only the read of ``target`` (4 B),
not the 12 B of a stand-alone call (the compiled programs confirm it: EXTRAP-SGD is one
fused loop over ``g, p, target``; counting 12 B per call gave more than 100% of the
measured DRAM bandwidth at 10M parameters).

- ``optlab.sam`` (rho=0.05), ``optax.contrib.sam`` (opaque), ``optlab.sam(adaptive=True)``
  (ASAM, rho=0.5; ``T = |p| + eta`` is computed from ``p`` on the fly): reads ``g, p,
  target``, writes ``u = -lr grad_fn(p + eps(g, p))``: 16 B; state 0 B/param. (The global
  norm is a reduction that must finish before the ascent point exists, so a real program
  reads ``g`` twice: 20 B in two passes.)
- ``optlab.extrap_sgd`` (gamma=lr): reads ``g, p, target``, writes
  ``u = -lr grad_fn(p - gamma g)``: 16 B, one pass; state 0 B/param.
- ``optlab.extrapolation(direction="past")``: no ``grad_fn``. Reads ``g`` and the old
  offset, writes the new offset ``-gamma g`` and ``u = -lr g + (new - old offset)``. (The
  true iterate ``params - offset`` is only needed by bases that read params; SGD does not.)
  16 B; state: the offset, 4 B/param.
- ``optlab.sa_sam`` (base_lr=lr): reads ``p``, the previous iterate ``x_prev``, ``g`` and
  ``target`` (for both ``grad_fn`` calls: at ``x_prev`` for the smoothness estimate and at
  the ascent point), writes ``u = -eta h`` and the new ``x_prev = p``: 24 B; state:
  ``x_prev``, 4 B/param. (Three norms, ``|p - x_prev|``, ``|g - g'|`` and ``|g|``, must
  finish before the step size and the ascent point exist: at least two passes.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax
import optax.contrib

import optlab
from experiments.bench.baselines import LEARNING_RATE
from experiments.bench.registry import BenchEntry, register

__all__ = ["ASAM_RHO", "RHO", "optax_contrib_sam", "with_two_arg_grad_fn"]

RHO = 0.05
"""SAM's default radius (Foret et al. 2021, CIFAR)."""

ASAM_RHO = 0.5
"""ASAM's CIFAR-10 radius (Kwon et al. 2021)."""


def with_two_arg_grad_fn(
    tx: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
    """Adapts ``optax.contrib.sam(opaque_mode=True)``, which calls ``grad_fn(params, i)``,
    to the harness's ``grad_fn(params)`` (the same batch at every adversarial step)."""

    def update(
        updates: Any,
        state: Any,
        params: Any = None,
        *,
        grad_fn: Callable[[Any], Any] | None = None,
        **extra: Any,
    ) -> tuple[Any, Any]:
        del extra
        if grad_fn is None:
            raise ValueError("optax.contrib.sam(opaque_mode=True) needs grad_fn.")
        return tx.update(updates, state, params, grad_fn=lambda p, _: grad_fn(p))

    return optax.GradientTransformationExtraArgs(tx.init, update)


def optax_contrib_sam(rho: float = RHO) -> optax.GradientTransformationExtraArgs:
    """``optax.contrib.sam`` as its docstring builds SAM, in opaque mode, harness-callable."""
    adversarial = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    return with_two_arg_grad_fn(
        optax.contrib.sam(optax.sgd(LEARNING_RATE), adversarial, sync_period=2, opaque_mode=True)
    )


OPTAX_SAM = register(
    BenchEntry(
        name="optax.contrib.sam(opaque)",
        make=optax_contrib_sam,
        bytes_per_param=16.0,
        needs_grad_fn=True,
    )
)

SAM = register(
    BenchEntry(
        name="optlab.sam(rho=.05)",
        make=lambda: optlab.sam(optax.sgd(LEARNING_RATE), rho=RHO),
        bytes_per_param=16.0,
        counterpart=OPTAX_SAM.name,
        needs_grad_fn=True,
    )
)

ASAM = register(
    BenchEntry(
        name="optlab.sam(asam,rho=.5)",
        make=lambda: optlab.sam(optax.sgd(LEARNING_RATE), rho=ASAM_RHO, adaptive=True),
        bytes_per_param=16.0,
        counterpart=SAM.name,
        needs_grad_fn=True,
    )
)

EXTRAP_SGD = register(
    BenchEntry(
        name="optlab.extrap_sgd(gamma=lr)",
        make=lambda: optlab.extrap_sgd(optax.sgd(LEARNING_RATE), gamma=LEARNING_RATE),
        bytes_per_param=16.0,
        needs_grad_fn=True,
    )
)

EXTRAP_PAST = register(
    BenchEntry(
        name="optlab.extrapolation(past)",
        make=lambda: optlab.extrapolation(
            optax.sgd(LEARNING_RATE), gamma=LEARNING_RATE, direction="past"
        ),
        bytes_per_param=16.0,
    )
)

SA_SAM = register(
    BenchEntry(
        name="optlab.sa_sam",
        make=lambda: optlab.sa_sam(LEARNING_RATE),
        bytes_per_param=24.0,
        counterpart=SAM.name,
        needs_grad_fn=True,
    )
)

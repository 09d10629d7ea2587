"""DiveBatch and AdaBatch: batch-size schedules, and the learning-rate rescaling they need.

A batch-size change happens between steps, on the host: the step itself is unchanged (use
a fixed micro-batch and vary how many are accumulated, so nothing recompiles; see
``experiments.train.plans.EpochBatchPlan``). What optlab provides is the numerical part,
pure and validated:

- :func:`divebatch`: DiveBatch's controller. Every ``resize_every`` epochs it sets
  ``B ← clip(⌊max(δ·n·Δ̂, B)⌋, B_min, B_max)`` from the gradient diversity ``Δ̂`` measured
  over the last epoch (:mod:`optlab.gradient_diversity`); a non-finite ``Δ̂`` gives
  ``B_max``. The batch never shrinks.
- :func:`adabatch_batch_size`: AdaBatch's schedule, ``B_0·factor^⌊epoch / every⌋`` capped at
  ``B_max``, with no data-driven signal.
- :func:`lr_scale` and :func:`scale_by_batch_size`: the learning-rate factor for a batch
  ``B`` against the reference ``B_0``: ``B/B_0`` (linear, Goyal et al.), ``√(B/B_0)`` or
  ``1`` (none). :func:`scale_by_batch_size` is a transform that reads the current batch
  size from the extra argument ``batch_size`` and scales the updates by that factor, so a
  jitted step needs no recompilation when the batch changes.

References:
  Y. Chen, Y. Wang, H. Sundaram. *DiveBatch: Accelerating Model Training Through
  Gradient-Diversity Aware Batch Size Adaptation.* arXiv:2509.16173, 2025. The rule above
  follows public research code of the method (a ``DiveBatchTrainer``: the ``int()`` of
  ``min(max(δ·n·Δ̂, B_old), B_max)``, ``B_max`` on a NaN/Inf diversity); its learning-rate
  rule was not visible there, so the rescaling here is an option (linear by default).

  A. Devarakonda, M. Naumov, M. Garland. *AdaBatch: Adaptive Batch Sizes for Training Deep
  Neural Networks.* arXiv:1712.02029, 2017.

  P. Goyal et al. *Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour.*
  arXiv:1706.02677, 2017 (the linear scaling rule).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optlab.validation import check_float_in_range, check_int_in_range

__all__ = [
    "LR_SCALINGS",
    "DiveBatch",
    "DiveBatchState",
    "adabatch_batch_size",
    "divebatch",
    "lr_scale",
    "scale_by_batch_size",
]

PyTree = Any
LR_SCALINGS = ("linear", "sqrt", "none")
_EXPONENT = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}


def _check_lr_scaling(lr_scaling: Any) -> str:
    if lr_scaling not in LR_SCALINGS:
        raise ValueError(f"lr_scaling must be one of {LR_SCALINGS}, got {lr_scaling!r}.")
    return lr_scaling


def lr_scale(batch_size: Any, base_batch_size: Any, lr_scaling: str = "linear") -> Any:
    """The learning-rate factor for batch ``batch_size`` against ``base_batch_size``.

    ``(B / B_0) ** p`` with ``p = 1`` (``"linear"``), ``1/2`` (``"sqrt"``) or ``0``
    (``"none"``). For a batch that only grows, applying the per-resize ratio at every
    resize gives the same cumulative factor.

    Args:
      batch_size: the current batch size ``B`` (a number or an array).
      base_batch_size: the batch size ``B_0`` the learning rate was set for.
      lr_scaling: ``"linear"``, ``"sqrt"`` or ``"none"``.

    Returns:
      The factor, a float (an array for array inputs).

    Example:

      >>> import optlab
      >>> [optlab.lr_scale(256, 64, rule) for rule in optlab.LR_SCALINGS]
      [4.0, 2.0, 1.0]
    """
    exponent = _EXPONENT[_check_lr_scaling(lr_scaling)]
    if isinstance(batch_size, jax.Array) or isinstance(base_batch_size, jax.Array):
        return (jnp.asarray(batch_size, jnp.float32) / base_batch_size) ** exponent
    return (float(batch_size) / float(base_batch_size)) ** exponent


def scale_by_batch_size(
    base_batch_size: int, lr_scaling: str = "linear"
) -> optax.GradientTransformationExtraArgs:
    """Scales the updates by :func:`lr_scale` of the extra argument ``batch_size``.

    ``u ← u · (B / B_0)^p``, with ``B`` passed to ``update`` as the keyword extra argument
    ``batch_size`` (a traced integer: the batch may change between steps with no
    recompilation) and ``p`` from ``lr_scaling``. Put it last in an ``optax.chain`` after
    the optimizer (the factor then multiplies the learning rate of that step, momentum
    included, as a rescaled learning rate does for SGD). Without ``batch_size`` the
    updates pass unchanged.

    Args:
      base_batch_size: ``B_0``, the batch size the learning rate was tuned for (>= 1).
      lr_scaling: ``"linear"``, ``"sqrt"`` or ``"none"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:

      >>> import jax.numpy as jnp, optax, optlab
      >>> tx = optax.chain(optax.sgd(0.1), optlab.scale_by_batch_size(32))
      >>> state = tx.init(jnp.zeros(1))
      >>> updates, state = tx.update(jnp.ones(1), state, batch_size=jnp.int32(128))
      >>> updates
      Array([-0.4], dtype=float32)
    """
    base_batch_size = check_int_in_range("base_batch_size", base_batch_size, min_value=1)
    exponent = _EXPONENT[_check_lr_scaling(lr_scaling)]

    def init_fn(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, batch_size=None, **extra_args):
        del params, extra_args
        if batch_size is None or exponent == 0.0:
            return updates, state
        factor = (jnp.asarray(batch_size, jnp.float32) / base_batch_size) ** exponent
        return jax.tree.map(lambda u: (u * factor).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DiveBatchState(NamedTuple):
    """The controller's state (host-side numbers; also valid under ``jit``).

    Attributes:
      batch_size: the current batch size ``B`` (int32).
      epoch: the epochs completed so far (int32).
      diversity: the last diversity used for a resize (NaN before the first).
    """

    batch_size: jax.Array
    epoch: jax.Array
    diversity: jax.Array


class DiveBatch(NamedTuple):
    """DiveBatch's controller: ``init(batch_size)`` and ``end_epoch(state, diversity)``.

    Attributes:
      init: ``init(batch_size) -> DiveBatchState``; ``batch_size`` in ``[B_min, B_max]``.
      end_epoch: ``end_epoch(state, diversity) -> DiveBatchState``, called once at the end
        of every epoch with the diversity measured over it; resizes at the end of epochs
        ``resize_every, 2·resize_every, ...`` and otherwise only counts the epoch.
      batch_size_for: ``batch_size_for(diversity, batch_size) -> new batch size``, the
        resize rule alone (clip, floor, rounding to ``multiple_of``).
    """

    init: Any
    end_epoch: Any
    batch_size_for: Any


def divebatch(
    num_examples: int,
    *,
    delta: float,
    min_batch_size: int,
    max_batch_size: int,
    resize_every: int = 5,
    multiple_of: int = 1,
) -> DiveBatch:
    """DiveBatch's controller: grow the batch to ``δ·n·Δ̂`` every ``resize_every`` epochs.

    At the end of epoch ``e`` (counting from 1), if ``e`` is a multiple of
    ``resize_every``::

        B ← clip(⌊max(δ·n·Δ̂, B)⌋, B_min, B_max),    B ← B_max if Δ̂ is NaN or ±inf

    then ``B`` is rounded down to a multiple of ``multiple_of`` (never below ``B``'s
    previous value, ``B_min``'s multiple or above ``B_max``'s), so that a fixed micro-batch
    divides it. ``Δ̂`` is the gradient diversity measured over the epoch (Yin et al.'s bound:
    batches up to ``δ·n·Δ`` keep small-batch convergence per example), ``n`` the
    training-set size. The batch never shrinks. The learning rate follows the batch through
    :func:`lr_scale` / :func:`scale_by_batch_size`.

    Args:
      num_examples: ``n``, the training-set size (>= 1).
      delta: ``δ > 0``, the fraction of the diversity bound used (0.1, 0.02 and 1e-4 appear
        in the public code with ``n = 50 000``; the main hyperparameter).
      min_batch_size: ``B_min >= 1``.
      max_batch_size: ``B_max >= B_min``.
      resize_every: epochs between resizes (>= 1; 5 in the public scripts).
      multiple_of: batch sizes are multiples of this (the micro-batch), >= 1; ``B_min`` and
        ``B_max`` must be multiples of it.

    Returns:
      A :class:`DiveBatch` of pure functions (jnp arithmetic, usable on the host or under
      ``jit``).

    Example (n = 1000, δ = 0.1: a diversity of 2 asks for a batch of 200):

      >>> import optlab
      >>> ctrl = optlab.divebatch(1000, delta=0.1, min_batch_size=32, max_batch_size=512,
      ...                         resize_every=2, multiple_of=32)
      >>> state = ctrl.init(32)
      >>> state = ctrl.end_epoch(state, 2.0)  # epoch 1: no resize
      >>> int(state.batch_size)
      32
      >>> state = ctrl.end_epoch(state, 2.0)  # epoch 2: 200, rounded down to 192
      >>> int(state.batch_size)
      192

    Reference:
      Chen, Wang, Sundaram. *DiveBatch: Accelerating Model Training Through
      Gradient-Diversity Aware Batch Size Adaptation.* arXiv:2509.16173, 2025.
    """
    num_examples = check_int_in_range("num_examples", num_examples, min_value=1)
    check_float_in_range("delta", delta, low=0.0, low_inclusive=False)
    if callable(delta) or isinstance(delta, jax.core.Tracer):
        raise ValueError(f"delta must be a concrete positive number, got {delta!r}.")
    delta = float(delta)
    min_batch_size = check_int_in_range("min_batch_size", min_batch_size, min_value=1)
    max_batch_size = check_int_in_range(
        "max_batch_size", max_batch_size, min_value=min_batch_size, note=" (min_batch_size)"
    )
    resize_every = check_int_in_range("resize_every", resize_every, min_value=1)
    multiple_of = check_int_in_range("multiple_of", multiple_of, min_value=1)
    for name, value in (("min_batch_size", min_batch_size), ("max_batch_size", max_batch_size)):
        if value % multiple_of:
            raise ValueError(f"{name} ({value}) must be a multiple of multiple_of ({multiple_of}).")

    def batch_size_for(diversity: Any, batch_size: Any) -> jax.Array:
        diversity = jnp.asarray(diversity, jnp.float32)
        old = jnp.asarray(batch_size, jnp.int32)
        wanted = jnp.maximum(delta * num_examples * diversity, old.astype(jnp.float32))
        wanted = jnp.minimum(wanted, float(max_batch_size))  # before the cast: no overflow
        new = jnp.clip(jnp.floor(wanted).astype(jnp.int32), min_batch_size, max_batch_size)
        new = jnp.where(jnp.isfinite(diversity), new, max_batch_size)
        rounded = (new // multiple_of) * multiple_of
        return jnp.maximum(rounded, jnp.maximum(old, min_batch_size)).astype(jnp.int32)

    def init(batch_size: Any) -> DiveBatchState:
        if not isinstance(batch_size, jax.core.Tracer):
            check_int_in_range(
                "batch_size",
                int(batch_size),
                min_value=min_batch_size,
                max_value=max_batch_size,
                note=" (min_batch_size, max_batch_size)",
            )
        return DiveBatchState(
            batch_size=jnp.asarray(batch_size, jnp.int32),
            epoch=jnp.zeros((), jnp.int32),
            diversity=jnp.full((), jnp.nan, jnp.float32),
        )

    def end_epoch(state: DiveBatchState, diversity: Any) -> DiveBatchState:
        epoch = state.epoch + 1
        resize = epoch % resize_every == 0
        diversity = jnp.asarray(diversity, jnp.float32)
        return DiveBatchState(
            batch_size=jnp.where(
                resize, batch_size_for(diversity, state.batch_size), state.batch_size
            ),
            epoch=epoch,
            diversity=jnp.where(resize, diversity, state.diversity),
        )

    return DiveBatch(init=init, end_epoch=end_epoch, batch_size_for=batch_size_for)


def adabatch_batch_size(
    epoch: int,
    *,
    initial_batch_size: int,
    max_batch_size: int,
    every: int,
    factor: int = 2,
) -> int:
    """AdaBatch's batch size for (0-based) ``epoch``: ``min(B_0·factor^⌊epoch/every⌋, B_max)``.

    A fixed schedule (no measurement): the batch is multiplied by ``factor`` every ``every``
    epochs, as a step decay would divide the learning rate; pair it with :func:`lr_scale`
    (the learning-rate rule of Devarakonda et al. keeps the step decay's net effect).

    Args:
      epoch: the 0-based epoch, an int >= 0.
      initial_batch_size: ``B_0 >= 1``.
      max_batch_size: ``B_max >= B_0``.
      every: epochs between multiplications (>= 1).
      factor: the multiplier, an int >= 2.

    Returns:
      The batch size, a Python int.

    Example:

      >>> import optlab
      >>> [optlab.adabatch_batch_size(e, initial_batch_size=32, max_batch_size=128, every=2)
      ...  for e in range(7)]
      [32, 32, 64, 64, 128, 128, 128]

    Reference:
      Devarakonda, Naumov, Garland. *AdaBatch: Adaptive Batch Sizes for Training Deep Neural
      Networks.* arXiv:1712.02029, 2017.
    """
    epoch = check_int_in_range("epoch", epoch, min_value=0)
    initial_batch_size = check_int_in_range("initial_batch_size", initial_batch_size, min_value=1)
    max_batch_size = check_int_in_range(
        "max_batch_size", max_batch_size, min_value=initial_batch_size, note=" (initial_batch_size)"
    )
    every = check_int_in_range("every", every, min_value=1)
    factor = check_int_in_range("factor", factor, min_value=2)
    doublings = epoch // every
    # Stop multiplying once past the cap (no huge integers for long schedules).
    cap = math.ceil(math.log(max_batch_size / initial_batch_size, factor)) if doublings else 0
    return min(initial_batch_size * factor ** min(doublings, cap), max_batch_size)

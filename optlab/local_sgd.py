"""Local SGD and post-local SGD: periodic parameter averaging over a named worker axis.

Each worker holds its own copy of the params and of the inner optimizer state and runs
``inner`` on its own gradient; every ``sync_period`` updates the params are averaged over
``axis_name``. The sync is guarded by the step count, which is the same on every worker
(``optlab._control.run_if``: a ``lax.cond`` whose taken branch is a one-trip while loop), so
an off-sync step runs no collective, moves no bytes between workers and costs nothing
(under ``jax.shard_map`` and multi-host JAX, and also under ``jax.vmap`` over runs and
workers, where the count is batched: the sync then runs only on steps where some member
syncs).

References:
  S. U. Stich. *Local SGD Converges Fast and Communicates Little.* ICLR 2019.
  arXiv:1805.09767.

  T. Lin, S. U. Stich, K. K. Patel, M. Jaggi. *Don't Use Large Mini-Batches, Use Local SGD.*
  ICLR 2020. arXiv:1808.07217.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optlab._control import run_if
from optlab.parallel import is_manual_axis
from optlab.validation import check_injectable_int

__all__ = ["LocalSGDState", "local_sgd"]

PyTree = Any
AxisName = str | tuple[str, ...]

_MAX_COUNT = 2**31 - 1  # the step counter is int32


class LocalSGDState(NamedTuple):
    """State of :func:`local_sgd`.

    Attributes:
      count: updates taken so far (int32, saturating at its maximum); identical on every
        worker, it decides the sync steps.
      inner_state: the inner optimizer's state, worker-local (averaged at syncs only with
        ``average_state=True``).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    inner_state: optax.OptState


def check_axis_name(axis_name: Any) -> AxisName:
    """Returns ``axis_name`` if it is a string or a non-empty tuple of strings, else raises."""
    if isinstance(axis_name, str) or (
        isinstance(axis_name, tuple)
        and len(axis_name) > 0
        and all(isinstance(a, str) for a in axis_name)
    ):
        return axis_name
    raise ValueError(
        f"axis_name must be a string or a non-empty tuple of strings (the worker axis of "
        f"jax.vmap / jax.shard_map), got {axis_name!r}."
    )


def worker_mean(tree: PyTree, axis_name: AxisName) -> PyTree:
    """``lax.pmean`` over ``axis_name``, re-marked as varying under ``shard_map``.

    The mean is the same on every worker (invariant); a conditional (``lax.cond``,
    ``run_if``) whose other branch returns the worker's own (varying) value needs both
    sides of one type, so under a manual (``shard_map``) axis the mean is cast back to
    varying, which moves no data.
    """
    mean = jax.lax.pmean(tree, axis_name)
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    manual = tuple(a for a in names if is_manual_axis(a))
    if not manual:
        return mean

    def cast(leaf: jax.Array) -> jax.Array:
        missing = tuple(a for a in manual if a not in jax.typeof(leaf).manual_axis_type.varying)
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(cast, mean)


def local_sgd(
    inner: optax.GradientTransformation,
    sync_period: int,
    axis_name: AxisName,
    *,
    start_step: int = 0,
    average_state: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Local SGD: ``inner`` on each worker's own gradient, params averaged every H steps.

    With worker params :math:`x_i`, period :math:`H`, :math:`M` workers and ``t`` the number
    of updates before this one (0 for the first), each update does

    .. math::

      x_i \leftarrow x_i + \mathrm{inner}(g_i); \quad
      \text{if } t < s \text{ or } (t + 1 - s) \bmod H = 0: \;
      x_i \leftarrow \tfrac{1}{M} \textstyle\sum_j x_j,

    where :math:`s` is ``start_step``. So the params are averaged after the H-th local step
    of each period (after updates H, 2H, ... when ``start_step = 0``); an off-sync step emits
    the inner update, a sync step emits ``pmean(params + inner_update) - params``.

    **Post-local SGD** (Lin et al.): the first ``start_step`` updates each average the params
    right after the local inner step (a sync every step), then periods of H local steps
    follow, counted from ``start_step``. Averaging the params after every step is
    synchronous data-parallel SGD when ``inner`` is linear in the gradient with a state that
    is linear too (SGD, SGD with momentum or Nesterov, even with worker-local momentum: the
    mean of the workers' buffers follows the mean gradient); for an adaptive ``inner``
    (Adam) it is the average of the workers' local steps, not Adam on the mean gradient.
    Put ``optlab.mean_gradients`` in front of ``inner`` for that.

    **Inner state**: kept worker-local by default (``average_state=False``), as in the
    reference code of Lin et al. (epfml/LocalSGD-Code), which averages the parameters
    only. With ``average_state=True`` the floating-point leaves of the inner state (momentum
    and Adam moments) are averaged at every sync too, in the same collective step.

    The params must start identical on every worker (replicated), and this must be the
    **outermost** transform of the chain (put clipping, weight decay and the learning rate
    inside ``inner`` or before it in an ``optax.chain``). ``update`` must run where
    ``axis_name`` is bound: ``jax.vmap(..., axis_name=...)`` (a simulation on one device),
    ``jax.shard_map`` over a mesh axis, or both (a tuple of names).

    Args:
      inner: the worker optimizer (any optax transform; extra args are forwarded to it).
      sync_period: local steps per averaging, ``H >= 1`` (``1`` averages after every step).
      axis_name: the worker axis, a string or a tuple of strings.
      start_step: updates before local SGD starts (post-local SGD); ``>= 0``.
      average_state: also average the inner optimizer's floating-point state at syncs.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Example (two workers simulated with ``vmap``, averaging every 2 steps):
      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> tx = optlab.local_sgd(optax.sgd(0.5), sync_period=2, axis_name="workers")
      >>> def step(params, state, grads):
      ...     updates, state = tx.update(grads, state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> step = jax.vmap(step, axis_name="workers")
      >>> params = jnp.zeros((2, 1))  # one parameter per worker, replicated
      >>> state = jax.vmap(tx.init)(params)
      >>> grads = jnp.array([[1.0], [3.0]])  # each worker's own gradient
      >>> params, state = step(params, state, grads)  # local step
      >>> params
      Array([[-0.5],
             [-1.5]], dtype=float32)
      >>> params, state = step(params, state, grads)  # local step, then the average
      >>> params
      Array([[-2.],
             [-2.]], dtype=float32)

    References:
      Stich. *Local SGD Converges Fast and Communicates Little.* ICLR 2019.
      arXiv:1805.09767.

      Lin, Stich, Patel, Jaggi. *Don't Use Large Mini-Batches, Use Local SGD.* ICLR 2020.
      arXiv:1808.07217.
    """
    sync_period = check_injectable_int(
        "sync_period", sync_period, min_value=1, max_value=_MAX_COUNT
    )
    start_step = check_injectable_int("start_step", start_step, min_value=0, max_value=_MAX_COUNT)
    axis_name = check_axis_name(axis_name)
    if not isinstance(average_state, bool):
        raise ValueError(f"average_state must be a bool, got {average_state!r}.")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> LocalSGDState:
        return LocalSGDState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update_fn(
        updates: PyTree,
        state: LocalSGDState,
        params: PyTree | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, LocalSGDState]:
        if params is None:
            raise ValueError(
                "local_sgd needs params: call update(grads, state, params) (a sync averages "
                "the params)."
            )
        local, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        sync = is_sync_step(state.count, sync_period, start_step)

        def average(operands):
            local, inner_state = operands
            new = worker_mean(
                jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, local), axis_name
            )
            jump = jax.tree.map(lambda n, p, u: (n - p).astype(u.dtype), new, params, local)
            if average_state:
                inner_state = _mean_floats(inner_state, axis_name)
            return jump, inner_state

        out, inner_state = run_if(sync, average, (local, inner_state))
        return out, LocalSGDState(count=optax.safe_increment(state.count), inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def is_sync_step(count: jax.Array, sync_period: Any, start_step: Any = 0) -> jax.Array:
    """Whether the update taken after ``count`` earlier ones ends with a sync.

    Every update before ``start_step`` syncs; from there on, the ``H``-th, ``2H``-th, ...
    update counted from ``start_step`` does.
    """
    since = count - start_step  # may be negative: those are the every-step syncs
    return (since < 0) | ((since + 1) % sync_period == 0)


def _mean_floats(tree: PyTree, axis_name: AxisName) -> PyTree:
    leaves, treedef = jax.tree.flatten(tree)
    floats = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    means = worker_mean([leaves[i] for i in floats], axis_name)
    for i, mean in zip(floats, means, strict=True):
        leaves[i] = mean.astype(leaves[i].dtype)
    return jax.tree.unflatten(treedef, leaves)

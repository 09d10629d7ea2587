"""DiLoCo: local inner steps on each worker, an outer optimizer on the averaged displacement.

The skeleton of Lookahead with an outer optimizer in place of interpolation: the anchor
(the outer params, the params at the last outer step) lives in the optimizer state, and a
sync step emits ``anchor_new - params``. The params stay the model's own tree;
:func:`diloco_outer_params` returns the anchor.

References:
  A. Douillard, Q. Feng, A. A. Rusu, R. Chhaparia, Y. Donchev, A. Kuncoro, M. Ranzato,
  A. Szlam, J. Shen. *DiLoCo: Distributed Low-Communication Training of Language Models.*
  arXiv:2311.08105, 2023.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optlab._control import run_if
from optlab.local_sgd import AxisName, check_axis_name, is_sync_step, worker_mean
from optlab.validation import check_injectable_int

__all__ = ["DiLoCoState", "diloco", "diloco_outer_params"]

PyTree = Any

_MAX_COUNT = 2**31 - 1  # the step counter is int32


class DiLoCoState(NamedTuple):
    """State of :func:`diloco`.

    Attributes:
      count: updates taken so far (int32, saturating at its maximum); identical on every
        worker, it decides the outer steps.
      inner_state: the inner optimizer's state, worker-local (never averaged).
      outer_state: the outer optimizer's state, replicated (every worker computes the same
        outer step from the same averaged pseudo-gradient).
      anchor: the outer params (the params right after the last outer step, or the initial
        params), a copy in the state, same dtypes as the params, replicated.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    inner_state: optax.OptState
    outer_state: optax.OptState
    anchor: PyTree


def diloco(
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation | None,
    sync_period: int,
    axis_name: AxisName,
) -> optax.GradientTransformationExtraArgs:
    r"""DiLoCo: H inner steps per worker, then one outer step on the mean displacement.

    With worker params :math:`x_i`, the anchor :math:`\theta` (in the state, replicated),
    :math:`M` workers, period :math:`H` and ``t`` the updates before this one:

    .. math::

      x_i \leftarrow x_i + \mathrm{inner}(g_i); \quad
      \text{if } (t + 1) \bmod H = 0: \;
      \Delta = \theta - \tfrac{1}{M} \textstyle\sum_j x_j,\;
      \theta \leftarrow \theta + \mathrm{outer}(\Delta),\; x_i \leftarrow \theta.

    The pseudo-gradient :math:`\Delta` is one all-reduce per outer step; off-sync steps run
    no collective and no outer step, move no bytes and cost nothing (guarded by the step
    count with ``run_if``, also under ``jax.vmap`` over runs and workers) and emit the
    inner update; a sync step emits ``anchor_new - params``. The inner state is worker-local
    and persists across rounds (it is not averaged nor reset, as in the paper); the outer
    state is replicated. The paper's outer optimizer is Nesterov SGD, ``optax.sgd(0.7,
    momentum=0.9, nesterov=True)`` (used when ``outer`` is ``None``): ``v <- mu v + Delta``,
    ``theta <- theta - lr (Delta + mu v)``; the paper's inner one is AdamW (lr 4e-4 with
    warm-up and cosine decay, weight decay 0.1) with H = 500 on 8 workers.

    ``outer = optax.sgd(1.0)`` makes the outer step plain averaging (local SGD with the same
    H, :func:`optlab.local_sgd`); with H = 1 as well, it averages the params after every
    step. The params must start identical on every worker, and this must be the
    **outermost** transform of a chain. ``update`` must run where ``axis_name`` is bound
    (``jax.vmap(..., axis_name=...)``, ``jax.shard_map``, or both as a tuple).

    Args:
      inner: the worker optimizer (any optax transform; extra args are forwarded to it).
      outer: the outer optimizer applied to the pseudo-gradient (it sees the anchor as its
        params), or ``None`` for the paper's Nesterov SGD (lr 0.7, momentum 0.9).
      sync_period: inner steps per outer step, ``H >= 1``.
      axis_name: the worker axis, a string or a tuple of strings.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Example (two workers simulated with ``vmap``, an outer step every 2 inner steps):
      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> tx = optlab.diloco(optax.sgd(0.5), optax.sgd(2.0), sync_period=2, axis_name="w")
      >>> def step(params, state, grads):
      ...     updates, state = tx.update(grads, state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> step = jax.vmap(step, axis_name="w")
      >>> params = jnp.zeros((2, 1))  # replicated start
      >>> state = jax.vmap(tx.init)(params)
      >>> grads = jnp.array([[1.0], [3.0]])  # each worker's own gradient
      >>> params, state = step(params, state, grads)  # inner step
      >>> params, state = step(params, state, grads)  # inner step, then the outer step
      >>> params  # Delta = 0 - (-2) = 2; anchor = 0 - 2.0 * 2
      Array([[-4.],
             [-4.]], dtype=float32)

    Reference:
      Douillard, Feng, Rusu, Chhaparia, Donchev, Kuncoro, Ranzato, Szlam, Shen. *DiLoCo:
      Distributed Low-Communication Training of Language Models.* arXiv:2311.08105, 2023.
    """
    sync_period = check_injectable_int(
        "sync_period", sync_period, min_value=1, max_value=_MAX_COUNT
    )
    axis_name = check_axis_name(axis_name)
    if outer is None:
        outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> DiLoCoState:
        # A copy, not an alias: with the params donated to a jitted step, an alias would
        # hand the anchor's buffer to the new params.
        anchor = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
        return DiLoCoState(
            count=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
            outer_state=outer.init(anchor),
            anchor=anchor,
        )

    def update_fn(
        updates: PyTree,
        state: DiLoCoState,
        params: PyTree | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, DiLoCoState]:
        if params is None:
            raise ValueError(
                "diloco needs params: call update(grads, state, params) (the outer step "
                "averages the params)."
            )
        local, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        sync = is_sync_step(state.count, sync_period)

        def outer_step(operands):
            local, outer_state, anchor = operands
            mean = worker_mean(
                jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, local), axis_name
            )
            delta = jax.tree.map(lambda a, m: a - m.astype(a.dtype), anchor, mean)
            outer_updates, outer_state = outer.update(delta, outer_state, anchor)
            anchor = jax.tree.map(
                lambda a, u: (a + u.astype(a.dtype)).astype(a.dtype), anchor, outer_updates
            )
            jump = jax.tree.map(lambda a, p, u: (a - p).astype(u.dtype), anchor, params, local)
            return jump, outer_state, anchor

        out, outer_state, anchor = run_if(
            sync, outer_step, (local, state.outer_state, state.anchor)
        )
        return out, DiLoCoState(
            count=optax.safe_increment(state.count),
            inner_state=inner_state,
            outer_state=outer_state,
            anchor=anchor,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def diloco_outer_params(opt_state: PyTree) -> PyTree:
    """The anchor (outer params) of the outermost :class:`DiLoCoState` in ``opt_state``.

    Right after an outer step these equal the params; between outer steps they are the
    params of the last outer step (the replicated model to evaluate or checkpoint).

    Raises:
      ValueError: ``opt_state`` holds no DiLoCo state, or several side by side.
    """
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, DiLoCoState))
    found = [n for n in nodes if isinstance(n, DiLoCoState)]
    if len(found) != 1:
        raise ValueError(
            f"diloco_outer_params: opt_state holds {len(found)} DiLoCo states, expected one."
        )
    return found[0].anchor

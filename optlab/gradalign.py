"""GradAlign: each worker's second gradient at a point displaced along its own deviation.

Large-batch and data-parallel SGD lose the implicit regulariser of small-batch SGD, which
penalises disagreement between mini-batch gradients. GradAlign restores it: every worker
takes its gradient at ``params + beta * (g_i - mean_j g_j)``, and the base optimizer steps
on the average of those gradients. One ``update`` per step, two gradient evaluations and two
all-reduces. Built on :mod:`optlab.perturbation` (the gradient at a transformed point) and
the worker-axis conventions of :mod:`optlab.local_sgd`.

Reference:
  Y. Dandi, L. Barba, M. Jaggi. *Implicit Gradient Alignment in Distributed and Federated
  Learning.* AAAI 2022. arXiv:2106.13897.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optlab.local_sgd import AxisName, check_axis_name
from optlab.perturbation import PointMap, grad_at_point, refuse_inside_multi_steps, translate
from optlab.validation import check_float_in_range

__all__ = ["GradAlignState", "alignment_point", "gradalign"]

PyTree = Any


class GradAlignState(NamedTuple):
    """State of :func:`gradalign`.

    Attributes:
      count: number of ``update`` calls so far (int32, saturating); the step at which
        ``beta`` is evaluated when it is a schedule. The same on every worker.
      base_state: the base optimizer's state.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    base_state: optax.OptState


def alignment_point(beta: Any, axis_name: AxisName) -> PointMap:
    """GradAlign's displaced point ``p + beta * (g - pmean(g))`` as a point map.

    Must run where ``axis_name`` is bound; ``g`` is the worker's own gradient, so the
    displacement is along the worker's deviation from the mean gradient (and averages to
    zero over the workers).
    """

    def point_map(params: PyTree, grads: PyTree) -> PyTree:
        mean = jax.lax.pmean(grads, axis_name)
        deviation = jax.tree.map(lambda g, m: g - m, grads, mean)
        return translate(params, deviation, beta)

    return point_map


def gradalign(
    base: optax.GradientTransformation,
    beta: float | jax.Array | optax.Schedule,
    axis_name: AxisName,
) -> optax.GradientTransformationExtraArgs:
    r"""GradAlign: the base optimizer on the mean of gradients taken at aligned points.

    Worker :math:`i` of :math:`M`, with its own gradient :math:`g_i = \nabla f_i(x)` on its
    own batch (``grads``, *not* averaged), does

    .. math::

      \bar g = \frac1M \sum_j g_j, \qquad
      \tilde x_i = x + \beta\,(g_i - \bar g), \qquad
      h_i = \nabla f_i(\tilde x_i), \qquad
      \text{updates} = \mathrm{base}\Big(\frac1M \sum_i h_i\Big).

    **Sign.** The displacement moves *along* the worker's deviation from the mean gradient
    (official code: ``param -= beta * (full - local)``). To first order,

    .. math::

      \frac1M \sum_i h_i \approx \nabla f + \frac{\beta}{M} \sum_i H_i (g_i - \bar g)
      = \nabla\Big[f + \frac{\beta}{2}\,\frac1M \sum_i \|\nabla f_i - \nabla f\|^2\Big],

    gradient descent on the loss plus :math:`\beta/2` times the variance of the worker
    gradients, which favours points where the workers' gradients agree (exact for quadratic
    :math:`f_i`). The opposite sign would *maximise* that variance.

    ``beta = 0`` is exactly synchronous data-parallel ``base`` on :math:`\bar g` (the second
    gradient is then taken at ``params`` itself). GradAlign is FedGA (the federated variant
    of the official code) with one local step.

    **Calling convention.** ``update(grads, state, params, *, grad_fn, **extra)`` inside
    ``jax.vmap(..., axis_name=...)``, ``jax.shard_map`` over ``axis_name`` or both. ``grads``
    is the worker's local gradient and ``grad_fn(params) -> grads`` the worker's local
    gradient on the *same* batch (closed over it; no model-state update). Under
    ``shard_map`` with replicated params build both with
    ``optlab.data_parallel_value_and_grad(..., average=False)`` (DESIGN.md: the gradient of
    a replicated parameter is otherwise already summed). The updates are the same on every
    worker, so replicated params stay replicated. All extra args, ``grad_fn`` included, are
    forwarded to ``base``, which also receives the true ``params``.

    **Composition.** Put clipping, weight decay and the learning rate *inside* ``base`` to
    act on the averaged GradAlign gradient. A transform chained *before* ``gradalign`` only
    changes ``grads``, i.e. the displacement. ``optax.MultiSteps(gradalign(...), k)`` is
    refused with a ``ValueError`` (it would forward the ``grad_fn`` of the last micro-batch
    only); put it inside, ``gradalign(optax.MultiSteps(base, k), beta, axis_name)``, to
    displace each micro-batch by its own deviation and average the k GradAlign gradients, or
    call ``update`` once per accumulated batch with
    :func:`optlab.perturbation.microbatched_grad_fn`.

    Args:
      base: the optimizer fed the averaged gradient (plain or extra-args).
      beta: the displacement scale :math:`\beta \ge 0` (official default 0.1); a float, a
        traced scalar or a schedule ``count -> beta``.
      axis_name: the worker axis, a string or a non-empty tuple of strings.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`GradAlignState`.

    Example (three workers simulated with ``vmap``; worker i's loss is
    ``a_i / 2 * (w - c_i)^2``):

      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> a, c = jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, 0.0, -1.0])
      >>> tx = optlab.gradalign(optax.sgd(0.1), beta=0.5, axis_name="workers")
      >>> def step(w, state, a, c):
      ...     grad_fn = jax.grad(lambda w: a / 2 * jnp.sum((w - c) ** 2))
      ...     updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
      ...     return optax.apply_updates(w, updates), state
      >>> w = jnp.zeros((3, 1))  # replicated: one copy per worker
      >>> w, state = jax.vmap(step, axis_name="workers")(w, jax.vmap(tx.init)(w), a, c)
      >>> print(w[:, 0].round(4))  # -0.1 x 4/3; synchronous SGD would give -0.1 x 2/3
      [-0.1333 -0.1333 -0.1333]

    References:
      Dandi, Barba, Jaggi. *Implicit Gradient Alignment in Distributed and Federated
      Learning.* AAAI 2022. arXiv:2106.13897.
    """
    check_float_in_range("beta", beta, low=0.0)
    axis_name = check_axis_name(axis_name)
    base = optax.with_extra_args_support(base)

    def init_fn(params: PyTree) -> GradAlignState:
        return GradAlignState(count=jnp.zeros((), jnp.int32), base_state=base.init(params))

    def update_fn(
        updates: PyTree,
        state: GradAlignState,
        params: PyTree | None = None,
        *,
        grad_fn: Callable[[PyTree], PyTree] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, GradAlignState]:
        if params is None:
            raise ValueError(
                "optlab.gradalign needs params: call update(grads, state, params, grad_fn=...)."
            )
        if grad_fn is None:
            raise ValueError(
                "optlab.gradalign needs the extra argument grad_fn (params -> the worker's "
                "local gradient on the same batch)."
            )
        refuse_inside_multi_steps(
            "optlab.gradalign",
            "; or put MultiSteps inside, optlab.gradalign(optax.MultiSteps(base, k), beta, "
            "axis_name), to displace each micro-batch by its own deviation and average those",
        )
        beta_t = beta(state.count) if callable(beta) else beta
        h = grad_at_point(grad_fn, params, updates, alignment_point(beta_t, axis_name))
        h = jax.lax.pmean(h, axis_name)
        new_updates, base_state = base.update(
            h, state.base_state, params, grad_fn=grad_fn, **extra_args
        )
        return new_updates, GradAlignState(
            count=optax.safe_increment(state.count), base_state=base_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

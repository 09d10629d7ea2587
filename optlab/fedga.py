"""FedGA: federated GradAlign, a FedAvg round started from gradient-aligned client points.

At the first update of a round every participating client displaces its start point along
its gradient's deviation from the participants' mean gradient, ``x_i = x + beta (g_i -
mean g)``, then runs its local steps; the server step is FedAvg's (:mod:`optlab.fedavg`).
This is the federated variant the official GradAlign code runs; with one local step it
is :func:`optlab.gradalign`.

Reference:
  Y. Dandi, L. Barba, M. Jaggi. *Implicit Gradient Alignment in Distributed and Federated
  Learning.* AAAI 2022. arXiv:2106.13897. Official code: github.com/epfml/GradientAlignment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from optlab.fedavg import FederatedCore, masked_mean
from optlab.local_sgd import AxisName
from optlab.perturbation import refuse_inside_multi_steps
from optlab.validation import check_float_in_range

__all__ = ["FedGAState", "fedga"]

PyTree = Any


class FedGAState(NamedTuple):
    """State of :func:`fedga` (the fields of :class:`optlab.FedAvgState`).

    Attributes:
      count: updates taken so far (int32, saturating); identical on every client.
      participating: bool, whether this client takes part in the current round.
      client_state: the client optimizer's state, client-local.
      server_state: the server optimizer's state, replicated.
      anchor: the server model, replicated.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    participating: jax.Array
    client_state: optax.OptState
    server_state: optax.OptState
    anchor: PyTree


def fedga(
    client: optax.GradientTransformation,
    server: optax.GradientTransformation,
    local_steps: int,
    axis_name: AxisName,
    *,
    beta: float | jax.Array = 0.1,
    client_weights: Sequence[float] | np.ndarray | jax.Array | None = None,
    reset_client_state: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""FedGA: FedAvg rounds whose clients start from gradient-aligned points.

    Round :math:`r` (``local_steps`` :math:`= H` updates, participants :math:`S` from
    ``active``, server model :math:`x`), as the official code (``FedGA``) runs it:

    .. math::

      g_i = \nabla f_i(x), \quad \bar g = \frac{1}{|S|}\sum_{i \in S} g_i, \quad
      x_i \leftarrow x - \beta\,(\bar g - g_i) \qquad (i \in S,\ \text{first update}),

      x_i \leftarrow x_i + \mathrm{client}(\nabla f_i(x_i)) \quad (H \text{ times}), \qquad
      x \leftarrow x + \mathrm{server}\Big(\frac{\sum_{i \in S} w_i (x - x_i)}
      {\sum_{i \in S} w_i}\Big).

    The displacement moves *along* the client's deviation from the mean gradient (code:
    ``param -= beta * (full - local)``), and the displacements average to zero over the
    participants (with equal weights). With ``H = 1``, all clients taking part and
    ``server = optax.sgd(1.0)`` this is exactly :func:`optlab.gradalign` with ``client``
    as its base optimizer. The mean :math:`\bar g` weighs participants equally, as the
    code does (``client_weights`` only weigh the server average).

    **Which gradients.** :math:`g_i` is the gradient handed to the round's first
    ``update`` (the official code takes the client's full local gradient, or the
    gradient on its first ``fg_batch_size`` examples: here the first step's batch, so
    ``fg_batch_size`` = the batch size; accumulate micro-batches in the trainer for a
    larger one). The first local step's gradient is ``grad_fn`` at the displaced point
    (the same batch; the code draws a fresh one), the other local steps use their own
    ``grads``. Cost: one more gradient and one more all-reduce per round (the code's
    second communication round), both under a ``lax.cond`` on the replicated step count,
    so the other updates of a round pay nothing for them.

    **Calling convention.** ``update(grads, state, params, *, grad_fn, active=None,
    **extra)`` as :func:`optlab.fedavg`, plus ``grad_fn(params) -> this client's
    gradient`` on the step's batch (closed over it; no model-state update).
    ``optax.MultiSteps(fedga(...), k)`` is refused (it would forward the last
    micro-batch's ``grad_fn``); accumulate inside ``grad_fn`` instead.

    Args:
      client: the client optimizer (code: SGD with optional momentum / weight decay).
      server: the server optimizer on the mean pseudo-gradient (code: SGD, lr 1.0,
        optional momentum / Nesterov).
      local_steps: client updates per round (the code's ``nsteps``), ``>= 1``.
      axis_name: the client axis, a string or a non-empty tuple of strings.
      beta: the displacement scale :math:`\beta \ge 0` (code default 0.1; scripts use
        0.17-1.3 times the client learning rate); a float or a traced scalar.
      client_weights: optional non-negative weights per client for the server average.
      reset_client_state: re-initialise the client optimizer after every round.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and
      ``grad_fn``.

    Example (two clients with losses ``(w - c_i)^2 / 2``, one local step; the first is
    displaced by beta * (g_0 - mean g) = 0.5 * (1 - 0) before its step):
      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> tx = optlab.fedga(optax.sgd(0.5), optax.sgd(1.0), 1, "c", beta=0.5)
      >>> def step(w, state, c):
      ...     grad_fn = jax.grad(lambda w: jnp.sum((w - c) ** 2) / 2)
      ...     updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
      ...     return optax.apply_updates(w, updates), state
      >>> w = jnp.zeros((2, 1))
      >>> w, state = jax.vmap(step, axis_name="c")(w, jax.vmap(tx.init)(w), jnp.array([-1.0, 1.0]))
      >>> w[:, 0]  # x_0 = 0.5 - 0.5 * 1.5, x_1 = -0.5 + 0.5 * 1.5: their mean is 0
      Array([0., 0.], dtype=float32)

    Reference:
      Dandi, Barba, Jaggi. *Implicit Gradient Alignment in Distributed and Federated
      Learning.* AAAI 2022. arXiv:2106.13897.
    """
    check_float_in_range("beta", beta, low=0.0)
    core = FederatedCore(
        "fedga", client, server, local_steps, axis_name, client_weights, reset_client_state
    )

    def aggregate(delta, part, weight, state):
        mean, valid = masked_mean(delta, part * weight, core.axis_name)
        return mean, valid, {}

    def round_start(grads, params, part, extra_args, state):
        grad_fn: Callable[[PyTree], PyTree] | None = extra_args.get("grad_fn")
        if grad_fn is None:
            raise ValueError(
                "optlab.fedga needs the extra argument grad_fn (params -> this client's "
                "gradient on the step's batch)."
            )
        refuse_inside_multi_steps(
            "optlab.fedga", "; accumulate the micro-batches inside grad_fn and grads instead"
        )
        mean, _ = masked_mean(grads, part, core.axis_name)
        shift = jax.tree.map(
            lambda g, m, p: (part.astype(g.dtype) * beta * (g - m)).astype(p.dtype),
            grads,
            mean,
            params,
        )
        point = jax.tree.map(lambda p, s: p + s, params, shift)
        return shift, grad_fn(point)

    return core.transform(FedGAState, {}, aggregate, round_start)

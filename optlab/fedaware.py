"""FedAWARE: the server steps along the min-norm convex combination of client momenta.

The FedAvg round of :mod:`optlab.fedavg` with another server aggregate: every client keeps
a momentum of its pseudo-gradients (refreshed only in rounds it takes part in), and the
server direction is the minimum-norm point of the convex hull of the normalised momenta
of *all* clients (MGDA's common descent direction, which maximises gradient diversity),
found by Frank-Wolfe under ``jit``.

Reference:
  D. Zeng, Z. Xu, Y. Pan, Q. Wang, X. Tang. *Tackling Hybrid Heterogeneity on Federated
  Optimization via Gradient Diversity Maximization* (later *FedAWARE: Maximizing
  Gradient Diversity for Heterogeneous Federated Server-side Optimization*).
  arXiv:2310.02702, 2023. Official code: github.com/dunzeng/FedAWARE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from optlab.fedavg import FederatedCore, axis_names, masked_mean, vary
from optlab.local_sgd import AxisName
from optlab.validation import check_float_in_range, check_injectable_int

__all__ = ["FedAWAREState", "fedaware", "min_norm_weights"]

PyTree = Any


class FedAWAREState(NamedTuple):
    """State of :func:`fedaware`.

    Attributes:
      count: updates taken so far (int32, saturating); identical on every client.
      participating: bool, whether this client takes part in the current round.
      client_state: the client optimizer's state, client-local.
      server_state: the server optimizer's state (on the direction), replicated.
      anchor: the server model, replicated.
      momentum: this client's momentum of its pseudo-gradients (params-shaped, kept on
        the client's worker; the official server keeps the N buffers itself).
      seen: bool, whether this client has taken part in a round yet.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    participating: jax.Array
    client_state: optax.OptState
    server_state: optax.OptState
    anchor: PyTree
    momentum: PyTree
    seen: jax.Array


def fedaware(
    client: optax.GradientTransformation,
    server: optax.GradientTransformation,
    local_steps: int,
    axis_name: AxisName,
    *,
    alpha: float | jax.Array = 0.5,
    projection: bool = False,
    client_weights: Sequence[float] | np.ndarray | jax.Array | None = None,
    reset_client_state: bool = True,
    max_iters: int = 1000,
    tol: float = 1e-5,
) -> optax.GradientTransformationExtraArgs:
    r"""FedAWARE: a server step on the min-norm combination of normalised client momenta.

    Rounds as in :func:`optlab.fedavg` (``local_steps`` client updates, participants from
    ``active``). At the end of a round, with :math:`d_i = x - x_i` the pseudo-gradients of
    the participants :math:`S`, :math:`w_i` the client weights and :math:`N` clients:

    .. math::

      m_i \leftarrow (1 - \alpha)\, m_i + \alpha\, d_i \quad (i \in S), \qquad
      \hat m_i = m_i / \|m_i\| \;\; (\|m_i\| = 0 \to 1),

      \lambda^\star = \operatorname*{arg\,min}_{\lambda \in \Delta_N}
      \Big\|\sum_{i=1}^N \lambda_i \hat m_i\Big\|^2, \qquad
      e = \sum_i \lambda^\star_i \hat m_i, \qquad x \leftarrow x + \mathrm{server}(e).

    Until every client has taken part once (counting the current round) the direction is
    the participants' weighted mean :math:`e = \sum_{i \in S} w_i d_i / \sum_{i \in S}
    w_i` (the official warm-up). Momenta of clients outside the round are kept, stale,
    and still enter :math:`\lambda^\star`, as in the official code. The paper's server
    step is ``server = optax.sgd(eta_g)`` with :math:`\eta_g = 1`; note that :math:`e` is a
    combination of unit vectors (:math:`\|e\| \le 1`), so ``eta_g`` sets the step length
    in parameter space, unlike FedAvg's. ``projection=True`` rescales :math:`e` to the
    projection of the weighted mean of all momenta onto it, :math:`e \leftarrow
    (\langle \bar m, e\rangle / \langle e, e\rangle)\, e`, :math:`\bar m = \sum_i w_i m_i
    / \sum_i w_i` (the official "projection" mode).

    **Min-norm solver** (the official ``find_min_norm_element_FW``): Frank-Wolfe on the
    :math:`N \times N` Gram matrix, started at the best pair of vectors (closed form),
    with exact line search, at most ``max_iters`` iterations, stopping when the L1 change
    of :math:`\lambda` is below ``tol`` (a ``lax.while_loop``); see
    :func:`min_norm_weights`. The Gram matrix is computed in float32 (float64 under x64)
    on the flattened normalised momenta.

    **Memory and communication.** Every client stores its own momentum (:math:`N` model
    copies over all clients, as the official server). At the sync each client
    all-gathers the :math:`N` normalised momenta (:math:`N \cdot |x|` floats per worker
    under ``shard_map``; one shared copy under ``vmap``) and solves the same :math:`N
    \times N` problem; the direction is then formed locally, without a further collective.
    During warm-up the all-gather is skipped (a ``lax.cond`` on the replicated
    all-clients-seen flag) and one all-reduce forms the mean, as in :func:`optlab.fedavg`.

    Calling convention, composition and ``active`` as :func:`optlab.fedavg`; under
    ``optax.inject_hyperparams`` pass ``projection`` in ``static_args``. Client sampling
    is the caller's (the official code samples the not-yet-seen clients first, then
    with probabilities :math:`\lambda^\star`; that feedback sampler is not reproduced).

    Args:
      client: the client optimizer (official: SGD, lr 0.01, weight decay 5e-4).
      server: the optimizer applied to the direction :math:`e` (official: ``sgd(1.0)``).
      local_steps: client updates per round, ``>= 1``.
      axis_name: the client axis, a string or a non-empty tuple of strings.
      alpha: the momentum rate :math:`\alpha \in [0, 1]` (official 0.5; 0.3 on
        pathological MNIST); a float or a traced scalar.
      projection: the official projection mode (see above).
      client_weights: optional non-negative weights per client (data sizes) for the
        warm-up mean and the projection; ``None``: equal.
      reset_client_state: re-initialise the client optimizer after every round.
      max_iters: the Frank-Wolfe iteration cap (official 1000 in the notes, 250 in some
        versions of the code), ``>= 0``.
      tol: the stopping threshold on the L1 change of :math:`\lambda`, ``>= 0``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Example (two clients, one local step a round, ``alpha = 1`` so the momenta are the
    last pseudo-gradients; both clients take part, so the min-norm step starts at once):
      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> tx = optlab.fedaware(optax.sgd(1.0), optax.sgd(1.0), 1, "c", alpha=1.0)
      >>> def step(params, state, grads):
      ...     updates, state = tx.update(grads, state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> step = jax.vmap(step, axis_name="c")
      >>> params = jnp.zeros((2, 2))
      >>> state = jax.vmap(tx.init)(params)
      >>> params, state = step(params, state, jnp.array([[1.0, 0.0], [-1.0, 0.0]]))
      >>> params  # opposite unit momenta: e = 0, the server holds still
      Array([[0., 0.],
             [0., 0.]], dtype=float32)
      >>> params, state = step(params, state, jnp.array([[1.0, 0.0], [0.0, 2.0]]))
      >>> print(params[0].round(4))  # e = (0.5, 0.5): halfway between the unit momenta
      [-0.5 -0.5]

    Reference:
      Zeng, Xu, Pan, Wang, Tang. *Tackling Hybrid Heterogeneity on Federated Optimization
      via Gradient Diversity Maximization.* arXiv:2310.02702, 2023.
    """
    check_float_in_range("alpha", alpha, low=0.0, high=1.0)
    if not isinstance(projection, bool):
        raise ValueError(f"projection must be a bool, got {projection!r}.")
    max_iters = check_injectable_int("max_iters", max_iters, min_value=0, max_value=2**31 - 1)
    check_float_in_range("tol", tol, low=0.0)
    core = FederatedCore(
        "fedaware", client, server, local_steps, axis_name, client_weights, reset_client_state
    )
    names = axis_names(core.axis_name)

    def init_extra(params: PyTree) -> dict:
        return {
            "momentum": jax.tree.map(jnp.zeros_like, params),
            "seen": jnp.zeros([], bool),
        }

    def aggregate(delta, part, weight, state):
        clients = int(np.prod([jax.lax.axis_size(a) for a in names]))
        momentum = jax.tree.map(
            lambda m, d: jnp.where(part > 0, (1 - alpha) * m + alpha * d, m).astype(m.dtype),
            state.momentum,
            delta,
        )
        seen = state.seen | (part > 0)
        all_seen = jax.lax.psum(seen.astype(jnp.int32), core.axis_name) == clients

        def warm_up(_):
            mean, valid = masked_mean(delta, part * weight, core.axis_name)
            return mean, valid

        def min_norm(_):
            flat, unravel = ravel_pytree(momentum)
            dtype = jnp.promote_types(flat.dtype, jnp.float32)
            flat = flat.astype(dtype)
            norm = jnp.linalg.norm(flat)
            unit = flat / jnp.where(norm == 0, 1.0, norm).astype(dtype)
            gathered = _all_gather(unit, names)  # [N, D]
            lam = min_norm_weights(gathered @ gathered.T, max_iters=max_iters, tol=tol)
            direction = lam.astype(dtype) @ gathered
            if projection:
                mean, _ = masked_mean(flat, weight.astype(dtype), core.axis_name)
                scale = jnp.dot(mean, direction) / _safe(jnp.dot(direction, direction))
                direction = scale * direction
            tree = jax.tree.map(lambda d, p: d.astype(p.dtype), unravel(direction), delta)
            return vary(tree, core.axis_name), vary(jnp.ones([], bool), core.axis_name)

        direction, valid = jax.lax.cond(all_seen, min_norm, warm_up, None)
        return direction, valid, {"momentum": momentum, "seen": seen}

    return core.transform(FedAWAREState, init_extra, aggregate)


def min_norm_weights(gram: jax.Array, *, max_iters: int = 1000, tol: float = 1e-5) -> jax.Array:
    r"""The min-norm convex combination of N vectors from their Gram matrix, by Frank-Wolfe.

    Approximates :math:`\lambda^\star = \arg\min_{\lambda \in \Delta_N} \lambda^\top G
    \lambda` as the official FedAWARE / MGDA code (``MinNormSolver.find_min_norm_element_FW``):

    1. start at the best pair: for every :math:`i < j` the closed-form minimiser of
       :math:`\|c\,v_i + (1-c)\,v_j\|^2` (clamped to :math:`c \in \{0.999, 0.001\}` when
       one end is optimal), keep the first pair of least cost; :math:`N \le 2` stops here;
    2. repeat at most ``max_iters`` times: :math:`t = \arg\min_k (G\lambda)_k`, exact line
       search between :math:`\lambda` and the vertex :math:`e_t` (the same two-vector
       formula), stop (keeping the previous :math:`\lambda`) when the L1 change is below
       ``tol``.

    Jit-compatible (a ``lax.while_loop``); ``N = 1`` gives ``[1]``.

    Args:
      gram: ``[N, N]`` symmetric positive semi-definite Gram matrix.
      max_iters: the iteration cap (an int, or a traced integer scalar).
      tol: the stopping threshold on :math:`\|\lambda_{k+1} - \lambda_k\|_1`.

    Returns:
      ``[N]`` non-negative weights summing to one.

    Example (two orthogonal vectors of norms 1 and 2):
      >>> import jax.numpy as jnp, optlab
      >>> print(optlab.min_norm_weights(jnp.array([[1.0, 0.0], [0.0, 4.0]])).round(4))
      [0.8 0.2]
    """
    gram = jnp.asarray(gram)
    n = gram.shape[0]
    if gram.shape != (n, n) or n < 1:
        raise ValueError(f"gram must be a square [N, N] matrix, got shape {gram.shape}.")
    if n == 1:
        return jnp.ones([1], gram.dtype)
    diag = jnp.diagonal(gram)
    gamma, cost = _two_point(diag[:, None], gram, diag[None, :])
    upper = jnp.triu(jnp.ones((n, n), bool), k=1)
    first = jnp.argmin(jnp.where(upper, cost, jnp.inf))  # row-major: the first of the least
    i, j = first // n, first % n
    lam = jnp.zeros([n], gram.dtype).at[i].set(gamma[i, j]).at[j].set(1 - gamma[i, j])
    if n == 2:
        return lam

    def body(carry):
        k, lam, _ = carry
        g_lam = gram @ lam
        t = jnp.argmin(g_lam)
        c, _ = _two_point(lam @ g_lam, g_lam[t], gram[t, t])
        new = (c * lam).at[t].add(1 - c)
        done = jnp.sum(jnp.abs(new - lam)) < tol
        return k + 1, jnp.where(done, lam, new), done

    _, lam, _ = jax.lax.while_loop(
        lambda carry: (carry[0] < max_iters) & ~carry[2],
        body,
        # ``done`` starts with lam's type (varying under shard_map, like the body's).
        (jnp.zeros([], jnp.int32), lam, jnp.sum(lam) < -1),
    )
    return lam


def _two_point(v1v1: Any, v1v2: Any, v2v2: Any) -> tuple[jax.Array, jax.Array]:
    """``argmin_c ||c v1 + (1 - c) v2||^2`` and its cost, with the official clamps."""
    denom = v1v1 + v2v2 - 2 * v1v2
    gamma = -(v1v2 - v2v2) / _safe(denom)
    cost = v2v2 + gamma * (v1v2 - v2v2)
    gamma = jnp.where(v1v2 >= v1v1, 0.999, jnp.where(v1v2 >= v2v2, 0.001, gamma))
    cost = jnp.where(v1v2 >= v1v1, v1v1, jnp.where(v1v2 >= v2v2, v2v2, cost))
    return gamma, cost


def _safe(x: jax.Array) -> jax.Array:
    return jnp.where(x == 0, 1.0, x).astype(x.dtype)


def _all_gather(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
    """All-gather over a (possibly composite) axis, flattened in ``axis_index`` order."""
    for name in reversed(names):
        x = jax.lax.all_gather(x, name)
    return x.reshape(-1, *x.shape[len(names) :])

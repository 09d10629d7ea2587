"""Decentralized SGD (D-SGD / D-PSGD) with gossip over a named worker axis.

Every worker holds its own params and optimizer state and averages its params with its
neighbours' through a doubly stochastic mixing matrix :math:`W` instead of an all-reduce of
the gradients. The gossip is built from ``jax.lax.ppermute`` (one permutation per neighbour
offset, a bijection for every topology here) and a weighted sum, so the same transform runs
simulated under ``jax.vmap(..., axis_name=...)``, on devices under ``jax.shard_map`` and on
many hosts. Each step mixes the copies the neighbours held *before* this step's update.

Topologies and weights follow the reference code of Zhu et al. (2023) (``utils.generate_P``),
see :func:`mixing_matrix`. The number of workers is the size of ``axis_name``, read at trace
time with ``jax.lax.axis_size``; pass ``num_workers`` to validate the topology when the
transform is built (and to check the axis size at trace time).

References:
  X. Lian, C. Zhang, H. Zhang, C.-J. Hsieh, W. Zhang, J. Liu. *Can Decentralized Algorithms
  Outperform Centralized Algorithms? A Case Study for Decentralized Parallel Stochastic
  Gradient Descent.* NeurIPS 2017. arXiv:1705.09056.

  A. Koloskova, N. Loizou, S. Boreiri, M. Jaggi, S. U. Stich. *A Unified Theory of
  Decentralized SGD with Changing Topology and Local Updates.* ICML 2020. arXiv:2003.10422.

  B. Ying, K. Yuan, Y. Chen, H. Hu, P. Pan, W. Yin. *Exponential Graph is Provably Efficient
  for Decentralized Deep Training.* NeurIPS 2021. arXiv:2110.13363.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optlab.parallel import pvary
from optlab.validation import check_int_in_range

__all__ = [
    "ORDERS",
    "TOPOLOGIES",
    "DSGDState",
    "consensus_distance",
    "dsgd",
    "mixing_matrix",
]

PyTree = Any
Order = Literal["dpsgd", "atc"]
ORDERS: tuple[str, ...] = ("dpsgd", "atc")
TOPOLOGIES: tuple[str, ...] = ("ring", "torus", "exponential", "one_peer_exponential", "complete")

# One gossip round: ((weight, source), ...) where worker i receives weight * x[source[i]];
# ``source`` is a permutation of range(n) (identity for the worker's own term).
_Round = tuple[tuple[float, tuple[int, ...]], ...]


class DSGDState(NamedTuple):
    """State of :func:`dsgd` (one per worker).

    Attributes:
      inner_state: the worker's own inner optimizer state (momentum stays local).
      count: updates taken so far (int32, saturating): the one-peer exponential graph
        talks to the peer at distance ``2 ** (count % ceil(log2 n))``.
    """

    inner_state: optax.OptState
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _check_topology(topology: Any) -> str:
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}.")
    return str(topology)


def _torus_shape(n: int, torus_shape: tuple[int, int] | None) -> tuple[int, int]:
    if torus_shape is None:
        rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
        shape = (rows, n // rows)
        how = f"its most-square factorisation is {shape[0]} x {shape[1]}"
    else:
        shape = torus_shape
        how = f"torus_shape={torus_shape}"
    if shape[0] * shape[1] != n or min(shape) < 3:
        raise ValueError(
            f"topology 'torus' needs num_workers = rows x cols with rows, cols >= 3 (a 2-D "
            f"torus of distinct 4 neighbours), got num_workers={n} ({how}); use 9, 12, 15, "
            "16, ... workers or pass torus_shape=(rows, cols)."
        )
    return shape


@functools.lru_cache(maxsize=128)
def _rounds(topology: str, n: int, torus_shape: tuple[int, int] | None) -> tuple[_Round, ...]:
    """The gossip rounds of ``topology`` on ``n`` workers (several only for one-peer)."""
    ident = tuple(range(n))

    def shift(s: int) -> tuple[int, ...]:
        return tuple((i + s) % n for i in range(n))

    if n == 1:
        if topology == "torus" and torus_shape not in (None, (1, 1)):
            _torus_shape(n, torus_shape)
        return (((1.0, ident),),)
    if topology == "ring":
        if n == 2:
            raise ValueError(
                "topology 'ring' needs num_workers == 1 or >= 3 (two distinct neighbours), "
                "got num_workers=2; use 'complete' or 'one_peer_exponential'."
            )
        return (((1 / 3, ident), (1 / 3, shift(1)), (1 / 3, shift(-1))),)
    if topology == "torus":
        rows, cols = _torus_shape(n, torus_shape)

        def move(dr: int, dc: int) -> tuple[int, ...]:
            return tuple(
                ((i // cols + dr) % rows) * cols + (i % cols + dc) % cols for i in range(n)
            )

        moves = ((1, 0), (-1, 0), (0, 1), (0, -1))
        return (((0.2, ident), *((0.2, move(dr, dc)) for dr, dc in moves)),)
    if topology == "exponential":
        offsets = [2**k for k in range(n.bit_length()) if 2**k < n]
        w = 1 / (1 + len(offsets))
        return (((w, ident), *((w, shift(s)) for s in offsets)),)
    if topology == "one_peer_exponential":
        period = math.ceil(math.log2(n))
        return tuple(((0.5, ident), (0.5, shift(2 ** (k % period)))) for k in range(period))
    # complete: W = 11^T / n (computed with pmean, an all-reduce).
    return (tuple((1 / n, shift(s)) for s in range(n)),)


def mixing_matrix(
    topology: str,
    num_workers: int,
    *,
    step: int = 0,
    torus_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    r"""The mixing matrix :math:`W` that :func:`dsgd` applies at ``step`` (float64 NumPy).

    Row :math:`i` holds the weights worker :math:`i` gives to each worker's params
    (:math:`x_i \leftarrow \sum_j W_{ij} x_j`). As in the reference code of Zhu et al.:

    - ``"ring"``: :math:`W_{ii} = W_{i,i\pm1} = 1/3` (``num_workers`` 1 or >= 3).
    - ``"torus"``: a ``rows x cols`` 2-D torus (worker ``i`` at row ``i // cols``, column
      ``i % cols``), weight 1/5 on itself and its 4 wrap-around neighbours; rows, cols >= 3;
      the default shape is the most-square factorisation of ``num_workers``.
    - ``"exponential"`` (static): weight :math:`1/(1 + m)` on columns :math:`(i + s) \bmod n`
      for :math:`s \in \{0\} \cup \{2^k < n\}` (:math:`m` such offsets besides 0); circulant,
      doubly stochastic, not symmetric.
    - ``"one_peer_exponential"`` (time-varying, Ying et al.): at step :math:`t`,
      :math:`W_{ii} = W_{i,(i + 2^{t \bmod \lceil\log_2 n\rceil}) \bmod n} = 1/2`; for
      :math:`n` a power of two, :math:`\log_2 n` consecutive steps average exactly.
    - ``"complete"``: :math:`W = \mathbf{1}\mathbf{1}^\top / n` (all-reduce, C-SGD).

    With one worker every topology is :math:`W = [1]`.
    """
    topology = _check_topology(topology)
    n = check_int_in_range("num_workers", num_workers, min_value=1)
    rounds = _rounds(topology, n, _check_torus_arg(torus_shape))
    w = np.zeros((n, n))
    for weight, source in rounds[step % len(rounds)]:
        w[np.arange(n), source] += weight
    return w


def _check_torus_arg(torus_shape: Any) -> tuple[int, int] | None:
    if torus_shape is None:
        return None
    if not (isinstance(torus_shape, tuple | list) and len(torus_shape) == 2):
        raise ValueError(f"torus_shape must be a (rows, cols) pair, got {torus_shape!r}.")
    rows = check_int_in_range("torus_shape[0] (rows)", torus_shape[0], min_value=1)
    cols = check_int_in_range("torus_shape[1] (cols)", torus_shape[1], min_value=1)
    return (rows, cols)


def _gossip(tree: PyTree, rounds: tuple[_Round, ...], count: jax.Array, axis_name: str) -> PyTree:
    """``sum_j W_ij x_j`` of the round selected by ``count``, by ppermute shifts."""
    n = len(rounds[0][0][1])
    if n == 1:
        return tree
    tree = pvary(tree, axis_name)

    def mix(leaf: jax.Array, rnd: _Round) -> jax.Array:
        if len(rnd) == n and all(w == 1 / n for w, _ in rnd):  # exact averaging: all-reduce
            return jax.lax.pmean(leaf, axis_name)
        # Low-precision params (bf16) are summed in float32 and rounded once.
        acc = jnp.promote_types(leaf.dtype, jnp.float32)
        out: jax.Array | None = None
        for weight, source in rnd:
            if source == tuple(range(n)):
                term = leaf
            else:
                perm = [(source[i], i) for i in range(n)]
                term = jax.lax.ppermute(leaf, axis_name, perm)
            term = weight * term.astype(acc)
            out = term if out is None else out + term
        assert out is not None
        return out.astype(leaf.dtype)

    if len(rounds) == 1:
        return jax.tree.map(lambda x: mix(x, rounds[0]), tree)
    # Time-varying: one branch (one message per worker) per round. Under shard_map only the
    # taken branch communicates; under vmap the per-worker count is batched, so the
    # simulation evaluates every branch and selects (same result, more work).
    branches = [
        functools.partial(lambda r, t: jax.tree.map(lambda x: mix(x, r), t), r) for r in rounds
    ]
    return jax.lax.switch(count % len(rounds), branches, tree)


def dsgd(
    inner: optax.GradientTransformation,
    topology: str,
    axis_name: str,
    *,
    order: Order = "dpsgd",
    num_workers: int | None = None,
    torus_shape: tuple[int, int] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Decentralized SGD: a local step of ``inner`` and gossip with the neighbours.

    With worker :math:`i`'s params :math:`x_i^t`, its gradient :math:`g_i^t` and its local
    update :math:`u_i^t = \mathrm{inner}(g_i^t)` (e.g. :math:`-\eta g_i^t`):

    .. math::

      \texttt{"dpsgd"}:\; x_i^{t+1} = \sum_j W_{ij} x_j^t + u_i^t \qquad
      \texttt{"atc"}:\; x_i^{t+1} = \sum_j W_{ij} (x_j^t + u_j^t)

    ``"dpsgd"`` (Lian et al.; the order of Zhu et al.'s code) mixes the pre-update params and
    adds the local update, so the gossip can overlap the gradient computation;
    ``"atc"`` (adapt-then-combine, Koloskova et al.) mixes the updated params. The transform
    emits ``x_i^{t+1} - x_i^t``, so it must be the **outermost** transform (put clipping,
    weight decay and the learning rate inside ``inner`` or before it in a chain), and
    ``update`` must run inside a context binding ``axis_name`` (a named ``vmap`` or a
    ``shard_map`` mesh axis) over which every worker holds its own params and state. The
    inner state (momentum) stays local; gradients are not averaged. :math:`W` is
    :func:`mixing_matrix` (``"complete"`` is exact averaging, i.e. C-SGD of the params).
    Evaluate the average model (``jax.lax.pmean(params, axis_name)``) and watch
    :func:`consensus_distance`.

    Args:
      inner: the local optimizer (extra args such as ``grad_fn`` are forwarded to it).
      topology: one of ``"ring"``, ``"torus"``, ``"exponential"``,
        ``"one_peer_exponential"`` (time-varying), ``"complete"``; see :func:`mixing_matrix`.
      axis_name: the named worker axis (a string).
      order: ``"dpsgd"`` (gossip the pre-update params, add the local update) or ``"atc"``
        (local update, then gossip the updated params).
      num_workers: the size of ``axis_name``, if known: the topology is then validated here
        (else at trace time, where a mismatch with the axis size also raises).
      torus_shape: ``(rows, cols)`` of the ``"torus"`` (default: the most-square
        factorisation of the worker count); rows, cols >= 3.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Example (4 workers on a ring, SGD with learning rate 1, every gradient 1):
      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> tx = optlab.dsgd(optax.sgd(1.0), "ring", "workers")
      >>> def step(params, grads):
      ...     updates, _ = tx.update(grads, tx.init(params), params)
      ...     return optax.apply_updates(params, updates)
      >>> params = jnp.array([[0.0], [3.0], [6.0], [9.0]])  # one row per worker
      >>> jax.vmap(step, axis_name="workers")(params, jnp.ones_like(params))
      Array([[3.],
             [2.],
             [5.],
             [4.]], dtype=float32)

    References:
      Lian et al. *Can Decentralized Algorithms Outperform Centralized Algorithms?* NeurIPS
      2017, arXiv:1705.09056. Koloskova et al. *A Unified Theory of Decentralized SGD with
      Changing Topology and Local Updates.* ICML 2020, arXiv:2003.10422. Ying et al.
      *Exponential Graph is Provably Efficient for Decentralized Deep Training.* NeurIPS
      2021, arXiv:2110.13363.
    """
    topology = _check_topology(topology)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
    if not isinstance(axis_name, str):
        raise ValueError(f"axis_name must be a string, got {axis_name!r}.")
    shape = _check_torus_arg(torus_shape)
    if shape is not None and topology != "torus":
        raise ValueError(f"torus_shape applies to topology 'torus' only, got {topology!r}.")
    if num_workers is not None:
        num_workers = check_int_in_range("num_workers", num_workers, min_value=1)
        _rounds(topology, num_workers, shape)  # raises if the topology cannot be formed
    inner = optax.with_extra_args_support(inner)

    def resolve_rounds() -> tuple[_Round, ...]:
        try:
            size = jax.lax.axis_size(axis_name)
        except NameError as error:
            raise ValueError(
                f"dsgd.update must run where the worker axis {axis_name!r} is bound: inside "
                f"jax.vmap(..., axis_name={axis_name!r}) or a jax.shard_map over a mesh axis "
                f"named {axis_name!r}."
            ) from error
        if num_workers is not None and size != num_workers:
            raise ValueError(
                f"dsgd was built with num_workers={num_workers}, but axis {axis_name!r} "
                f"has size {size}."
            )
        return _rounds(topology, int(size), shape)

    def init_fn(params: PyTree) -> DSGDState:
        return DSGDState(inner_state=inner.init(params), count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: PyTree, state: DSGDState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, DSGDState]:
        if params is None:
            raise ValueError("dsgd needs params: call update(grads, state, params).")
        rounds = resolve_rounds()
        local, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        if order == "dpsgd":
            mixed = _gossip(params, rounds, state.count, axis_name)
            out = jax.tree.map(lambda m, p, u: ((m - p) + u).astype(u.dtype), mixed, params, local)
        else:
            stepped = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, local)
            mixed = _gossip(stepped, rounds, state.count, axis_name)
            out = jax.tree.map(lambda m, p, u: (m - p).astype(u.dtype), mixed, params, local)
        return out, DSGDState(inner_state=inner_state, count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def consensus_distance(params: PyTree, axis_name: str) -> jax.Array:
    r"""Root-mean-square distance of the workers' params from their average.

    .. math::

      \Xi = \sqrt{\frac{1}{n} \sum_{i=1}^{n} \lVert x_i - \bar{x} \rVert^2}, \qquad
      \bar{x} = \frac{1}{n} \sum_i x_i,

    with :math:`\lVert\cdot\rVert` the Euclidean norm over all leaves of the params tree
    (the square root of the quantity logged in ALGORITHMS.md 12.4; Kong et al. 2021,
    *Consensus Control for Decentralized Deep Learning*, arXiv:2102.04828, use its square).
    Computed with ``pmean`` in at least float32; every worker gets the same value. Call it
    inside the context that binds ``axis_name``.

    Example:
      >>> import jax, jax.numpy as jnp, optlab
      >>> params = {"w": jnp.array([[0.0, 0.0], [2.0, 0.0]])}  # two workers
      >>> jax.vmap(lambda p: optlab.consensus_distance(p, "workers"),
      ...          axis_name="workers")(params)
      Array([1., 1.], dtype=float32)
    """
    params = pvary(params, axis_name)
    mean = jax.lax.pmean(params, axis_name)

    def sq(x: jax.Array, m: jax.Array) -> jax.Array:
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        return jnp.sum((x.astype(dtype) - m.astype(dtype)) ** 2)

    total = sum(jax.tree.leaves(jax.tree.map(sq, params, mean)), jnp.zeros([], jnp.float32))
    return jnp.sqrt(jax.lax.pmean(total, axis_name))

"""FedAvg and FedOpt: client rounds of local steps, a server step on the mean pseudo-gradient.

Every worker of a named axis is a *client*. A round is ``local_steps`` updates: the clients
taking part (the extra argument ``active``) run ``client`` from the server model, the others
do nothing and hold it; at the end of the round the server averages the participants'
pseudo-gradients ``anchor - x_i`` (optionally weighted by client data size) and applies
``server`` to that mean, and every client jumps to the new server model. ``server =
optax.sgd(1.0)`` is FedAvg; momentum, Adam, Yogi... are FedAvgM / FedOpt.

This module also holds the round skeleton that :mod:`optlab.fedaware` (another server
aggregate) and :mod:`optlab.fedga` (a displacement at the start of a round) build on.

References:
  B. McMahan, E. Moore, D. Ramage, S. Hampson, B. Agüera y Arcas. *Communication-Efficient
  Learning of Deep Networks from Decentralized Data.* AISTATS 2017. arXiv:1602.05629.

  S. J. Reddi, Z. Charles, M. Zaheer, Z. Garrett, K. Rush, J. Konečný, S. Kumar,
  H. B. McMahan. *Adaptive Federated Optimization.* ICLR 2021. arXiv:2003.00295.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optlab._control import run_if
from optlab.local_sgd import AxisName, check_axis_name
from optlab.parallel import is_manual_axis
from optlab.validation import check_injectable_int

__all__ = ["FedAvgState", "fedavg", "federated_server_params"]

PyTree = Any

_MAX_COUNT = 2**31 - 1  # the step counter is int32


class FedAvgState(NamedTuple):
    """State of :func:`fedavg`.

    Attributes:
      count: updates taken so far (int32, saturating); identical on every client, it
        decides the round boundaries.
      participating: bool, whether this client takes part in the current round (read from
        ``active`` at the round's first update).
      client_state: the client optimizer's state, client-local (re-initialised after every
        round unless ``reset_client_state=False``).
      server_state: the server optimizer's state, replicated.
      anchor: the server model (a copy in the state), replicated.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    participating: jax.Array
    client_state: optax.OptState
    server_state: optax.OptState
    anchor: PyTree


def fedavg(
    client: optax.GradientTransformation,
    server: optax.GradientTransformation,
    local_steps: int,
    axis_name: AxisName,
    *,
    client_weights: Sequence[float] | np.ndarray | jax.Array | None = None,
    reset_client_state: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""FedAvg / FedOpt: ``local_steps`` client steps, then a server step on the mean.

    Round :math:`r` covers updates :math:`rH, \dots, rH + H - 1` (:math:`H` =
    ``local_steps``). With :math:`S_r` the clients taking part (``active`` at the round's
    first update), :math:`w_i` the client weights (1, or the data sizes) and :math:`x` the
    server model (the ``anchor`` in the state):

    .. math::

      x_i \leftarrow x_i + \mathrm{client}(g_i) \;\; (i \in S_r), \qquad
      \Delta = \frac{\sum_{i \in S_r} w_i (x - x_i)}{\sum_{i \in S_r} w_i}, \qquad
      x \leftarrow x + \mathrm{server}(\Delta), \quad x_i \leftarrow x \;\; (\text{all } i).

    ``server = optax.sgd(1.0)`` sets the server model to the (weighted) mean of the
    participants' models: FedAvg (McMahan et al.). Any other optax transform on
    :math:`\Delta` is FedOpt (Reddi et al.): ``optax.sgd(lr, momentum=0.9)`` is FedAvgM,
    ``optax.adam(lr)`` FedAdam, ``optax.yogi(lr)`` FedYogi. A client outside :math:`S_r`
    emits zero updates (its params stay on the server model, its client state is left
    alone); a round without participants leaves the server model and state unchanged.

    The sync is a ``lax.cond`` on the replicated step count: an off-sync update runs no
    collective; the sync runs one all-reduce of the weighted pseudo-gradients. (Inside
    the taken branch a loop that runs once keeps the sync free on off-sync steps under
    ``vmap`` too, where a batched predicate turns ``lax.cond`` into a select.) The server
    state and the anchor are replicated (every client computes the same server step).

    **Calling convention.** ``update(grads, state, params, *, active=None, **extra)`` where
    ``axis_name`` is bound (``jax.vmap(..., axis_name=...)``, ``jax.shard_map``, or both as
    a tuple). ``grads`` is the client's own gradient. ``active`` is this client's
    participation (a bool or 0/1 scalar) or the mask of all clients (shape ``[W]``, indexed
    by ``lax.axis_index``), as :class:`experiments.train.plans.ClientSamplingPlan` hands it;
    ``None`` means every client takes part. It is read at the first update of each round.
    The other extra args are forwarded to ``client``. The params must start identical on
    every client, and this must be the **outermost** transform of a chain.
    ``optax.MultiSteps(fedavg(...), k)`` accumulates k micro-batches per client step.

    Args:
      client: the client optimizer (e.g. ``optax.sgd(0.01)``).
      server: the server optimizer applied to the mean pseudo-gradient (it sees the
        anchor as its params); ``optax.sgd(1.0)`` is plain FedAvg.
      local_steps: client updates per round, ``H >= 1``.
      axis_name: the client axis, a string or a non-empty tuple of strings.
      client_weights: optional non-negative weights, one per client in axis order (e.g.
        the clients' data sizes); ``None`` weighs the participants equally.
      reset_client_state: re-initialise the client optimizer's state after every round
        (clients start each round afresh, as in FL code); ``False`` keeps it client-local
        across rounds.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Example (three clients simulated with ``vmap``; client 1 sits the round out):
      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> tx = optlab.fedavg(optax.sgd(0.5), optax.sgd(1.0), local_steps=2, axis_name="c")
      >>> active = jnp.array([True, False, True])
      >>> def step(params, state, grads):
      ...     updates, state = tx.update(grads, state, params, active=active)
      ...     return optax.apply_updates(params, updates), state
      >>> step = jax.vmap(step, axis_name="c")
      >>> params = jnp.zeros((3, 1))
      >>> state = jax.vmap(tx.init)(params)
      >>> grads = jnp.array([[1.0], [5.0], [3.0]])
      >>> params, state = step(params, state, grads)  # local step: client 1 holds still
      >>> params[:, 0]
      Array([-0.5,  0. , -1.5], dtype=float32)
      >>> params, state = step(params, state, grads)  # local step, then the server step
      >>> params[:, 0]  # the mean of clients 0 and 2: (-1 - 3) / 2
      Array([-2., -2., -2.], dtype=float32)

    References:
      McMahan, Moore, Ramage, Hampson, Agüera y Arcas. *Communication-Efficient Learning
      of Deep Networks from Decentralized Data.* AISTATS 2017. arXiv:1602.05629.

      Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. *Adaptive Federated
      Optimization.* ICLR 2021. arXiv:2003.00295.
    """
    core = FederatedCore(
        "fedavg", client, server, local_steps, axis_name, client_weights, reset_client_state
    )

    def aggregate(delta, part, weight, state):
        mean, valid = masked_mean(delta, part * weight, core.axis_name)
        return mean, valid, {}

    return core.transform(FedAvgState, {}, aggregate)


def federated_server_params(opt_state: PyTree) -> PyTree:
    """The server model (anchor) of the one federated state in ``opt_state``.

    Works for :class:`FedAvgState`, :class:`optlab.FedAWAREState` and
    :class:`optlab.FedGAState`. Right after a round it equals every client's params; within
    a round it is the model the round started from (the one to evaluate or checkpoint).

    Raises:
      ValueError: ``opt_state`` holds no federated state, or several side by side.
    """
    is_fed = lambda n: hasattr(n, "anchor") and hasattr(n, "participating")
    found = [n for n in jax.tree.leaves(opt_state, is_leaf=is_fed) if is_fed(n)]
    if len(found) != 1:
        raise ValueError(
            f"federated_server_params: opt_state holds {len(found)} federated states, expected one."
        )
    return found[0].anchor


# ----------------------------------------------------------------------------------------
# The round skeleton shared by fedavg, fedaware and fedga.

# aggregate(delta, part, weight, state) -> (direction, valid, state field updates); runs
# inside the sync branch, where the axis is bound. ``part`` and ``weight`` are this
# client's participation (0/1) and weight as float32 scalars.
Aggregate = Callable[[PyTree, jax.Array, jax.Array, Any], tuple[PyTree, jax.Array, dict]]
# round_start(grads, params, part, extra_args, state) -> (shift, grads): a displacement of
# the client's start point and the gradient to step with; runs (under run_if) at the
# first update of every round.
RoundStart = Callable[[PyTree, PyTree, jax.Array, dict, Any], tuple[PyTree, PyTree]]


class FederatedCore:
    """Validated arguments and the ``init``/``update`` skeleton of a federated transform."""

    def __init__(
        self,
        name: str,
        client: optax.GradientTransformation,
        server: optax.GradientTransformation,
        local_steps: int,
        axis_name: AxisName,
        client_weights: Any,
        reset_client_state: bool,
    ):
        self.name = name
        self.local_steps = check_injectable_int(
            "local_steps", local_steps, min_value=1, max_value=_MAX_COUNT
        )
        self.axis_name = check_axis_name(axis_name)
        if not isinstance(reset_client_state, bool):
            raise ValueError(f"reset_client_state must be a bool, got {reset_client_state!r}.")
        self.reset_client_state = reset_client_state
        self.client_weights = check_client_weights(client_weights)
        if not isinstance(client, optax.GradientTransformation) or not isinstance(
            server, optax.GradientTransformation
        ):
            raise ValueError(
                f"{name}: client and server must be optax transforms, got "
                f"{type(client).__name__} and {type(server).__name__}."
            )
        self.client = optax.with_extra_args_support(client)
        self.server = server

    def weight(self) -> jax.Array:
        """This client's weight (1 without ``client_weights``), float32."""
        if self.client_weights is None:
            return jnp.ones((), jnp.float32)
        weights = jnp.asarray(self.client_weights, jnp.float32)
        check_per_client_length("client_weights", weights, self.axis_name)
        return weights[client_index(self.axis_name)]

    def transform(
        self,
        state_cls: Any,
        init_extra: Callable[[PyTree], dict] | dict,
        aggregate: Aggregate,
        round_start: RoundStart | None = None,
    ) -> optax.GradientTransformationExtraArgs:
        client, server, axis_name, period = (
            self.client,
            self.server,
            self.axis_name,
            self.local_steps,
        )

        def init_fn(params: PyTree) -> Any:
            # A copy, not an alias: with the params donated to a jitted step, an alias
            # would hand the anchor's buffer to the new params.
            anchor = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
            extra = init_extra(params) if callable(init_extra) else dict(init_extra)
            return state_cls(
                count=jnp.zeros([], jnp.int32),
                participating=jnp.ones([], bool),
                client_state=client.init(params),
                server_state=server.init(anchor),
                anchor=anchor,
                **extra,
            )

        def update_fn(
            updates: PyTree,
            state: Any,
            params: PyTree | None = None,
            *,
            active: Any = None,
            **extra_args: Any,
        ) -> tuple[PyTree, Any]:
            if params is None:
                raise ValueError(
                    f"optlab.{self.name} needs params: call update(grads, state, params) "
                    "(the server step replaces the params)."
                )
            first = state.count % period == 0
            participating = jnp.where(first, participation(active, axis_name), state.participating)
            part = participating.astype(jnp.float32)
            point = params
            if round_start is not None:
                zeros = jax.tree.map(jnp.zeros_like, params)
                shift, updates = run_if(
                    first,
                    lambda operands: round_start(operands[1], params, part, extra_args, state),
                    (zeros, updates),
                )
                point = jax.tree.map(lambda p, s: p + s.astype(p.dtype), params, shift)
            local, client_state = client.update(updates, state.client_state, point, **extra_args)
            if round_start is not None:
                local = jax.tree.map(lambda u, s: (u + s).astype(u.dtype), local, shift)
            # A client outside the round does nothing: no move, no state change.
            local = jax.tree.map(lambda u: jnp.where(participating, u, jnp.zeros_like(u)), local)
            client_state = jax.tree.map(
                lambda new, old: jnp.where(participating, new, old),
                client_state,
                state.client_state,
            )
            sync = (state.count + 1) % period == 0
            weight = self.weight()

            def sync_branch(operands):
                local, client_state, server_state, anchor, fields = operands
                delta = jax.tree.map(
                    lambda a, p, u: a - (p + u.astype(p.dtype)), anchor, params, local
                )
                direction, valid, new_fields = aggregate(
                    delta, part, weight, state._replace(**fields)
                )
                server_updates, new_server_state = server.update(direction, server_state, anchor)
                new_anchor = jax.tree.map(
                    lambda a, u: (a + u.astype(a.dtype)).astype(a.dtype), anchor, server_updates
                )
                keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(valid, n, o), new, old)
                server_state = keep(new_server_state, server_state)
                anchor = keep(new_anchor, anchor)
                jump = jax.tree.map(lambda a, p, u: (a - p).astype(u.dtype), anchor, params, local)
                if self.reset_client_state:
                    client_state = client.init(anchor)
                return jump, client_state, server_state, anchor, {**fields, **new_fields}

            fields = {k: getattr(state, k) for k in state_cls._fields[5:]}
            out, client_state, server_state, anchor, fields = run_if(
                sync,
                sync_branch,
                (local, client_state, state.server_state, state.anchor, fields),
            )
            return out, state_cls(
                count=optax.safe_increment(state.count),
                participating=participating,
                client_state=client_state,
                server_state=server_state,
                anchor=anchor,
                **fields,
            )

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_client_weights(client_weights: Any) -> Any:
    """Checks concrete weights (1-D, finite, >= 0, positive sum); tracers pass unchecked."""
    if client_weights is None or isinstance(client_weights, jax.core.Tracer):
        return client_weights
    try:
        weights = np.asarray(client_weights, np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"client_weights must be a 1-D sequence of numbers, got {client_weights!r}."
        ) from error
    if (
        weights.ndim != 1
        or weights.size == 0
        or not np.all(np.isfinite(weights))
        or np.any(weights < 0)
        or weights.sum() <= 0
    ):
        raise ValueError(
            "client_weights must be a non-empty 1-D array of finite weights >= 0 with a "
            f"positive sum (one per client), got {client_weights!r}."
        )
    return client_weights


def axis_names(axis_name: AxisName) -> tuple[str, ...]:
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def num_clients(axis_name: AxisName) -> int:
    """The size of the (possibly composite) client axis, a Python int."""
    return int(np.prod([jax.lax.axis_size(a) for a in axis_names(axis_name)]))


def client_index(axis_name: AxisName) -> jax.Array:
    """This client's index along the (flattened) client axis."""
    return jax.lax.axis_index(axis_name)


def check_per_client_length(name: str, value: jax.Array, axis_name: AxisName) -> None:
    clients = num_clients(axis_name)
    if value.shape != (clients,):
        raise ValueError(
            f"{name} must hold one entry per client, shape ({clients},), got {value.shape}."
        )


def participation(active: Any, axis_name: AxisName) -> jax.Array:
    """This client's participation as a bool scalar from ``active`` (see :func:`fedavg`)."""
    if active is None:
        return jnp.ones([], bool)
    active = jnp.asarray(active)
    if active.ndim == 1:
        check_per_client_length("active", active, axis_name)
        active = active[client_index(axis_name)]
    elif active.ndim != 0:
        raise ValueError(
            f"active must be a scalar (this client's) or a [clients] mask, got {active.shape}."
        )
    return active.astype(bool) if active.dtype == bool else active != 0


def masked_mean(tree: PyTree, weight: jax.Array, axis_name: AxisName) -> tuple[PyTree, jax.Array]:
    """``sum_i w_i t_i / sum_i w_i`` over the client axis and whether ``sum_i w_i > 0``.

    One all-reduce; the mean is re-marked as varying under ``shard_map`` (it is replicated)
    and is zero where no weight is positive.
    """
    weighted = jax.tree.map(lambda t: t * weight.astype(t.dtype), tree)
    sums, total = jax.lax.psum((weighted, weight), axis_name)
    valid = total > 0
    safe = jnp.where(valid, total, 1.0)
    mean = jax.tree.map(lambda s, t: (s / safe.astype(s.dtype)).astype(t.dtype), sums, tree)
    return vary(mean, axis_name), vary(valid, axis_name)


def vary(tree: PyTree, axis_name: AxisName) -> PyTree:
    """Marks replicated values as varying over the manual (``shard_map``) client axes, so
    that both sides of a ``lax.cond`` have one type; moves no data."""
    manual = tuple(a for a in axis_names(axis_name) if is_manual_axis(a))
    if not manual:
        return tree

    def cast(leaf: jax.Array) -> jax.Array:
        missing = tuple(a for a in manual if a not in jax.typeof(leaf).manual_axis_type.varying)
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(cast, tree)

"""PALSGD: Pseudo-Asynchronous Local SGD, DiLoCo with stochastic pulls toward the anchor.

DiLoCo's skeleton (an anchor and an outer optimizer in the state, a real sync every H
steps) plus, on each worker and each step, a coin: with probability ``1 - p`` a gradient
step with the learning rate scaled by ``1/(1 - p)``, with probability ``p`` a
*pseudo-synchronisation* step that pulls the params toward the (stale) anchor without a
gradient and without communication. The training loop may skip the forward/backward
pass on those steps: :func:`palsgd_is_pseudo_sync` reads the coin from the state before
the gradient is computed.

Reference:
  H. Naganuma, X. Zhang, M.-C. Yue, I. Mitliagkas, P. A. Witte, R. J. Hewett, Y. T. Lee.
  *Pseudo-Asynchronous Local SGD: Robust and Efficient Data-Parallel Training.* TMLR 2025.
  arXiv:2504.18454.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optlab._control import run_if
from optlab.local_sgd import AxisName, check_axis_name, worker_mean
from optlab.perturbation import raw_key
from optlab.validation import check_float_in_range, check_injectable_int

__all__ = ["PALSGDState", "palsgd", "palsgd_is_pseudo_sync", "palsgd_outer_params"]

PyTree = Any

_MAX_COUNT = 2**31 - 1  # the step counter is int32


class PALSGDState(NamedTuple):
    """State of :func:`palsgd`.

    Attributes:
      count: updates taken so far (int32, saturating at its maximum); identical on every
        worker, it decides the warm-up, the real syncs and the learning rate.
      key: the base PRNG key as raw key data (uint32[2]), replicated; the coin of step
        ``t`` is drawn from ``fold_in(fold_in(key, worker), t)`` (per-worker coins) or
        ``fold_in(key, t)`` (``shared_coin=True``).
      pseudo_sync: bool, whether the *next* update is a pseudo-sync step (the coin drawn
        at the end of the previous update, as in the paper); worker-local unless the coins
        are shared. Read it with :func:`palsgd_is_pseudo_sync`.
      inner_state: the inner direction's state, worker-local; it does not advance on
        pseudo-sync steps.
      outer_state: the outer optimizer's state, replicated.
      anchor: the outer params (a copy in the state, same dtypes as the params), replicated.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    key: jax.Array
    pseudo_sync: jax.Array
    inner_state: optax.OptState
    outer_state: optax.OptState
    anchor: PyTree


def palsgd(
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation | None,
    sync_period: int,
    axis_name: AxisName,
    *,
    learning_rate: float | jax.Array | optax.Schedule,
    prob: float | jax.Array = 0.2,
    eta: float | jax.Array = 0.5,
    warmup_steps: int = 0,
    shared_coin: bool = False,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""PALSGD: local steps or stochastic pulls toward the anchor, an outer step every H.

    ``inner`` is the worker optimizer's *direction without its learning rate* (e.g.
    ``optax.scale_by_adam()``, ``optax.trace(0.9)``, or a chain with
    ``optax.add_decayed_weights`` for AdamW); PALSGD applies the scheduled rate
    :math:`\lambda_t` = ``learning_rate(t)`` itself, so the gradient step's rescaling
    by :math:`1/(1-p)` and the pull's :math:`1/p` use the same :math:`\lambda_t`. With
    worker params :math:`x_i`, anchor :math:`\theta` (replicated), :math:`M` workers,
    :math:`W` = ``warmup_steps`` and ``t`` the updates before this one:

    .. math::

      t < W:&\quad x_i \leftarrow x_i - \lambda_t\, \mathrm{inner}(\tfrac{1}{M}\textstyle
        \sum_j g_j) \quad\text{(data parallel); after step } W-1:\;
        \theta \leftarrow x_i \leftarrow \tfrac{1}{M}\textstyle\sum_j x_j \\
      t \ge W,\ c_{i,t} = 0:&\quad x_i \leftarrow x_i - \tfrac{\lambda_t}{1-p}\,
        \mathrm{inner}(g_i) \\
      t \ge W,\ c_{i,t} = 1:&\quad x_i \leftarrow x_i - \tfrac{\lambda_t}{p}\,\eta\,
        (x_i - \theta) \quad\text{(pseudo-sync: no gradient, no communication)} \\
      (t - W + 1) \bmod H = 0:&\quad \Delta = \theta - \tfrac{1}{M}\textstyle\sum_j x_j,\;
        \theta \leftarrow \theta + \mathrm{outer}(\Delta),\; x_i \leftarrow \theta,

    with coins :math:`c_{i,t} \sim \mathrm{Bernoulli}(p)`, drawn at the end of step
    ``t - 1``; the first step after the warm-up is always a gradient step. In expectation
    a step moves :math:`-\lambda_t g + \lambda_t \eta (\theta - x)`: local SGD on
    :math:`f_i(x) + \tfrac{\eta}{2}\|x - \theta\|^2` where the proximal part replaces a
    fraction ``p`` of the gradient computations. The real sync counts every step (gradient
    or pull) and is one all-reduce guarded by the replicated count; warm-up steps
    all-reduce the gradient (a second guard, absent when ``warmup_steps=0``). Both guards
    are ``run_if`` (a ``lax.cond`` whose taken branch is a one-trip while loop): steps
    that do not sync move no bytes and cost nothing, also under ``jax.vmap`` over runs
    and workers.

    **Skipping the gradient.** On a pseudo-sync step ``update`` ignores ``updates`` (pass
    zeros of the params' shape). Query ``palsgd_is_pseudo_sync(opt_state)`` *before* the
    forward/backward pass and skip it (``lax.cond`` in a jitted step, or a host ``if``) to
    get the paper's speed-up. The inner state does not advance on those steps.

    Choices where the paper's code is silent or differs [recall]: ``learning_rate`` is
    evaluated at the PALSGD step count (warm-up, gradient and pull steps all count);
    ``shared_coin=False`` draws independent coins per worker (the paper's description;
    the reference code seeds every rank alike, which is ``shared_coin=True``); the inner
    state is neither averaged nor reset at syncs; the outer default is the README's
    Nesterov SGD (lr 0.1, momentum 0.9); ``eta`` defaults to the config's 0.5 (the README
    example uses 1.0). The params must start identical on every worker, and this must be
    the **outermost** transform of a chain; ``update`` must run where ``axis_name`` is
    bound (``jax.vmap(..., axis_name=...)``, ``jax.shard_map``, or both as a tuple).

    Args:
      inner: the worker optimizer's direction, without learning rate (extra args are
        forwarded to it); its output is multiplied by ``-learning_rate(t) / (1 - prob)``.
      outer: the outer optimizer on the pseudo-gradient (it sees the anchor as its
        params), or ``None`` for Nesterov SGD (lr 0.1, momentum 0.9).
      sync_period: optimizer steps per real sync, ``H >= 1`` (32-100 in the paper).
      axis_name: the worker axis, a string or a tuple of strings.
      learning_rate: :math:`\lambda_t`, a float or an optax schedule of the step count.
      prob: the pseudo-sync probability ``p`` in ``(0, 1)`` (paper: 0.2).
      eta: the pull strength :math:`\eta \ge 0` (paper: 0.5 config default, 1.0 README).
      warmup_steps: data-parallel steps before the local phase, ``>= 0`` (paper: 32-100).
      shared_coin: one coin for all workers per step instead of one per worker.
      seed: an integer seed, a typed key (``jax.random.key``) or a raw key.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Example (two workers simulated with ``vmap``):
      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> tx = optlab.palsgd(optax.identity(), optax.sgd(1.0), sync_period=4,
      ...                    axis_name="workers", learning_rate=0.1, prob=0.5, eta=1.0)
      >>> loss = lambda w, d: 0.5 * jnp.sum((w - d) ** 2)
      >>> def step(params, state, data):
      ...     grads = jax.lax.cond(  # no forward/backward on pseudo-sync steps
      ...         optlab.palsgd_is_pseudo_sync(state),
      ...         lambda: jnp.zeros_like(params),
      ...         lambda: jax.grad(loss)(params, data))
      ...     updates, state = tx.update(grads, state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> step = jax.jit(jax.vmap(step, axis_name="workers"))
      >>> params = jnp.zeros((2, 1))  # replicated start
      >>> state = jax.vmap(tx.init)(params)
      >>> data = jnp.array([[1.0], [3.0]])  # each worker's own target
      >>> for _ in range(4):  # the 4th update ends with the real sync
      ...     params, state = step(params, state, data)
      >>> bool(params[0, 0] == params[1, 0])
      True

    Reference:
      Naganuma, Zhang, Yue, Mitliagkas, Witte, Hewett, Lee. *Pseudo-Asynchronous Local
      SGD: Robust and Efficient Data-Parallel Training.* TMLR 2025. arXiv:2504.18454.
    """
    sync_period = check_injectable_int(
        "sync_period", sync_period, min_value=1, max_value=_MAX_COUNT
    )
    warmup_steps = check_injectable_int(
        "warmup_steps", warmup_steps, min_value=0, max_value=_MAX_COUNT
    )
    axis_name = check_axis_name(axis_name)
    check_float_in_range("learning_rate", learning_rate, low=0.0)
    for name, value in (("prob", prob), ("eta", eta)):
        if callable(value):
            raise ValueError(f"{name} must be a real number, got the callable {value!r}.")
    check_float_in_range("prob", prob, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    check_float_in_range("eta", eta, low=0.0)
    if not isinstance(shared_coin, bool):
        raise ValueError(f"shared_coin must be a bool, got {shared_coin!r}.")
    raw_key(seed)  # validated at construction; a traced seed (inject_hyperparams) passes
    if outer is None:
        outer = optax.sgd(0.1, momentum=0.9, nesterov=True)
    inner = optax.with_extra_args_support(inner)
    has_warmup = not (isinstance(warmup_steps, int) and warmup_steps == 0)

    def lr_at(count: jax.Array) -> Any:
        return learning_rate(count) if callable(learning_rate) else learning_rate

    def init_fn(params: PyTree) -> PALSGDState:
        # A copy, not an alias: with the params donated to a jitted step, an alias would
        # hand the anchor's buffer to the new params.
        anchor = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
        return PALSGDState(
            count=jnp.zeros([], jnp.int32),
            key=jnp.array(raw_key(seed), copy=True),
            pseudo_sync=jnp.zeros([], bool),
            inner_state=inner.init(params),
            outer_state=outer.init(anchor),
            anchor=anchor,
        )

    def update_fn(
        updates: PyTree,
        state: PALSGDState,
        params: PyTree | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, PALSGDState]:
        if params is None:
            raise ValueError(
                "palsgd needs params: call update(grads, state, params) (the pull and the "
                "outer step use the params)."
            )
        count = state.count
        lr = lr_at(count)
        warm = count < warmup_steps

        def gradient_step(inner_state):
            grads = updates
            if has_warmup:
                grads = run_if(warm, lambda g: worker_mean(g, axis_name), grads)
            direction, inner_state = inner.update(grads, inner_state, params, **extra_args)
            scale = jnp.where(warm, lr, lr / (1.0 - prob)) if has_warmup else lr / (1.0 - prob)
            local = jax.tree.map(lambda d: (-scale * d).astype(d.dtype), direction)
            return local, inner_state

        def pull_step(inner_state):
            local = jax.tree.map(
                lambda p, a: (-(lr / prob) * eta * (p - a)).astype(p.dtype),
                params,
                state.anchor,
            )
            return local, inner_state

        local, inner_state = jax.lax.cond(
            state.pseudo_sync, pull_step, gradient_step, state.inner_state
        )
        since = count - warmup_steps
        switch = since == -1  # the last warm-up step: the anchor becomes the mean
        sync = (since >= 0) & ((since + 1) % sync_period == 0)

        def outer_step(operands):
            local, outer_state, anchor = operands
            mean = worker_mean(
                jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, local), axis_name
            )
            delta = jax.tree.map(lambda a, m: a - m.astype(a.dtype), anchor, mean)
            outer_updates, new_outer_state = outer.update(delta, outer_state, anchor)
            stepped = jax.tree.map(
                lambda a, u: (a + u.astype(a.dtype)).astype(a.dtype), anchor, outer_updates
            )
            anchor = jax.tree.map(
                lambda s, m: jnp.where(switch, m.astype(s.dtype), s), stepped, mean
            )
            outer_state = jax.tree.map(
                lambda new, old: jnp.where(switch, old, new), new_outer_state, outer_state
            )
            jump = jax.tree.map(lambda a, p, u: (a - p).astype(u.dtype), anchor, params, local)
            return jump, outer_state, anchor

        out, outer_state, anchor = run_if(
            sync | switch, outer_step, (local, state.outer_state, state.anchor)
        )
        new_count = optax.safe_increment(count)
        key = state.key
        if not shared_coin:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        coin = jax.random.uniform(jax.random.fold_in(key, new_count)) < prob
        # The first step after the warm-up (step W) is a gradient step.
        pseudo_sync = coin & (new_count > warmup_steps)
        return out, PALSGDState(
            count=new_count,
            key=state.key,
            pseudo_sync=pseudo_sync,
            inner_state=inner_state,
            outer_state=outer_state,
            anchor=anchor,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_state(opt_state: PyTree, caller: str) -> PALSGDState:
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, PALSGDState))
    found = [n for n in nodes if isinstance(n, PALSGDState)]
    if len(found) != 1:
        raise ValueError(f"{caller}: opt_state holds {len(found)} PALSGD states, expected one.")
    return found[0]


def palsgd_is_pseudo_sync(opt_state: PyTree) -> jax.Array:
    """Whether the next ``update`` is a pseudo-sync step (bool array, per worker).

    A pure read of the coin drawn at the end of the previous update, so a training loop can
    ask *before* computing the gradient and skip the forward/backward pass (the update
    ignores the gradient on those steps). Works inside ``jit``/``vmap``/``shard_map``
    (pass the worker's own state) and on a batched host-side state.

    Raises:
      ValueError: ``opt_state`` holds no PALSGD state, or several side by side.
    """
    return _find_state(opt_state, "palsgd_is_pseudo_sync").pseudo_sync


def palsgd_outer_params(opt_state: PyTree) -> PyTree:
    """The anchor (outer params) of the outermost :class:`PALSGDState` in ``opt_state``.

    Raises:
      ValueError: ``opt_state`` holds no PALSGD state, or several side by side.
    """
    return _find_state(opt_state, "palsgd_outer_params").anchor

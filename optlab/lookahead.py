"""Lookahead and Multilayer (nested) Lookahead as drop-in optax transforms.

Unlike ``optax.lookahead``, which needs ``optax.LookaheadParams(fast, slow)`` as its params
(so it cannot sit behind ``flax.nnx.Optimizer``, optax issue 1429), the params here are the
model's own tree: they are the fast weights, and the slow weights of every level live in the
optimizer state. On a sync step the transform emits the jump ``slow_new - params``.
:func:`slow_params` returns the weights to evaluate.

Cost: level l's slow weights are read and written only on its own sync steps and on the
first step of its cycles (where they are re-anchored to the params); an ordinary step costs
what the inner optimizer costs. This holds when the state is donated to a jitted step that
returns the new state in the same order as it came in: JAX pairs each donated buffer with
the first output of the same shape and dtype, so ``jax.jit(tx.update, donate_argnums=1)``
(which returns ``(updates, state)``) hands the first slow leaf's buffer to the updates and
every slow tree is then copied on every step. Return ``(state, updates)``, or donate the
whole train state of a train step that returns its new state first.

References:
  M. R. Zhang, J. Lucas, G. Hinton, J. Ba. *Lookahead Optimizer: k steps forward, 1 step
  back.* NeurIPS 2019. arXiv:1907.08610.

  D. Pushkin, L. Barba. *Multilayer Lookahead: a Nested Version of Lookahead.* arXiv:2110.14254,
  2021.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optlab.validation import check_float_in_range, check_injectable_int

__all__ = [
    "MOMENTUM_MODES",
    "LookaheadState",
    "lookahead",
    "multilayer_lookahead",
    "slow_params",
]

PyTree = Any
MomentumMode = Literal["keep", "reset", "pullback"]
MOMENTUM_MODES: tuple[str, ...] = ("keep", "reset", "pullback")

_MAX_CYCLE = 2**31 - 1  # the step counter is int32


class LookaheadState(NamedTuple):
    """State of :func:`lookahead` / :func:`multilayer_lookahead`.

    Attributes:
      inner_state: the inner (fast) optimizer's state.
      slow: the slow weights, one params-shaped tree per level, level 1 (fastest) first;
        ``slow[-1]`` is what :func:`slow_params` returns. Same dtypes as the params. After a
        sync of levels 1..d, level d holds the new weights while levels 1..d-1 keep their
        own interpolation results until the next update, the first step of their new cycles,
        re-anchors them to the params (a lazy reset); ``slow[-1]`` is always current.
      cycle_step: fast steps taken since the last top-level sync, in ``[0, k_1 * ... * k_L)``.
      cached_momentum: for ``momentum="pullback"``, the inner optimizer's first-moment
        buffers saved at the previous sync (a tuple with one tree per buffer); else ``()``.
      count: updates taken so far (int32, saturating at its maximum): the step count at
        which ``alpha`` schedules are evaluated.
    """

    inner_state: optax.OptState
    slow: tuple[PyTree, ...]
    cycle_step: jax.Array
    cached_momentum: tuple[PyTree, ...]
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def lookahead(
    inner: optax.GradientTransformation,
    sync_period: int = 5,
    alpha: float | jax.Array | optax.Schedule = 0.5,
    *,
    momentum: MomentumMode = "keep",
) -> optax.GradientTransformationExtraArgs:
    r"""Lookahead: k fast steps of ``inner``, then one interpolating step back.

    With fast weights :math:`x` (the params), slow weights :math:`\phi` (in the state),
    period :math:`k` and step :math:`\alpha`, each update does

    .. math::

      x \leftarrow x + \mathrm{inner}(g); \quad \text{every } k\text{-th step: }
      \phi \leftarrow \phi + \alpha (x - \phi),\; x \leftarrow \phi.

    Ordinary steps emit the inner optimizer's update; sync steps emit ``phi_new - params``,
    so this must be the **outermost** transform (put learning rate, clipping and weight decay
    inside ``inner`` or before it in a chain). The slow weights are re-anchored to the params
    at the start of each cycle, so an outer wrapper that moves the params at a sync (for
    instance another ``lookahead``) resets this level, as Multilayer Lookahead requires.

    ``alpha = 1`` recovers ``inner``; ``sync_period = 1`` is ``inner`` with its update scaled
    by ``alpha`` (for SGD). ``alpha`` may be a traced value, so
    ``optax.inject_hyperparams(optlab.lookahead)(inner, alpha=0.5)`` works without
    ``static_args``, or a schedule ``alpha(count)`` of the step count: a sync uses
    ``alpha(t)`` where ``t`` is the number of updates before this one (0 for the first, as
    an optax learning-rate schedule sees it), so with ``k = 5`` the syncs use
    ``alpha(4), alpha(9), ...``. A schedule's values are not range-checked (they are traced).

    Args:
      inner: the fast optimizer (any optax transform; extra args such as ``grad_fn`` are
        forwarded to it).
      sync_period: fast steps per slow step, ``k >= 1``.
      alpha: slow step size in ``[0, 1]``, or a schedule of the step count returning one.
      momentum: what happens to the inner optimizer's first-moment buffers (``trace`` of
        ``optax.TraceState``, i.e. SGD momentum / Nesterov; ``mu`` of
        ``optax.ScaleByAdamState``, i.e. Adam / AdamW) at a sync, as in the official code's
        ``pullback_momentum``: ``"keep"`` (unchanged), ``"reset"`` (zeroed), ``"pullback"``
        (``m <- alpha m + (1 - alpha) m_cached``, ``m_cached <- m``, with ``m_cached = 0``
        at the start).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optlab
      >>> tx = optlab.lookahead(optax.sgd(0.1), sync_period=5, alpha=0.5)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> eval_params = optlab.slow_params(state)

    Reference:
      Zhang, Lucas, Hinton, Ba. *Lookahead Optimizer: k steps forward, 1 step back.*
      NeurIPS 2019. arXiv:1907.08610.
    """
    return _lookahead_levels(
        inner, ((sync_period, alpha),), momentum=momentum, names=("sync_period", "alpha")
    )


def multilayer_lookahead(
    inner: optax.GradientTransformation,
    levels: Sequence[tuple[int, float | jax.Array | optax.Schedule]] = ((5, 0.5), (5, 0.5)),
    *,
    momentum: MomentumMode = "keep",
) -> optax.GradientTransformationExtraArgs:
    r"""Multilayer Lookahead: Lookahead wrapped around itself ``len(levels)`` times.

    Level 1 is Lookahead on the fast weights :math:`x = \phi_0`. Level :math:`\ell` treats
    the slow weights of level :math:`\ell-1` as its fast weights and syncs every
    :math:`k_\ell` syncs of level :math:`\ell-1`, i.e. every
    :math:`K_\ell = k_1 \cdots k_\ell` fast steps. After each fast step (counter :math:`c`),
    bottom-up:

    .. math::

      \text{for } \ell = 1..L \text{ while } K_\ell \mid c:\quad
      \phi_\ell \leftarrow \phi_\ell + \alpha_\ell (\phi_{\ell-1} - \phi_\ell), \quad
      \phi_{\ell-1}, \dots, \phi_1, x \leftarrow \phi_\ell.

    Memory is one params-sized copy per level (nesting ``optax.lookahead`` doubles the
    params per level). Nesting :func:`lookahead` by hand gives the same trajectory when the
    outer period counts fast steps:
    ``lookahead(lookahead(inner, k1, a1), k1 * k2, a2) == multilayer_lookahead(inner,
    ((k1, a1), (k2, a2)))``. Each level is touched only on its own anchor and sync steps
    (two-way ``lax.cond``, one per level and phase), so with a donated state (see the
    module docstring) an ordinary step costs what ``inner`` costs whatever the depth.

    Args:
      inner: the fast optimizer; extra args are forwarded to it.
      levels: ``((k_1, alpha_1), ..., (k_L, alpha_L))``, bottom (fastest) level first, with
        integer ``k >= 1`` and ``alpha`` in ``[0, 1]`` or a schedule of the step count (see
        :func:`lookahead`; all levels see the same count); at least one level.
      momentum: first-moment handling at every level-1 sync (every time the fast weights are
        reset), see :func:`lookahead`; ``"pullback"`` uses ``alpha_1``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optlab
      >>> tx = optlab.multilayer_lookahead(optax.adam(1e-3), levels=((5, 0.5), (5, 0.5)))
      >>> state = tx.init({"w": jnp.zeros(3)})

    Reference:
      Pushkin, Barba. *Multilayer Lookahead: a Nested Version of Lookahead.*
      arXiv:2110.14254, 2021.
    """
    if isinstance(levels, str | bytes) or not isinstance(levels, Sequence):
        raise ValueError(f"levels must be a sequence of (k, alpha) pairs, got {levels!r}.")
    if len(levels) == 0:
        raise ValueError("levels must hold at least one (k, alpha) pair, got ().")
    for i, level in enumerate(levels):
        if isinstance(level, str | bytes) or not isinstance(level, Sequence) or len(level) != 2:
            raise ValueError(f"levels[{i}] must be a (k, alpha) pair, got {level!r}.")
    return _lookahead_levels(inner, tuple((k, a) for k, a in levels), momentum=momentum)


def _lookahead_levels(
    inner: optax.GradientTransformation,
    levels: tuple[tuple[Any, Any], ...],
    *,
    momentum: str,
    names: tuple[str, str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The shared core: ``L`` levels of slow weights, synced bottom-up."""
    if momentum not in MOMENTUM_MODES:
        raise ValueError(f"momentum must be one of {MOMENTUM_MODES}, got {momentum!r}.")
    periods, alphas = [], []
    for i, (k, alpha) in enumerate(levels):
        k_name, a_name = names or (f"levels[{i}][0] (k)", f"levels[{i}][1] (alpha)")
        periods.append(check_injectable_int(k_name, k, min_value=1, max_value=_MAX_CYCLE))
        alphas.append(check_float_in_range(a_name, alpha, low=0.0, high=1.0))
    if all(isinstance(k, int) for k in periods) and math.prod(periods) > _MAX_CYCLE:
        raise ValueError(
            f"the product of the sync periods (the top-level cycle, {math.prod(periods)} "
            f"steps) must be <= {_MAX_CYCLE}, got periods {periods}."
        )
    num_levels = len(levels)
    inner = optax.with_extra_args_support(inner)

    def cycle_lengths() -> list[Any]:
        # K_l = k_1 ... k_l (traced when inject_hyperparams injects a period).
        out, acc = [], 1
        for k in periods:
            acc = acc * k
            out.append(acc)
        return out

    def depth(count: jax.Array) -> jax.Array:
        # How many levels have count % K_l == 0 (K_l divides K_{l+1}, so they nest).
        return sum((count % K == 0).astype(jnp.int32) for K in cycle_lengths())

    def init_fn(params: PyTree) -> LookaheadState:
        inner_state = inner.init(params)
        cached: tuple[PyTree, ...] = ()
        if momentum != "keep":
            buffers = _get_momenta(inner_state)
            if not buffers:
                raise ValueError(
                    f"momentum={momentum!r} needs an inner optimizer with a first-moment "
                    "buffer (optax.TraceState from sgd(momentum=...), or ScaleByAdamState "
                    "from adam/adamw); this inner state has none. Use momentum='keep'."
                )
            if momentum == "pullback":
                cached = tuple(jax.tree.map(jnp.zeros_like, b) for b in buffers)
        slow = tuple(jax.tree.map(lambda p: jnp.array(p, copy=True), params) for _ in levels)
        return LookaheadState(
            inner_state=inner_state,
            slow=tuple(slow),
            cycle_step=jnp.zeros([], jnp.int32),
            cached_momentum=cached,
            count=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: PyTree,
        state: LookaheadState,
        params: PyTree | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, LookaheadState]:
        if params is None:
            raise ValueError(
                "lookahead needs params: call update(grads, state, params) (the slow "
                "weights live in the state; params are the fast weights)."
            )
        # Levels whose cycle starts now are re-anchored to the current params: this
        # completes the reset of the levels below the last sync and follows params moved
        # from outside (e.g. by an outer lookahead). ``synced`` levels sync after this fast
        # step, bottom-up.
        start = depth(state.cycle_step)
        fast_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        count = state.cycle_step + 1
        synced = depth(count)

        def alpha_at(level: int) -> Any:
            # Evaluated inside the sync branch: a schedule costs nothing off-sync.
            alpha = alphas[level]
            return alpha(state.count) if callable(alpha) else alpha

        # A sequence of two-way lax.conds, each writing one slow tree: level l is read and
        # written only on its own anchor and sync steps, and an ordinary step costs what
        # ``inner`` costs plus 2L scalar predicates. With the state donated, the tree an
        # untaken branch passes through stays in its buffer. (XLA:CPU inserts copies of the
        # passed-through operands, on every step, for a multi-way lax.switch or conds nested
        # in a cond; tests/test_lookahead.py checks the compiled HLO for copies.)
        slow = list(state.slow)
        for level in range(num_levels):
            slow[level] = jax.lax.cond(start > level, lambda s: params, lambda s: s, slow[level])

        momenta = _get_momenta(inner_state) if momentum != "keep" else ()
        cached = state.cached_momentum
        out_updates = fast_updates
        for level in range(num_levels):

            def sync(operands, level=level):
                u, below_slow, s, momenta, cached = operands
                alpha = alpha_at(level)
                if level == 0:
                    below = jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, u)
                    momenta, cached = _sync_momentum(momenta, cached, momentum, alpha)
                else:
                    below = below_slow
                new = jax.tree.map(lambda s, b: (s + alpha * (b - s)).astype(s.dtype), s, below)
                jump = jax.tree.map(lambda n, p, u: (n - p).astype(u.dtype), new, params, u)
                return jump, below_slow, new, momenta, cached

            # The levels below this one keep their pre-sync values: the next step starts
            # their cycles and re-anchors them to the params (= this sync's result).
            below_slow = slow[level - 1] if level > 0 else ()
            out_updates, below_slow, slow[level], momenta, cached = jax.lax.cond(
                synced > level,
                sync,
                lambda operands: operands,
                (out_updates, below_slow, slow[level], momenta, cached),
            )
            if level > 0:
                slow[level - 1] = below_slow
        if momentum != "keep":
            inner_state = _set_momenta(inner_state, momenta)
        top = cycle_lengths()[-1]
        return out_updates, LookaheadState(
            inner_state=inner_state,
            slow=tuple(slow),
            cycle_step=(count % top).astype(jnp.int32),
            cached_momentum=cached,
            count=optax.safe_increment(state.count),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_momentum_state(node: Any) -> bool:
    return isinstance(node, optax.TraceState | optax.ScaleByAdamState)


def _get_momenta(inner_state: PyTree) -> tuple[PyTree, ...]:
    """The first-moment buffers found anywhere in ``inner_state``, in tree order."""
    nodes = jax.tree.leaves(inner_state, is_leaf=_is_momentum_state)
    return tuple(_buffer(n) for n in nodes if _is_momentum_state(n))


def _buffer(node: Any) -> PyTree:
    return node.trace if isinstance(node, optax.TraceState) else node.mu


def _set_momenta(inner_state: PyTree, buffers: Sequence[PyTree]) -> PyTree:
    nodes, treedef = jax.tree.flatten(inner_state, is_leaf=_is_momentum_state)
    it = iter(buffers)
    new_nodes = []
    for n in nodes:
        if isinstance(n, optax.TraceState):
            n = n._replace(trace=next(it))
        elif isinstance(n, optax.ScaleByAdamState):
            n = n._replace(mu=next(it))
        new_nodes.append(n)
    return jax.tree.unflatten(treedef, new_nodes)


def _sync_momentum(
    buffers: tuple[PyTree, ...], cached: tuple[PyTree, ...], momentum: str, alpha: Any
) -> tuple[tuple[PyTree, ...], tuple[PyTree, ...]]:
    """The first-moment buffers (and pullback cache) after a level-1 sync."""
    if momentum == "keep":
        return buffers, cached
    if momentum == "reset":
        return tuple(jax.tree.map(jnp.zeros_like, b) for b in buffers), cached
    pulled = tuple(
        jax.tree.map(lambda m, c: (alpha * m + (1 - alpha) * c).astype(m.dtype), b, c)
        for b, c in zip(buffers, cached, strict=True)
    )
    return pulled, pulled


def slow_params(opt_state: PyTree) -> PyTree:
    """The weights to evaluate: the slowest level's slow weights of a Lookahead state.

    Finds the outermost :class:`LookaheadState` anywhere inside ``opt_state`` (an
    ``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams`` or
    ``flax.nnx.Optimizer`` state, or a train state's ``opt_state``) and returns its
    ``slow[-1]``. When Lookahead instances are nested by hand, the outermost one holds the
    slowest weights.

    Raises:
      ValueError: ``opt_state`` holds no Lookahead state, or several side by side (e.g.
        under ``optax.multi_transform``), where no single tree of slow weights exists.
    """
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, LookaheadState))
    found = [n for n in nodes if isinstance(n, LookaheadState)]
    if not found:
        raise ValueError(
            "slow_params: opt_state holds no LookaheadState (was it built with "
            "optlab.lookahead or optlab.multilayer_lookahead?)."
        )
    if len(found) > 1:
        raise ValueError(
            f"slow_params: opt_state holds {len(found)} Lookahead states side by side; "
            "take slow[-1] of the one you want."
        )
    return found[0].slow[-1]

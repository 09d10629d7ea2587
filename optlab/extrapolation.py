"""Extrapolation for large-batch training: EXTRAP-SGD and its unified framework.

Each step first moves *downhill* to an extrapolated point ``x - gamma * u`` and feeds the
gradient taken there to the base optimizer, which updates ``x``. The direction ``u`` is
one of:

* ``"gradient"`` (EXTRAP-SGD, local extragradient): ``u`` is the worker's own mini-batch
  gradient; the second gradient comes from ``grad_fn`` (one extra forward/backward, no extra
  communication: only the second gradient is ``pmean``-ed over ``axis_name``).
* ``"past"`` (extrapolation from the past): ``u`` is the previous step's averaged gradient,
  kept in the state; no extra gradient at all.
* ``"noise"``: ``u ~ N(0, I)`` from a key in the state; no extra gradient.

The single-gradient variants (``"past"``, ``"noise"``) need no ``grad_fn``: the params the
training loop holds (and differentiates at) *are* the extrapolated point
``y = x + offset``, and the state keeps ``offset = -gamma * u`` for the next step. Evaluate
and export :func:`extrapolation_eval_params` (``y - offset = x``), in the style of
``optax.contrib.schedule_free_eval_params``. The offset is zero at step 0, when ``gamma`` is
0 and after ``stop_after``. With ``"gradient"`` the loop's params are ``x`` itself.

Built on :mod:`optlab.perturbation`.

Reference:
  T. Lin, L. Kong, S. U. Stich, M. Jaggi. *Extrapolation for Large-batch Training in Deep
  Learning.* ICML 2020. arXiv:2006.05720.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optlab.parallel import pmean, pvary
from optlab.perturbation import (
    extrapolation_point,
    gaussian_like,
    grad_at_point,
    raw_key,
    refuse_inside_multi_steps,
)
from optlab.validation import check_float_in_range, check_injectable_int

__all__ = [
    "EXTRAPOLATION_DIRECTIONS",
    "ExtrapolationState",
    "extrap_sgd",
    "extrapolation",
    "extrapolation_eval_params",
]

PyTree = Any
Direction = Literal["gradient", "past", "noise"]
EXTRAPOLATION_DIRECTIONS: tuple[str, ...] = ("gradient", "past", "noise")


class ExtrapolationState(NamedTuple):
    """State of :func:`extrapolation` / :func:`extrap_sgd`.

    Attributes:
      count: number of ``update`` calls so far (int32); ``gamma`` schedules and
        ``stop_after`` are evaluated at it.
      offset: for ``"past"``/``"noise"``, the params the loop holds minus the true iterate,
        ``-gamma_t * u_t`` (params-shaped, params' dtypes); ``()`` for ``"gradient"``.
      key: for ``"noise"``, the base PRNG key as raw key data (uint32[2]); step ``t`` draws
        ``u_t`` from ``fold_in(key, t)``. ``()`` otherwise.
      base_state: the base optimizer's state.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    offset: PyTree
    key: jax.Array | tuple[()]
    base_state: optax.OptState


def extrapolation(
    base: optax.GradientTransformation,
    gamma: float | jax.Array | optax.Schedule,
    *,
    direction: Direction = "gradient",
    stop_after: int | jax.Array | None = None,
    axis_name: str | None = None,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""The extrapolation framework of Lin et al.: base fed the gradient at ``x - gamma u``.

    Per worker ``i`` with local gradient ``g_i = ∇F(x; ξ_i)``:

    .. math::

      x_i^{1/2} = x - \gamma_t u_i,\qquad h = \operatorname{pmean}_i \nabla F(x_i^{1/2}; \xi_i),
      \qquad x \leftarrow x + \mathrm{base}(h)

    with ``u_i = g_i`` (``"gradient"``), ``u = h_{t-1}`` (``"past"``) or ``u ~ N(0, I)``
    shared by all workers (``"noise"``). ``gamma = 0`` is exactly the base optimizer fed
    ``pmean(grads)``. Note the sign: extrapolation descends, SAM ascends.

    **Calling convention.** ``"gradient"``: ``update(grads, state, params, *, grad_fn,
    **extra)`` with ``grad_fn(params) -> grads`` on the same batch; ``grads`` and
    ``grad_fn`` must be *local* to the worker under ``axis_name`` (a ``pmean``-ed first
    gradient turns the method into global extragradient, a different method with more
    communication). To draw a fresh batch for the second gradient, close ``grad_fn`` over it.
    ``"past"``/``"noise"``: a plain ``update(grads, state, params)``; evaluate with
    :func:`extrapolation_eval_params`. Extra args are forwarded to ``base``.

    **Switching off.** The second gradient is taken under ``lax.cond`` on
    ``count < stop_after and gamma_t != 0``: once extrapolation is off (after ``stop_after``
    updates, e.g. the first learning-rate decay, or when a ``gamma`` schedule reaches 0) the
    step computes no second gradient. Lin et al. find the benefit concentrated in the
    early phase; ``gamma`` is usually tied to the learning rate (``gamma_t = c * eta_t``,
    ``c`` in {0.5, 1}: pass ``lambda t: c * lr_schedule(t)``).

    **Schedules and** ``optax.inject_hyperparams``. Step t extrapolates with ``gamma_t``. The
    single-call directions build step t+1's offset during update t, so they evaluate a
    ``gamma`` schedule one step ahead. Under ``optax.inject_hyperparams(optlab.extrapolation)``
    (or of a ``functools.partial`` of it) with ``gamma`` scheduled, the wrapper hands update t
    only ``gamma_t``; the transform then reads ``gamma_{t+1}`` from the wrapper's schedule
    (while tracing), so plain and injected schedules give the same steps. A hand-written
    factory (``lambda g: extrapolation(..., g)``) is not recognised: its injected ``gamma``
    is used for the next offset as it comes, one step late; pass the schedule through
    ``static_args=("gamma",)`` there.

    **Gradient accumulation.** ``"past"``/``"noise"`` compose with ``optax.MultiSteps``
    as usual (``MultiSteps(extrapolation(...), k)``): all k micro-batches are differentiated
    at the same point ``y_t`` and the offset moves once per k micro-steps, with ``u`` the
    accumulated gradient for ``"past"``. ``"gradient"`` inside ``optax.MultiSteps`` is
    refused with a ``ValueError`` when traced: MultiSteps forwards the ``grad_fn`` of the
    last micro-batch only. Either call ``update`` once per accumulated batch with a
    whole-batch ``grad_fn`` (:func:`optlab.perturbation.microbatched_grad_fn`, passed as the
    gradient and as ``grad_fn``: global extragradient over the whole batch), or put
    MultiSteps inside, ``extrap_sgd(optax.MultiSteps(base, k), gamma)``: each micro-batch
    extrapolates with its own gradient, as a worker does, and MultiSteps averages the
    extrapolated gradients. In that form ``gamma`` schedules and ``stop_after`` count
    micro-steps.

    Args:
      base: the optimizer fed the extrapolated gradient (plain or extra-args).
      gamma: extrapolation step >= 0; float, traced scalar or schedule ``count -> gamma``.
      direction: ``"gradient"``, ``"past"`` or ``"noise"`` (see the module docstring).
      stop_after: ``None`` (never stop) or the number of updates after which extrapolation
        is switched off, an int >= 0 (also accepted traced, for ``inject_hyperparams``).
      axis_name: worker axis to ``pmean`` the extrapolated gradient over, or ``None``.
      seed: for ``"noise"``, an int seed or a PRNG key, typed (``jax.random.key``) or raw
        (``jax.random.PRNGKey``, ``uint32[2]``); the same key in either form gives the same
        noise.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`ExtrapolationState`.

    Example (extrapolation from the past; no ``grad_fn``)::

      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> loss = lambda w: jnp.sum(w ** 4)
      >>> tx = optlab.extrapolation(optax.sgd(0.1), gamma=0.1, direction="past")
      >>> w = jnp.ones(3)  # the loop holds (and differentiates at) the extrapolated point
      >>> state = tx.init(w)
      >>> updates, state = tx.update(jax.grad(loss)(w), state, w)
      >>> w = optax.apply_updates(w, updates)
      >>> x = optlab.extrapolation_eval_params(w, state)  # the iterate to evaluate
      >>> print(f"{x[0]:.3f} {w[0]:.3f}")  # w = x - gamma * g with g = 4
      0.600 0.200

    Reference:
      Lin, Kong, Stich, Jaggi, *Extrapolation for Large-batch Training in Deep Learning*,
      ICML 2020, arXiv:2006.05720.
    """
    check_float_in_range("gamma", gamma, low=0.0)
    if direction not in EXTRAPOLATION_DIRECTIONS:
        raise ValueError(f"direction must be one of {EXTRAPOLATION_DIRECTIONS}, got {direction!r}.")
    if stop_after is not None:
        stop_after = check_injectable_int("stop_after", stop_after, min_value=0)
    if direction == "noise":
        raw_key(seed)  # validated at construction; a traced seed (inject_hyperparams) passes
    base = optax.with_extra_args_support(base)

    def gamma_at(count: jax.Array) -> Any:
        return gamma(count) if callable(gamma) else gamma

    def active_at(count: jax.Array, gamma_t: Any) -> jax.Array:
        active = jnp.asarray(gamma_t) != 0
        if stop_after is not None:
            active = active & (count < stop_after)
        return active

    def init_fn(params: PyTree) -> ExtrapolationState:
        if direction == "gradient":
            offset: PyTree = ()
        else:
            offset = jax.tree.map(jnp.zeros_like, params)
        key: jax.Array | tuple[()] = ()
        if direction == "noise":
            key = jnp.array(raw_key(seed), copy=True)
        return ExtrapolationState(
            count=jnp.zeros((), jnp.int32), offset=offset, key=key, base_state=base.init(params)
        )

    def gradient_update(updates, state, params, grad_fn, extra_args):
        if grad_fn is None:
            raise ValueError(
                "extrapolation(direction='gradient') needs the extra argument grad_fn "
                "(params -> local grads on the same batch)."
            )
        refuse_inside_multi_steps(
            "optlab.extrapolation(direction='gradient')",
            "; or put MultiSteps inside, extrap_sgd(optax.MultiSteps(base, k), gamma), so that "
            "every micro-batch extrapolates with its own gradient (like a worker) and "
            "MultiSteps averages the extrapolated gradients",
        )
        gamma_t = gamma_at(state.count)
        local = pvary(updates, axis_name)

        def extrapolated():
            h = grad_at_point(grad_fn, params, updates, extrapolation_point(gamma_t))
            return pvary(h, axis_name)

        h = jax.lax.cond(active_at(state.count, gamma_t), extrapolated, lambda: local)
        h = pmean(h, axis_name)
        new_updates, base_state = base.update(
            h, state.base_state, params, grad_fn=grad_fn, **extra_args
        )
        return new_updates, state._replace(
            count=optax.safe_increment(state.count), base_state=base_state
        )

    def single_call_update(updates, state, params, grad_fn, extra_args, caller):
        # The loop's params are y_t = x_t + offset_t and `updates` is the gradient at y_t.
        h = pmean(updates, axis_name)
        x = jax.tree.map(lambda y, o: y - o, params, state.offset)
        if grad_fn is not None:
            extra_args = {"grad_fn": grad_fn, **extra_args}
        step, base_state = base.update(h, state.base_state, x, **extra_args)
        next_count = optax.safe_increment(state.count)
        # The offset built now is where step t+1 differentiates, so it needs gamma_{t+1}.
        gamma_next = _injected_next_gamma(caller, gamma) if not callable(gamma) else None
        if gamma_next is None:
            gamma_next = gamma_at(next_count)
        gamma_next = jnp.where(active_at(next_count, gamma_next), gamma_next, 0)
        if direction == "past":
            u = h
        else:
            key = jax.random.fold_in(jax.random.wrap_key_data(state.key), next_count)
            u = gaussian_like(key, params)
        offset = jax.tree.map(
            lambda p, d: (-gamma_next * d.astype(jnp.promote_types(p.dtype, jnp.float32))).astype(
                p.dtype
            ),
            params,
            u,
        )
        new_updates = jax.tree.map(
            lambda s, new, old: (s + (new - old)).astype(s.dtype), step, offset, state.offset
        )
        return new_updates, state._replace(count=next_count, offset=offset, base_state=base_state)

    def update_fn(
        updates: PyTree,
        state: ExtrapolationState,
        params: PyTree | None = None,
        *,
        grad_fn: Callable[[PyTree], PyTree] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, ExtrapolationState]:
        if params is None:
            raise ValueError("extrapolation needs params: call update(grads, state, params).")
        if direction == "gradient":
            return gradient_update(updates, state, params, grad_fn, extra_args)
        return single_call_update(updates, state, params, grad_fn, extra_args, sys._getframe(1))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def extrap_sgd(
    base: optax.GradientTransformation,
    gamma: float | jax.Array | optax.Schedule,
    *,
    stop_after: int | jax.Array | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""EXTRAP-SGD (local extragradient): ``base`` fed ``pmean_i ∇F(x - gamma g_i; ξ_i)``.

    :func:`extrapolation` with ``direction="gradient"``; see there for the calling
    convention (``grad_fn`` extra arg, local gradients under ``axis_name``) and
    ``stop_after``. With momentum SGD as ``base`` the extrapolation uses the plain local
    gradient, not the local momentum (the paper's Nesterov-flavoured variant is not built).

    Example::

      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> loss = lambda w: jnp.sum(w ** 4)
      >>> tx = optlab.extrap_sgd(optax.sgd(0.1, momentum=0.9), gamma=0.1, stop_after=100)
      >>> w = jnp.ones(3)
      >>> state = tx.init(w)
      >>> updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
      >>> print(f"{updates[0]:.4f}")  # -0.1 x the gradient at w - 0.1 * 4 = 0.6
      -0.0864

    Reference:
      Lin, Kong, Stich, Jaggi, *Extrapolation for Large-batch Training in Deep Learning*,
      ICML 2020, arXiv:2006.05720.
    """
    return extrapolation(
        base, gamma, direction="gradient", stop_after=stop_after, axis_name=axis_name
    )


def extrapolation_eval_params(params: PyTree, opt_state: Any) -> PyTree:
    """The true iterate ``x = params - offset`` to evaluate and export.

    For ``direction="gradient"`` (no offset) it returns ``params`` unchanged. ``opt_state``
    is an :class:`ExtrapolationState` or any optimizer state containing exactly one (e.g.
    inside ``optax.chain`` or ``optax.inject_hyperparams``).
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, ExtrapolationState))
        if isinstance(s, ExtrapolationState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"opt_state must contain exactly one ExtrapolationState, found {len(found)}."
        )
    offset = found[0].offset
    if isinstance(offset, tuple) and offset == ():
        return params
    return jax.tree.map(lambda p, o: (p - o).astype(p.dtype), params, offset)


@functools.cache
def _inject_update_code() -> types.CodeType:
    """The code object of the ``update`` that ``optax.inject_hyperparams`` builds."""
    return optax.inject_hyperparams(optax.scale)(1.0).update.__code__


def _injected_next_gamma(caller: types.FrameType | None, gamma_t: Any) -> Any:
    """gamma_{t+1} when ``caller`` is ``optax.inject_hyperparams(extrapolation)``'s update
    with ``gamma`` scheduled there; ``None`` otherwise.

    ``inject_hyperparams`` evaluates a schedule at its own count and hands the inner
    transform ``gamma_t`` only, but the single-call directions build the offset of step t+1
    in update t, which needs ``gamma_{t+1}``: with ``gamma_t`` the extrapolation would lag
    one step (one extra extrapolated step after the schedule reaches 0). The next value is
    the injected schedule advanced by one step, read from the wrapper's own schedule state
    while tracing.
    """
    if caller is None or caller.f_code is not _inject_update_code():
        return None
    scope = caller.f_locals
    factory = scope.get("inner_factory")
    while isinstance(factory, functools.partial):
        factory = factory.func
    if factory is not extrapolation:
        return None
    schedules, state, extra_args = (
        scope.get(name) for name in ("sched_hps", "state", "extra_args")
    )
    if schedules is None or state is None or extra_args is None:
        raise NotImplementedError(
            "optlab.extrapolation cannot read the gamma schedule of this optax version's "
            "inject_hyperparams; list gamma in static_args instead "
            "(optax.inject_hyperparams(optlab.extrapolation, static_args=('gamma',)))."
        )
    schedule = schedules.get("gamma")
    if schedule is None:
        return None
    next_state = schedule.update(state.hyperparams_states["gamma"], **extra_args)
    return jnp.asarray(schedule(next_state, **extra_args), jnp.result_type(gamma_t))

"""SA-SAM: SAM whose step size and radius follow a local-smoothness estimate.

The step size is Malitsky & Mishchenko's "adaptive gradient descent without descent" rule,
an estimate of the inverse local Lipschitz constant of the gradient from the last two
iterates, and the SAM radius is tied to it, ``rho_t = sqrt(eta_t)``. Built on
:mod:`optlab.perturbation`.

References:
  H. Naganuma, J. L. Kim, A. Kyrillidis, I. Mitliagkas. *Smoothness-Adaptive
  Sharpness-Aware Minimization for Finding Flatter Minima.* ICLR 2024 Tiny Papers.
  Code: https://github.com/Hiroki11x/smoothness_aware_sam.

  Y. Malitsky, K. Mishchenko. *Adaptive Gradient Descent without Descent.* ICML 2020.
  arXiv:1910.09529.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optlab.parallel import pmean
from optlab.perturbation import (
    DEFAULT_EPS,
    grad_at_point,
    refuse_inside_multi_steps,
    safe_global_norm,
    sharpness_point,
)
from optlab.validation import check_float_in_range

__all__ = ["SASAMState", "sa_sam"]

PyTree = Any
Form = Literal["paper", "practical"]

# form -> (amplifier, damping, lr_eps, initial theta)
_PRESETS: dict[str, tuple[float, float, float, float]] = {
    "paper": (1.0, 2.0, 0.0, float("inf")),
    "practical": (0.02, 1.0, 1e-8, 1.0),
}


class SASAMState(NamedTuple):
    """State of :func:`sa_sam`.

    Attributes:
      count: number of ``update`` calls so far (int32).
      lr: the step size η of the last update (``base_lr`` before the first); log it to follow
        the adaptive rule. At least float32 (float64 for float64 params).
      rho: the SAM radius used by the last update (0 before the first).
      theta: θ = η_t / η_{t-1} of the last update (the growth memory of the rule); starts at
        +inf in the paper form, 1 in the practical form.
      prev_params: the params of the last update call x_{t-1} (a copy of the initial params
        before the first), the second point of the smoothness estimate. Never the params'
        own buffers, so a jitted step may donate both params and state.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    lr: jax.Array
    rho: jax.Array
    theta: jax.Array
    prev_params: PyTree


def sa_sam(
    base_lr: float | jax.Array,
    *,
    form: Form = "paper",
    amplifier: float | jax.Array | None = None,
    damping: float | jax.Array | None = None,
    lr_eps: float | jax.Array | None = None,
    max_lr_factor: float | jax.Array = 10.0,
    rho_scale: float | jax.Array = 1.0,
    axis_name: str | None = None,
    norm_eps: float = DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
    r"""Smoothness-Adaptive SAM (SA-SAM): SAM with the step size of adaptive GD, ρ = √η.

    At step t with params ``x_t``, ``g_t = grads`` and the previous iterate ``x_{t-1}``
    (held in the state; ``x_{-1} = x_0``)::

        g'_t  = grad_fn(x_{t-1})                         # the SAME batch as g_t
        L_t   = ‖x_t − x_{t-1}‖ / (d · ‖g_t − g'_t‖)      # inverse local smoothness
        η_t   = min(η_{t-1} · √(1 + γ θ_{t-1}),  L_t) + ε       if both norms > norm_eps
              = η_{t-1} · √(1 + γ θ_{t-1})                      otherwise (growth only)
        η_t   = min(η_t, max_lr_factor · base_lr)          # optlab's cap (not in the paper)
        θ_t   = η_t / η_{t-1}
        h_t   = grad_fn(x_t + ρ_t g_t / ‖g_t‖)            # the SAM gradient
        update = −η_t · h_t

    Two forms (``form``) set the defaults of ``(γ, d, ε) = (amplifier, damping, lr_eps)``
    and three structural details:

    * ``"paper"`` (default), the published rule (Malitsky–Mishchenko Algorithm 1 inside
      SAM): γ = 1, d = 2, ε = 0; the first step uses η_0 = ``base_lr`` (no estimate yet)
      and leaves θ_0 = +inf, so η_1 is the smoothness estimate alone; ρ_t = c·√η_t.
    * ``"practical"``, the authors' deep-learning code (``Adsgd`` defaults): γ = 0.02,
      d = 1, ε = 1e-8; θ starts at 1 and the rule runs from the first step (Δx = 0 there,
      so η_0 = ``base_lr``·√(1 + γ)); ρ_t = c·√η_{t-1}, from the step size *before* the new
      one is computed (``rho = lr ** 0.5`` in SAM's ``first_step``), off by one against the
      paper.

    Here c = ``rho_scale`` (1 in both). Explicit ``amplifier``/``damping``/``lr_eps``
    override either preset. ``η`` is capped at ``max_lr_factor · base_lr`` (default 10x):
    with θ = +inf or a vanishing ``‖Δg‖`` the rule would otherwise grow without bound (at a
    flat region, or a zero gradient, where only the growth term applies). Norms at or below
    ``norm_eps`` count as zero, so zero ``Δx``, zero ``Δg`` and a zero gradient all give
    finite results (the authors' code tests ``> 0``).

    **Calling convention.** ``update(grads, state, params, *, grad_fn, **extra)`` with
    ``grads`` the gradient at ``params`` and ``grad_fn(params) -> grads`` the gradient of the
    same loss on the *same* batch (closed over it; it must not update BatchNorm
    statistics). ``grad_fn`` is called **twice per update**: at ``x_{t-1}`` for the
    smoothness estimate and at the perturbed point, so a step costs three gradient
    evaluations with the caller's (as in the authors' code; at t=0 the first call is at
    ``x_0`` itself and only keeps the cost constant). ``grads`` must be the raw gradient of
    what ``grad_fn`` computes: a transform chained *before* ``sa_sam`` (clipping, weight
    decay) would change ``g_t`` but not ``g'_t`` and corrupt the estimate. Put an L2
    penalty into the loss instead (the official SAM code does); other extra args are
    ignored. The update is plain SGD with the adaptive η, as in the paper and code. (The
    authors' code adds weight decay to the descent gradient only and clips ``g_t`` but not
    ``g'_t`` when clipping is on; neither is reproduced.)

    **Gradient accumulation.** ``optax.MultiSteps(sa_sam(...), k)`` is refused with a
    ``ValueError`` when traced: MultiSteps forwards the ``grad_fn`` of the last micro-batch
    only, so ``g'_t`` and the SAM gradient would come from one micro-batch while ``g_t`` is
    the mean of k, and the smoothness estimate would mix batches. Call ``update`` once per
    accumulated batch with a whole-batch ``grad_fn`` built micro-batch by micro-batch
    (:func:`optlab.perturbation.microbatched_grad_fn`), passed as both ``grads`` and
    ``grad_fn``: all three gradients are then on the same whole batch.

    **Data parallel** (``axis_name``, under ``jax.shard_map`` or a named ``vmap``): pass the
    worker's *local* ``grads`` and a local ``grad_fn`` (as for :func:`optlab.sam`). The
    gradient difference is ``pmean``-ed before its norm (and ``‖Δx‖²`` too), so ``η``, ``ρ``
    and ``θ`` are the global quantities and identical on all workers; each worker perturbs
    along its own gradient (SAM's default m-sharpness) and the SAM gradient is ``pmean``-ed.
    With already-averaged gradients leave ``axis_name=None``.

    Args:
      base_lr: the initial step size (the only learning-rate hyperparameter), > 0; a float
        or a traced scalar (``optax.inject_hyperparams``). It also sets the cap.
      form: ``"paper"`` or ``"practical"`` (see above).
      amplifier: γ >= 0 in the growth term ``√(1 + γ θ)``; ``None`` takes the form's.
      damping: d > 0 in ``‖Δx‖ / (d ‖Δg‖)``; ``None`` takes the form's.
      lr_eps: ε >= 0 added to η when the smoothness term is active; ``None``: the form's.
      max_lr_factor: cap η <= max_lr_factor · base_lr, >= 1 and finite.
      rho_scale: c >= 0 in ``ρ = c √η`` (1 in the paper; 0 gives SA-SGD, i.e. adaptive GD
        fed ``grad_fn(params)``).
      axis_name: the worker axis for the global smoothness estimate and the ``pmean``.
      norm_eps: norms at or below it count as zero; floor of the SAM gradient norm.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`SASAMState`; the
      current step size is ``state.lr`` (``optax.tree.get(state, "lr")`` through chains).

    Example::

      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = optlab.sa_sam(0.05)
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> for _ in range(3):
      ...     updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
      ...     w = optax.apply_updates(w, updates)
      >>> float(state.lr) > 0.0
      True

    References:
      Naganuma, Kim, Kyrillidis, Mitliagkas, *Smoothness-Adaptive Sharpness-Aware
      Minimization for Finding Flatter Minima*, ICLR 2024 Tiny Papers
      (code: github.com/Hiroki11x/smoothness_aware_sam). Malitsky, Mishchenko, *Adaptive
      Gradient Descent without Descent*, ICML 2020, arXiv:1910.09529.
    """
    if callable(base_lr):
        raise ValueError(
            "base_lr must be a positive number (the step size is adaptive; to schedule the "
            f"initial value and cap use optax.inject_hyperparams), got {base_lr!r}."
        )
    check_float_in_range("base_lr", base_lr, low=0.0, low_inclusive=False)
    if form not in _PRESETS:
        raise ValueError(f"form must be one of {sorted(_PRESETS)}, got {form!r}.")
    preset_amplifier, preset_damping, preset_lr_eps, theta_init = _PRESETS[form]
    amplifier = preset_amplifier if amplifier is None else amplifier
    damping = preset_damping if damping is None else damping
    lr_eps = preset_lr_eps if lr_eps is None else lr_eps
    for name, value, low, low_inclusive in (
        ("amplifier", amplifier, 0.0, True),
        ("damping", damping, 0.0, False),
        ("lr_eps", lr_eps, 0.0, True),
        ("max_lr_factor", max_lr_factor, 1.0, True),
        ("rho_scale", rho_scale, 0.0, True),
        ("norm_eps", norm_eps, 0.0, False),
    ):
        if callable(value):
            raise ValueError(f"{name} must be a number, got {value!r}.")
        check_float_in_range(name, value, low=low, low_inclusive=low_inclusive)
    if axis_name is not None and not isinstance(axis_name, str):
        raise ValueError(f"axis_name must be a string or None, got {axis_name!r}.")
    paper = form == "paper"

    def init_fn(params: PyTree) -> SASAMState:
        dtype = _scalar_dtype(params)
        return SASAMState(
            count=jnp.zeros((), jnp.int32),
            # A copy: under inject_hyperparams base_lr is the state's own hyperparams array.
            lr=jnp.array(base_lr, dtype, copy=True),
            rho=jnp.zeros((), dtype),
            theta=jnp.asarray(theta_init, dtype),
            # A copy: the state must not hold the caller's params buffers (donating both
            # params and state to a jitted step would donate one buffer twice).
            prev_params=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
        )

    def update_fn(
        updates: PyTree,
        state: SASAMState,
        params: PyTree | None = None,
        *,
        grad_fn: Callable[[PyTree], PyTree] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, SASAMState]:
        del extra_args
        if params is None:
            raise ValueError("optlab.sa_sam needs params: call update(grads, state, params, ...).")
        if grad_fn is None:
            raise ValueError(
                "optlab.sa_sam needs the extra argument grad_fn (params -> grads on the same "
                "batch as grads)."
            )
        refuse_inside_multi_steps("optlab.sa_sam")
        dtype = state.lr.dtype
        prev_lr = state.lr

        # The smoothness estimate from two gradients on the same batch, global under pmean.
        prev_grads = grad_fn(state.prev_params)
        grad_diff = pmean(jax.tree.map(_sub, updates, prev_grads), axis_name)
        param_diff = jax.tree.map(_sub, params, state.prev_params)
        # pmean of the square keeps ‖Δx‖ identical on all workers even if params drift apart.
        param_norm = jnp.sqrt(pmean(safe_global_norm(param_diff, norm_eps) ** 2, axis_name))
        grad_norm = safe_global_norm(grad_diff, norm_eps)
        eps = jnp.asarray(norm_eps, dtype)
        active = (param_norm > eps) & (grad_norm > eps)

        growth_factor = jnp.sqrt(1.0 + jnp.asarray(amplifier, dtype) * state.theta)
        # θ = +inf means "no growth limit" even when γ = 0 (0 · inf would be NaN).
        growth = jnp.where(jnp.isinf(state.theta), jnp.inf, prev_lr * growth_factor)
        smooth = param_norm / (jnp.asarray(damping, dtype) * grad_norm)
        lr = jnp.where(active, jnp.minimum(growth, smooth) + jnp.asarray(lr_eps, dtype), growth)
        first = state.count == 0
        if paper:
            lr = jnp.where(first, jnp.asarray(base_lr, dtype), lr)
        lr = jnp.minimum(lr, jnp.asarray(max_lr_factor, dtype) * jnp.asarray(base_lr, dtype))
        theta = lr / prev_lr
        if paper:
            theta = jnp.where(first, jnp.asarray(jnp.inf, dtype), theta)
        lr, theta = lr.astype(dtype), theta.astype(dtype)

        rho = jnp.asarray(rho_scale, dtype) * jnp.sqrt(lr if paper else prev_lr)
        sam_grads = grad_at_point(
            grad_fn, params, updates, sharpness_point(rho, eps=norm_eps), axis_name=axis_name
        )
        new_updates = jax.tree.map(
            lambda h: (-lr * h.astype(jnp.promote_types(h.dtype, dtype))).astype(h.dtype),
            sam_grads,
        )
        new_state = SASAMState(
            count=optax.safe_increment(state.count),
            lr=lr,
            rho=rho.astype(dtype),
            theta=theta,
            prev_params=params,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scalar_dtype(params: PyTree) -> Any:
    leaves = jax.tree.leaves(params)
    return jnp.promote_types(jnp.result_type(*leaves) if leaves else jnp.float32, jnp.float32)


def _sub(a: jax.Array, b: jax.Array) -> jax.Array:
    dtype = jnp.promote_types(a.dtype, jnp.float32)
    return a.astype(dtype) - b.astype(dtype)

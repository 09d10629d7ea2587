"""SAM and ASAM as one drop-in optax transform with a ``grad_fn`` extra argument.

One call of ``update`` per training step does the whole SAM step: it takes the gradient at
the ascent point ``params + eps`` through ``grad_fn`` and feeds that gradient to the base
optimizer. The training loop never sees the perturbed parameters (unlike
``optax.contrib.sam``'s default transparent mode), so BatchNorm statistics, EMAs and
checkpoints see only real iterates. Built on :mod:`optlab.perturbation`.

References:
  P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur. *Sharpness-Aware Minimization for
  Efficiently Improving Generalization.* ICLR 2021. arXiv:2010.01412.

  J. Kwon, J. Kim, H. Park, I. K. Choi. *ASAM: Adaptive Sharpness-Aware Minimization for
  Scale-Invariant Learning of Deep Neural Networks.* ICML 2021. arXiv:2102.11600.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optlab.perturbation import (
    DEFAULT_EPS,
    grad_at_point,
    refuse_inside_multi_steps,
    sharpness_point,
)
from optlab.validation import check_float_in_range, check_int_in_range

__all__ = ["SAMState", "asam_scale", "asam_weight_mask", "sam"]

PyTree = Any
Mask = bool | PyTree | Callable[[PyTree], PyTree] | None


class SAMState(NamedTuple):
    """State of :func:`sam`.

    Attributes:
      count: number of ``update`` calls so far (int32); the step at which ``rho`` is
        evaluated when it is a schedule.
      base_state: the base optimizer's state.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    base_state: optax.OptState


def asam_weight_mask(params: PyTree) -> PyTree:
    """The leaves ASAM's official code normalises: every weight, no bias.

    The official ASAM code (SamsungLabs/ASAM, ``ascent_step``) applies ``T = |w| + eta`` to
    the parameters whose name contains ``weight`` (PyTorch's linear/conv weights *and* the
    BatchNorm/LayerNorm scales) and ``T = 1`` to the biases. In pytree terms:

    * a leaf is a **bias** (``False``) when one of the names on its path, split at ``.``
      and ``/``, is ``bias`` (flax linen/nnx, equinox and PyTorch-converted names; dict keys
      and attribute names count, sequence indices do not);
    * any other leaf with a name on its path is a **weight** (``True``): kernels,
      embeddings, norm scales, and also a 1-D leaf named ``b`` (haiku's bias name is not
      recognised: pass ``adaptive_mask`` there);
    * a leaf with **no name** on its path (a bare array, or inside lists/tuples only) is a
      weight when ``ndim >= 2`` and a bias otherwise.

    Args:
      params: the parameter pytree (only its structure, names and shapes are read).

    Returns:
      A params-shaped tree of Python bools, usable as ``adaptive_mask``.
    """

    def names(path: tuple[Any, ...]) -> list[str]:
        found = []
        for entry in path:
            if isinstance(entry, jax.tree_util.DictKey) and isinstance(entry.key, str):
                found.append(entry.key)
            elif isinstance(entry, jax.tree_util.GetAttrKey):
                found.append(entry.name)
        return [part for name in found for part in name.replace("/", ".").split(".")]

    def is_weight(path: tuple[Any, ...], leaf: Any) -> bool:
        named = names(path)
        if named:
            return "bias" not in named
        return jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(is_weight, params)


def asam_scale(adaptive_eps: Any = 0.01, mask: Mask = None) -> Callable[[PyTree], PyTree]:
    """ASAM's elementwise normalisation operator ``T(p) = |p| + adaptive_eps``.

    Leaves where ``mask`` is ``False`` use ``T = 1``.

    Args:
      adaptive_eps: the offset η of ``|p| + η`` (may be traced).
      mask: ``None`` for the official ASAM rule, :func:`asam_weight_mask` (weights yes,
        biases no); ``True``/``False`` for every/no leaf; a params-shaped tree of Python
        bools; or a callable ``params -> tree of bools``, as in ``optax.masked``.

    Returns:
      ``scale(params) -> T``, a params-shaped tree.
    """

    def scale(params: PyTree) -> PyTree:
        resolved = mask(params) if callable(mask) else mask
        if resolved is None:
            resolved = asam_weight_mask(params)
        elif isinstance(resolved, bool):
            resolved = jax.tree.map(lambda _, use=resolved: use, params)

        def one(p: jax.Array, use: bool) -> jax.Array:
            if use:
                return jnp.abs(p) + jnp.asarray(adaptive_eps, p.dtype)
            return jnp.ones_like(p)

        return jax.tree.map(one, params, resolved)

    return scale


def sam(
    base: optax.GradientTransformation,
    rho: float | jax.Array | optax.Schedule = 0.05,
    *,
    adaptive: bool = False,
    adaptive_eps: float | jax.Array = 0.01,
    adaptive_mask: Mask = None,
    groups: int | None = None,
    axis_name: str | None = None,
    norm_eps: float = DEFAULT_EPS,
    vectorize_groups: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-Aware Minimization (SAM), or ASAM with ``adaptive=True``.

    With ``g = grads`` the gradient at the params ``x`` on the current batch, each update does

    .. math::

      \hat\epsilon = \rho\, \frac{T_x^2\, g}{\max(\|T_x g\|_2, \epsilon_{\text{norm}})},
      \qquad h = \nabla L_B(x + \hat\epsilon), \qquad
      \text{updates} = \mathrm{base}(h)

    with ``T = I`` for SAM and ``T = diag(|x| + adaptive_eps)`` for ASAM.

    **Which ASAM.** The default follows the official ASAM code (SamsungLabs/ASAM,
    ``ascent_step``): ``T = |x| + η`` (η = ``adaptive_eps``, default 0.01) on the weights
    (kernels, embeddings, norm scales) and ``T = 1`` on the biases, chosen by name as
    :func:`optlab.asam_weight_mask` documents (a leaf whose path names ``bias`` is a bias; a
    leaf without any name is a weight iff ``ndim >= 2``). ``adaptive_mask`` overrides the
    rule. The popular third-party implementation (davda54/sam, ``adaptive=True``) uses
    ``T = |x|`` on every tensor, biases included: ``adaptive_mask=True, adaptive_eps=0.0``.
    (Until this default, ``|x| + η`` applied to every leaf, which matches neither code base
    and barely perturbs zero-initialised biases; ``adaptive_mask=True`` gives it back.)

    The norm is global over the whole tree and floored at ``norm_eps``
    (:func:`optlab.safe_global_norm`), so a zero gradient gives ``eps = 0`` and finite
    updates (``optax.contrib.normalize`` gives NaN there). ``rho = 0`` is the base
    optimizer fed ``grad_fn(params)``.

    **Calling convention.** ``update(grads, state, params, *, grad_fn, **extra)`` with
    ``grad_fn(params) -> grads`` on the *same* batch (closed over it; it must not update
    BatchNorm statistics). ``grad_fn`` is called once per update (2m times on 1/m of the
    batch with ``groups=m``). All extra args, ``grad_fn`` included, are forwarded to
    ``base``. The base optimizer also receives the true ``params``.

    **m-sharpness.** ``groups=m`` splits the batch into m groups, each perturbed from its own
    gradient, and averages the m SAM gradients. ``grad_fn`` must then take a group index,
    ``grad_fn(params, k)`` for ``k`` in ``[0, m)`` (an int32 scalar, possibly traced); build
    it with :func:`optlab.perturbation.group_grad_fn`. ``grads`` is not used in that mode.

    **Data parallel** (``axis_name``, under ``jax.shard_map`` or a named ``vmap``): as in the
    official SAM code (``sync_perturbations=False``) each worker perturbs from its *local*
    gradient and only the final SAM gradient is ``pmean``-ed. Pass the local ``grads`` and a
    local ``grad_fn`` (``optlab.data_parallel_value_and_grad(..., average=False)``). With
    already-averaged gradients leave ``axis_name=None``: the perturbation is then global.

    **Composition.** Put clipping, weight decay and the learning rate *inside* ``base``
    (``sam(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)))``) to act on the
    SAM gradient, as the official code clips after the final ``pmean``. A transform chained
    *before* ``sam`` only changes the first gradient, which SAM uses for its direction only
    (a global clip before ``sam`` has no effect).

    **Gradient accumulation.** ``optax.MultiSteps(sam(...), k)`` is refused with a
    ``ValueError`` when traced: MultiSteps forwards the ``grad_fn`` of the last micro-batch
    only, so the SAM gradient would silently drop the other micro-batches. Either call
    ``update`` once per accumulated batch with a whole-batch ``grad_fn`` built micro-batch by
    micro-batch (:func:`optlab.perturbation.microbatched_grad_fn`, passed as the gradient and
    as ``grad_fn``: exact SAM on the whole batch), or put MultiSteps inside,
    ``sam(optax.MultiSteps(base, k), rho)``: each micro-batch is perturbed from its own
    gradient and MultiSteps averages the k SAM gradients (m-sharpness over micro-batches; the
    params, and so the ascent points, stay fixed within the k micro-steps). In that form
    ``update`` runs per micro-step, so a ``rho`` schedule counts micro-steps (pass
    ``lambda t: schedule(t // k)`` to count optimizer steps).

    Args:
      base: the optimizer fed the SAM gradient (plain or extra-args).
      rho: the radius ρ >= 0; a float, a traced scalar or a schedule ``count -> rho``.
      adaptive: ASAM instead of SAM.
      adaptive_eps: ASAM's η >= 0 in ``T = |x| + η`` (official default 0.01).
      adaptive_mask: where ``T`` applies with ``adaptive=True``: ``None`` (the official
        rule, :func:`optlab.asam_weight_mask`), ``True`` (every leaf), a params-shaped tree
        of bools or a callable ``params -> tree of bools`` (see :func:`asam_scale`). A
        callable mask must be listed in ``static_args`` of ``optax.inject_hyperparams``
        (which otherwise takes every callable for a schedule).
      groups: ``None``, or m >= 1 for m-sharpness with a group-indexed ``grad_fn``. A
        structural integer: with ``optax.inject_hyperparams`` list it in ``static_args``.
      axis_name: the worker axis for per-worker perturbations and the final ``pmean``.
      norm_eps: floor of the gradient norm.
      vectorize_groups: run the m groups with ``vmap`` (m times the memory) instead of a
        sequential loop.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`SAMState`.

    Example::

      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = optlab.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
      >>> w = optax.apply_updates(w, updates)
      >>> print(w.round(4))  # -0.1 x the gradient at the ascent point, not at w = 0
      [0.2058 0.2058 0.2058]

    References:
      Foret et al., *Sharpness-Aware Minimization for Efficiently Improving
      Generalization*, ICLR 2021, arXiv:2010.01412. Kwon et al., *ASAM: Adaptive
      Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks*,
      ICML 2021, arXiv:2102.11600.
    """
    check_float_in_range("rho", rho, low=0.0)
    check_float_in_range("adaptive_eps", adaptive_eps, low=0.0)
    check_float_in_range("norm_eps", norm_eps, low=0.0, low_inclusive=False)
    if groups is not None:
        groups = check_int_in_range("groups", groups, min_value=1)
    base = optax.with_extra_args_support(base)
    scale = asam_scale(adaptive_eps, adaptive_mask) if adaptive else None

    def init_fn(params: PyTree) -> SAMState:
        return SAMState(count=jnp.zeros((), jnp.int32), base_state=base.init(params))

    def update_fn(
        updates: PyTree,
        state: SAMState,
        params: PyTree | None = None,
        *,
        grad_fn: Callable[..., PyTree] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, SAMState]:
        if params is None:
            raise ValueError("optlab.sam needs params: call update(grads, state, params, ...).")
        if grad_fn is None:
            raise ValueError(
                "optlab.sam needs the extra argument grad_fn (params -> grads on the same "
                "batch; grad_fn(params, group) with groups set)."
            )
        refuse_inside_multi_steps(
            "optlab.sam",
            "; or put MultiSteps inside, optlab.sam(optax.MultiSteps(base, k), rho), to take "
            "each micro-batch's gradient at its own ascent point and average those "
            "(m-sharpness over micro-batches)",
        )
        rho_t = rho(state.count) if callable(rho) else rho
        sam_grads = grad_at_point(
            grad_fn,
            params,
            updates,
            sharpness_point(rho_t, scale=scale, eps=norm_eps),
            groups=groups,
            axis_name=axis_name,
            vectorize=vectorize_groups,
        )
        new_updates, base_state = base.update(
            sam_grads, state.base_state, params, grad_fn=grad_fn, **extra_args
        )
        return new_updates, SAMState(count=optax.safe_increment(state.count), base_state=base_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

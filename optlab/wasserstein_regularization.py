"""Regularization toward the initialisation: Wasserstein (distribution) and L2 (weights).

Both are gradient-adding transforms placed before the base optimizer (like
``optax.add_decayed_weights``) that take a snapshot of the params at ``init``:

- :func:`wasserstein_regularization` pulls each tensor's *sorted* weights toward its sorted
  initial weights: the squared 2-Wasserstein distance between the two empirical 1-D
  distributions, which leaves the weights free to permute;
- :func:`l2_init_regularization` pulls every weight toward its own initial value (L2 Init),
  the baseline that pins each weight.

References:
  A. Lewandowski, H. Tanaka, D. Schuurmans, M. C. Machado. *Curvature Explains Loss of
  Plasticity.* arXiv:2312.00246 (2023); A. Lewandowski, M. Bortkiewicz, S. Kumar,
  A. György, D. Schuurmans, M. Ostaszewski, M. C. Machado. *Learning Continually by
  Spectral Regularization.* arXiv:2406.06811 v1 (2024) (the Wasserstein regularizer).

  S. Kumar, H. Marklund, B. Van Roy. *Maintaining Plasticity in Continual Learning via
  Regenerative Regularization.* arXiv:2308.11958 (2023) (L2 Init).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optlab.spectral_regularization import _mask_leaves, check_scalar

__all__ = [
    "L2InitRegularizationState",
    "WassersteinRegularizationState",
    "l2_init_regularization",
    "wasserstein_regularization",
]

PyTree = Any
Mask = PyTree | Callable[[PyTree], PyTree] | None


class WassersteinRegularizationState(NamedTuple):
    """State of :func:`wasserstein_regularization`.

    Attributes:
      sorted_init: per regularized leaf, its initial values flattened and sorted
        (ascending), shape ``(size,)``; ``None`` at leaves that are not regularized.
    """

    sorted_init: PyTree


class L2InitRegularizationState(NamedTuple):
    """State of :func:`l2_init_regularization`.

    Attributes:
      init_params: per regularized leaf, a copy of its initial value; ``None`` elsewhere.
    """

    init_params: PyTree


def _is_none(x: Any) -> bool:
    return x is None


def _flags(mask: Mask, params: PyTree) -> list[bool]:
    resolved = True if mask is None else (mask(params) if callable(mask) else mask)
    treedef: Any = jax.tree.structure(params)
    if isinstance(resolved, bool):
        return [resolved] * treedef.num_leaves
    return _mask_leaves(resolved, treedef)


def _snapshot(params: PyTree, mask: Mask, fn: Callable[[jax.Array], jax.Array]) -> PyTree:
    leaves, treedef = jax.tree.flatten(params)
    flags = _flags(mask, params)
    snapshots = [fn(p) if on else None for p, on in zip(leaves, flags, strict=True)]
    return jax.tree.unflatten(treedef, snapshots)


def _add(
    name: str, strength: Any, anchors: PyTree, updates: PyTree, params: PyTree | None, target_fn
) -> PyTree:
    if params is None:
        raise ValueError(f"{name} needs params: call update(grads, state, params).")

    def leaf(anchor, g, p):
        if anchor is None:
            return g
        lam = jnp.asarray(strength, anchor.dtype)
        p32 = p.astype(anchor.dtype)
        grad = 2.0 * lam * (p32 - target_fn(p32, anchor))
        return g + grad.astype(g.dtype)

    return jax.tree.map(leaf, anchors, updates, params, is_leaf=_is_none)


def _check_mask(mask: Mask) -> None:
    if mask is not None and isinstance(mask, bool) and not mask:
        raise ValueError("mask=False regularizes nothing; drop the transform instead.")


def wasserstein_regularization(
    strength: Any, *, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
    r"""Adds the gradient of the Wasserstein regularizer toward the initial weight distribution.

    For each regularized tensor :math:`\theta` with :math:`n` entries and initial value
    :math:`\theta^0` (the params given to ``init``), with :math:`\theta_{(j)}` the
    :math:`j`-th smallest entry, the penalty is

    .. math::

      R(\theta) = \lambda \sum_{j=1}^{n} \bigl(\theta_{(j)} - \theta^0_{(j)}\bigr)^2
        = \lambda \, n \, W_2^2\bigl(\hat P_\theta, \hat P_{\theta^0}\bigr),

    :math:`n` times the squared 2-Wasserstein distance between the empirical distributions
    of the entries (in 1-D the optimal coupling matches order statistics). Its gradient,
    added to the incoming one, is

    .. math::

      g_i \leftarrow g_i + 2 \lambda \bigl(\theta_i - \theta^0_{(r_i)}\bigr),

    where :math:`r_i` is the rank of :math:`\theta_i` in the current tensor (ties broken by
    position, a stable sort). The state keeps the sorted initial values; each update sorts
    the current ones (:math:`O(n \log n)`).

    **Which tensors** (``mask``): by default every leaf (kernels and biases), each its own
    distribution, as L2 Init regularizes every parameter. **Placement**: before the base
    optimizer (a loss term, as in the papers). Needs ``params``.

    Args:
      strength: :math:`\lambda \ge 0`, a float or a traced scalar (for a schedule, wrap
        the factory in ``optax.inject_hyperparams``).
      mask: ``None`` (every leaf), ``True``, a params-shaped tree of bools, or a callable
        ``params -> tree of bools`` (list it in ``static_args`` of
        ``optax.inject_hyperparams``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra args are ignored) whose ``update``
      needs ``params``.

    Example (a permutation of the initial weights costs nothing; a shift does):
      >>> import jax.numpy as jnp, optax, optlab
      >>> tx = optlab.wasserstein_regularization(0.5)
      >>> state = tx.init({"w": jnp.array([0.0, 1.0, 2.0])})
      >>> zero = {"w": jnp.zeros(3)}
      >>> tx.update(zero, state, {"w": jnp.array([2.0, 0.0, 1.0])})[0]["w"]
      Array([0., 0., 0.], dtype=float32)
      >>> tx.update(zero, state, {"w": jnp.array([2.5, 0.5, 1.5])})[0]["w"]
      Array([0.5, 0.5, 0.5], dtype=float32)

    References:
      Lewandowski, Tanaka, Schuurmans, Machado. *Curvature Explains Loss of Plasticity.*
      arXiv:2312.00246 (2023).

      Lewandowski, Bortkiewicz, Kumar, György, Schuurmans, Ostaszewski, Machado.
      *Learning Continually by Spectral Regularization.* arXiv:2406.06811 v1 (2024).
    """
    strength = check_scalar("strength", strength, low=0.0)
    _check_mask(mask)

    def init_fn(params: PyTree) -> WassersteinRegularizationState:
        return WassersteinRegularizationState(
            sorted_init=_snapshot(
                params,
                mask,
                lambda p: jnp.sort(jnp.ravel(p).astype(jnp.promote_types(p.dtype, jnp.float32))),
            )
        )

    def target(p: jax.Array, sorted_init: jax.Array) -> jax.Array:
        flat = jnp.ravel(p)
        ranks_order = jnp.argsort(flat, stable=True)  # ranks_order[j]: index of the j-th smallest
        target = jnp.zeros_like(flat).at[ranks_order].set(sorted_init, unique_indices=True)
        return target.reshape(p.shape)

    def update_fn(
        updates: PyTree,
        state: WassersteinRegularizationState,
        params: PyTree | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, WassersteinRegularizationState]:
        del extra_args
        out = _add(
            "wasserstein_regularization", strength, state.sorted_init, updates, params, target
        )
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def l2_init_regularization(
    strength: Any, *, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
    r"""Adds the gradient of L2 regularization toward the initial params (L2 Init).

    With :math:`\theta^0` the params given to ``init``, the penalty and the added gradient
    are

    .. math::

      R(\theta) = \lambda \, \|\theta - \theta^0\|_2^2, \qquad
      g \leftarrow g + 2 \lambda (\theta - \theta^0)

    (the same scale convention as :func:`wasserstein_regularization`; Kumar et al.'s
    regenerative regularization). It pins each weight to its own initial value, where the
    Wasserstein regularizer only pins their distribution.

    Args:
      strength: :math:`\lambda \ge 0`, a float or a traced scalar.
      mask: ``None`` (every leaf), ``True``, a params-shaped tree of bools, or a callable
        ``params -> tree of bools``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra args are ignored) whose ``update``
      needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optlab
      >>> tx = optlab.l2_init_regularization(0.5)
      >>> state = tx.init({"w": jnp.array([0.0, 1.0])})
      >>> tx.update({"w": jnp.zeros(2)}, state, {"w": jnp.array([1.0, 0.0])})[0]["w"]
      Array([ 1., -1.], dtype=float32)

    Reference:
      Kumar, Marklund, Van Roy. *Maintaining Plasticity in Continual Learning via
      Regenerative Regularization.* arXiv:2308.11958 (2023).
    """
    strength = check_scalar("strength", strength, low=0.0)
    _check_mask(mask)

    def init_fn(params: PyTree) -> L2InitRegularizationState:
        # A real copy: a donated params buffer must not be the state's.
        return L2InitRegularizationState(
            init_params=_snapshot(
                params,
                mask,
                lambda p: jnp.array(p, dtype=jnp.promote_types(p.dtype, jnp.float32), copy=True),
            )
        )

    def update_fn(
        updates: PyTree,
        state: L2InitRegularizationState,
        params: PyTree | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, L2InitRegularizationState]:
        del extra_args
        out = _add(
            "l2_init_regularization",
            strength,
            state.init_params,
            updates,
            params,
            lambda p, anchor: anchor,
        )
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

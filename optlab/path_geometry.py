"""Gradient geometry along an optimisation path: RSI, EB and the locally optimal step size.

A measurement, not an update: :func:`path_geometry` compares a direction (the mini-batch
gradient a step used, or the step's own update) at the iterate ``w`` with the direction to a
reference point ``w*``, usually the final iterate of a first, complete run replayed step by
step (see ``experiments.train.replay``). It is a pure function of three pytrees of the same
structure and runs under ``jax.jit`` and ``jax.vmap``.

The quantities are those of Guille-Escuret et al. (2024). Their official code
(``src/utils/calc.py`` of LossLandscapeGeometry) logs the raw triple ``‖w − w*‖``, ``‖G‖``
and ``⟨G, w − w*⟩`` over the concatenation of all parameters and forms the ratios
afterwards; this module returns the triple and the ratios with the paper's normalisation:
RSI divided by ``‖w − w*‖²`` and EB by ``‖w − w*‖``, so that RSI ≥ μ and EB ≤ L are the
restricted secant inequality and the error bound.

Reference:
  C. Guille-Escuret, H. Naganuma, K. Fatras, I. Mitliagkas. *No Wrong Turns: The Simple
  Geometry Of Neural Networks Optimization Paths.* ICML 2024 (PMLR 235). arXiv:2306.11922.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optlab.validation import check_float_in_range

__all__ = ["PathGeometry", "path_geometry"]

PyTree = Any


class PathGeometry(NamedTuple):
    """The geometry of one direction ``G`` at ``w`` against a reference ``w*``.

    Every field is a scalar in the accumulation dtype (float32 at least, float64 when a
    leaf is float64). With ``d = w − w*``:

    Attributes:
      rsi: ``⟨G, d⟩ / ‖d‖²``, the restricted-secant-inequality quantity (lower bound μ).
      eb: ``‖G‖ / ‖d‖``, the error-bound quantity (upper bound L).
      cosine: ``rsi / eb = ⟨G, d⟩ / (‖G‖ ‖d‖)``, the cosine between ``G`` and ``d``
        (γ in the paper); positive when a step along ``−G`` moves toward ``w*``.
      optimal_lr: ``rsi / eb² = ⟨G, d⟩ / ‖G‖²``, the step size that brings ``w − η G``
        closest to ``w*`` (the locally optimal learning rate); one such step shrinks
        ``‖d‖²`` by the factor ``1 − cosine²``.
      inner: ``⟨G, d⟩``.
      grad_norm: ``‖G‖``.
      distance: ``‖d‖ = ‖w − w*‖``.
    """

    rsi: jax.Array
    eb: jax.Array
    cosine: jax.Array
    optimal_lr: jax.Array
    inner: jax.Array
    grad_norm: jax.Array
    distance: jax.Array


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator``, and 0 where the denominator is 0 (no NaN, no NaN grad)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x >= 0`` whose derivative at 0 is 0 rather than NaN."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def path_geometry(
    grads: PyTree,
    params: PyTree,
    reference: PyTree,
    *,
    weight_decay: float | jax.Array = 0.0,
) -> PathGeometry:
    """RSI, EB, their ratio (the cosine) and the locally optimal step size at ``params``.

    With ``G = grads + weight_decay · params`` and ``d = params − reference``, all inner
    products and norms taken over the whole pytree (every leaf flattened and concatenated,
    as the official code concatenates ``model.parameters()``)::

        rsi        = ⟨G, d⟩ / ‖d‖²
        eb         = ‖G‖ / ‖d‖
        cosine     = rsi / eb  = ⟨G, d⟩ / (‖G‖ ‖d‖)
        optimal_lr = rsi / eb² = ⟨G, d⟩ / ‖G‖²

    Since ``‖w − ηG − w*‖² = ‖d‖² − 2η⟨G, d⟩ + η²‖G‖²``, ``optimal_lr`` minimises the
    distance to ``w*`` after one step along ``−G``, and the step with it multiplies ``‖d‖²``
    by ``1 − cosine²``. Pass the step's update ``u`` as ``grads=-u`` to measure the
    direction an optimizer actually took (momentum, Adam).

    Ratios whose denominator is exactly zero are reported as 0, never NaN or inf: at
    ``params == reference`` (``‖d‖ = 0``) ``rsi``, ``eb`` and ``cosine`` are 0, and a zero
    ``G`` gives ``cosine = optimal_lr = 0``. Close to the reference they grow like
    ``1/‖d‖`` (the bias of measuring against the path's own end point).

    Args:
      grads: the direction ``G`` (typically the mini-batch gradient of the loss without
        weight decay), a pytree of floating-point arrays shaped like ``params``.
      params: the iterate ``w``.
      reference: the reference point ``w*``, same structure and shapes.
      weight_decay: λ ≥ 0; ``G`` becomes ``grads + λ · params`` (the official code's second
        set of metrics, for a loss with an L2 term ``λ/2 ‖w‖²`` over all parameters). May
        be traced.

    Returns:
      A :class:`PathGeometry` of scalars.

    Raises:
      ValueError: if the three trees differ in structure or shapes, a leaf is not
        floating-point, or ``weight_decay`` is negative.

    Example (the quadratic ``f(w) = ½ wᵀ diag(4, 1) w``, whose minimiser ``w* = 0`` is
    known: at ``w = (1, 1)`` the gradient is ``(4, 1)``):

      >>> import jax, jax.numpy as jnp, optlab
      >>> w = {"w": jnp.array([1.0, 1.0])}
      >>> g = jax.grad(lambda p: 0.5 * (4 * p["w"][0] ** 2 + p["w"][1] ** 2))(w)
      >>> geo = jax.jit(optlab.path_geometry)(g, w, {"w": jnp.zeros(2)})
      >>> print(f"{geo.rsi:.3f} {geo.eb:.3f} {geo.cosine:.3f} {geo.optimal_lr:.3f}")
      2.500 2.915 0.857 0.294

    Reference:
      C. Guille-Escuret, H. Naganuma, K. Fatras, I. Mitliagkas. *No Wrong Turns: The Simple
      Geometry Of Neural Networks Optimization Paths.* ICML 2024 (PMLR 235).
      arXiv:2306.11922.
    """
    weight_decay = check_float_in_range("weight_decay", weight_decay, low=0.0)
    g_leaves, treedef = jax.tree.flatten(grads)
    for name, tree in (("params", params), ("reference", reference)):
        other = jax.tree.structure(tree)
        if other != treedef:  # type: ignore[operator]  # PyTreeDef's stub lacks __ne__
            raise ValueError(
                f"{name} must have the structure of grads, got {other} against {treedef}."
            )
    w_leaves, r_leaves = jax.tree.leaves(params), jax.tree.leaves(reference)
    for i, (g, w, r) in enumerate(zip(g_leaves, w_leaves, r_leaves, strict=True)):
        shapes = {jnp.shape(g), jnp.shape(w), jnp.shape(r)}
        if len(shapes) != 1:
            raise ValueError(
                f"grads, params and reference must have equal leaf shapes, got "
                f"{jnp.shape(g)}, {jnp.shape(w)}, {jnp.shape(r)} at leaf {i}."
            )
        for name, x in (("grads", g), ("params", w), ("reference", r)):
            if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
                raise ValueError(
                    f"{name} must hold floating-point arrays, got {jnp.result_type(x)} at leaf {i}."
                )
    dtype = jnp.result_type(jnp.float32, *g_leaves, *w_leaves, *r_leaves)
    inner = jnp.zeros((), dtype)
    grad_sq = jnp.zeros((), dtype)
    dist_sq = jnp.zeros((), dtype)
    for g, w, r in zip(g_leaves, w_leaves, r_leaves, strict=True):
        w = w.astype(dtype)
        g = g.astype(dtype) + weight_decay * w
        d = w - r.astype(dtype)
        inner += jnp.sum(g * d)
        grad_sq += jnp.sum(g * g)
        dist_sq += jnp.sum(d * d)
    grad_norm, distance = _safe_sqrt(grad_sq), _safe_sqrt(dist_sq)
    return PathGeometry(
        rsi=_safe_divide(inner, dist_sq),
        eb=_safe_divide(grad_norm, distance),
        cosine=_safe_divide(inner, grad_norm * distance),
        optimal_lr=_safe_divide(inner, grad_sq),
        inner=inner,
        grad_norm=grad_norm,
        distance=distance,
    )

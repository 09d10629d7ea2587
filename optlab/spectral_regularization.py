"""Spectral regularization: keep every layer's largest singular value near 1.

A gradient-adding transform placed before the base optimizer (like
``optax.add_decayed_weights``): it adds the gradient of

.. math::

  \\lambda \\sum_\\ell \\bigl(\\sigma_{\\max}(W_\\ell)^k - 1\\bigr)^2

to the incoming gradient, with :math:`\\sigma_{\\max}` estimated by one persistent power
iteration per step and per matrix (the ``u``/``v`` vectors live in the state, as in
spectral normalisation), and its gradient taken in closed form,
:math:`\\partial\\sigma_{\\max}/\\partial W = u v^\\top`. :func:`spectral_norms` measures the
exact :math:`\\sigma_{\\max}` of every matrix (an SVD), for logging.

Reference:
  A. Lewandowski, M. Bortkiewicz, S. Kumar, A. György, D. Schuurmans, M. Ostaszewski,
  M. C. Machado. *Learning Continually by Spectral Regularization.* ICLR 2025.
  arXiv:2406.06811.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optlab.validation import check_float_in_range, check_injectable_int

__all__ = ["SpectralRegularizationState", "spectral_norms", "spectral_regularization"]

PyTree = Any
Mask = PyTree | Callable[[PyTree], PyTree] | None

_TINY = 1e-30  # below this norm a power-iteration vector keeps its previous direction


class SpectralRegularizationState(NamedTuple):
    """State of :func:`spectral_regularization`.

    Attributes:
      u: per regularized matrix ``W`` (a kernel viewed as ``(fan_in, fan_out)``), the unit
        estimate of its top left singular vector, shape ``(fan_in,)``; ``None`` at leaves
        that are not regularized.
      v: the same for the top right singular vector, shape ``(fan_out,)``.
      sigma: the power iteration's latest estimate of ``sigma_max`` per matrix, as of the
        params of the last update (0 before the first update); ``None`` elsewhere.
    """

    u: PyTree
    v: PyTree
    sigma: PyTree


def default_spectral_mask(params: PyTree) -> PyTree:
    """The leaves the regularizer treats as matrices: every leaf with ``ndim >= 2``.

    Dense kernels ``(in, out)`` and convolution kernels ``(kh, kw, in, out)`` (flax layout)
    are matrices; biases and norm scales (1-D) are not.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def as_matrix(leaf: jax.Array) -> jax.Array:
    """A kernel as a 2-D matrix: every axis but the last (the output axis) flattened.

    For a flax convolution kernel ``(kh, kw, in, out)`` this is ``(kh * kw * in, out)``,
    the transpose of PyTorch's ``weight.reshape(out, -1)`` used by spectral normalisation,
    so it has the same singular values.
    """
    return jnp.reshape(leaf, (-1, leaf.shape[-1]))


def _resolve_mask(mask: Mask, params: PyTree) -> PyTree:
    resolved = default_spectral_mask(params) if mask is None else mask
    if callable(resolved):
        resolved = resolved(params)
    return resolved


def check_scalar(name: str, value: Any, *, low: float) -> Any:
    """A float knob ``>= low`` (concrete or traced); schedules are refused with the fix."""
    if callable(value):
        raise ValueError(
            f"{name} must be a number or a traced scalar, got the callable {value!r}; for a "
            f"schedule wrap the factory: optax.inject_hyperparams(...)({name}=schedule)."
        )
    return check_float_in_range(name, value, low=low)


class _Leaf:
    """One leaf's results (a plain class, so ``jax.tree.map`` treats it as a leaf)."""

    def __init__(self, update: Any, u: Any, v: Any, sigma: Any):
        self.update, self.u, self.v, self.sigma = update, u, v, sigma


def _mask_leaves(resolved: PyTree, treedef: Any) -> list[bool]:
    """The mask's bools in the params' leaf order (the mask has the params' structure)."""
    flags = jax.tree.leaves(resolved)
    if len(flags) != treedef.num_leaves:
        raise ValueError(
            f"mask must have the params' structure (one bool per leaf), got {len(flags)} "
            f"bools for {treedef.num_leaves} leaves."
        )
    return [bool(f) for f in flags]


def _is_none(x: Any) -> bool:
    return x is None


def _normalize(x: jax.Array, previous: jax.Array) -> jax.Array:
    """``x / |x|``, or ``previous`` where ``|x|`` is (almost) zero: a zero matrix keeps the
    unit vectors finite and usable once it becomes non-zero."""
    norm = jnp.linalg.norm(x)
    safe = jnp.where(norm > _TINY, norm, 1.0)
    return jnp.where(norm > _TINY, x / safe, previous)


def power_iteration_step(
    matrix: jax.Array, u: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One power iteration on ``matrix`` from ``u``: ``v <- W^T u / |.|``, ``u <- W v / |.|``.

    Returns ``(u, v, sigma)`` with ``sigma = u^T W v = |W v| >= 0``, computed in (at least)
    float32.
    """
    v = _normalize(matrix.T @ u, v)
    wv = matrix @ v
    sigma = jnp.linalg.norm(wv)
    u = _normalize(wv, u)
    return u, v, sigma


def spectral_regularization(
    strength: Any,
    *,
    power: Any = 2.0,
    mask: Mask = None,
    bias_strength: Any = 0.0,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Adds the gradient of the spectral regularizer of Lewandowski et al. (ICLR 2025).

    With :math:`\lambda` = ``strength`` and :math:`k` = ``power``, the penalty is

    .. math::

      R(x) = \lambda \sum_{W \in \text{matrices}} \bigl(\sigma_{\max}(W)^k - 1\bigr)^2
        \;+\; \lambda_b \sum_{b \in \text{vectors}} \|b\|_2^{2k},

    and each update adds its gradient to the incoming one. Per matrix, with the state's
    unit vectors ``u``, ``v`` (one power iteration per step, on the current params):

    .. math::

      v \leftarrow \frac{W^\top u}{\|W^\top u\|}, \quad
      u \leftarrow \frac{W v}{\|W v\|}, \quad \sigma = u^\top W v, \quad
      g_W \leftarrow g_W + 2 \lambda k \, (\sigma^k - 1)\, \sigma^{k-1} \, u v^\top,

    the closed-form gradient :math:`\partial \sigma_{\max} / \partial W = u v^\top` (not the
    zero gradient of a stopped :math:`\sigma`). A kernel of rank > 2 is viewed as a matrix
    with every axis but the last (the output axis) flattened, as spectral normalisation
    does. A zero matrix gives a finite update (its vectors keep their direction).

    **Which tensors** (``mask``): by default every leaf with ``ndim >= 2`` (dense and
    convolution kernels), no bias, no norm scale. No official code was found; the bias
    term :math:`\|b\|^{2k}` (toward 0) follows a third-party reimplementation and is off by
    default (``bias_strength=0``; it applies to the leaves of ``ndim == 1``).

    **Placement**: before the base optimizer, e.g.
    ``optax.chain(optlab.spectral_regularization(1e-3), optax.sgd(0.1))``: the penalty is
    then a loss term (coupled), as in the paper. Needs ``params``.

    Args:
      strength: :math:`\lambda \ge 0`, a float or a traced scalar (for a schedule, wrap
        the factory in ``optax.inject_hyperparams``).
      power: the exponent :math:`k \ge 1` (the paper's hyperparameter; 2 by default, an
        assumption from the paper's description; ``k >= 1`` keeps :math:`\sigma^{k-1}`
        finite at :math:`\sigma = 0`).
      mask: which leaves are matrices: ``None`` (every leaf with ``ndim >= 2``), a
        params-shaped tree of bools, or a callable ``params -> tree of bools`` (list it in
        ``static_args`` of ``optax.inject_hyperparams``). Masked-in leaves need ``ndim >= 2``.
      bias_strength: :math:`\lambda_b \ge 0` for the 1-D leaves (0: none).
      seed: seeds the initial unit vectors ``u`` and ``v`` (fixed normal draws per matrix;
        ``v`` is only used while :math:`W^\top u = 0`, e.g. for a zero matrix).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra args are ignored) whose ``update``
      needs ``params``.

    Example (a diagonal matrix with singular values 3 and 1):
      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> tx = optlab.spectral_regularization(0.5)
      >>> params = {"w": jnp.diag(jnp.array([3.0, 1.0])), "b": jnp.zeros(2)}
      >>> state, update = tx.init(params), jax.jit(tx.update)
      >>> for _ in range(20):  # the power iteration converges on the fixed params
      ...     updates, state = update(optax.tree.zeros_like(params), state, params)
      >>> print(f"{state.sigma['w']:.3f}")
      3.000
      >>> # 2 * 0.5 * 2 * (3**2 - 1) * 3 = 48 along u v^T = e1 e1^T; biases untouched
      >>> updates["w"].round(2) + 0.0  # (+ 0.0 turns -0. into 0.)
      Array([[48.,  0.],
             [ 0.,  0.]], dtype=float32)
      >>> updates["b"]
      Array([0., 0.], dtype=float32)

    Reference:
      Lewandowski, Bortkiewicz, Kumar, György, Schuurmans, Ostaszewski, Machado.
      *Learning Continually by Spectral Regularization.* ICLR 2025. arXiv:2406.06811.
    """
    strength = check_scalar("strength", strength, low=0.0)
    power = check_scalar("power", power, low=1.0)
    bias_strength = check_scalar("bias_strength", bias_strength, low=0.0)
    seed = check_injectable_int("seed", seed, min_value=0)
    if mask is not None and not callable(mask) and isinstance(mask, bool):
        raise ValueError(
            "mask must be None, a params-shaped tree of bools or a callable; a single bool "
            f"cannot say which leaves are matrices, got {mask!r}."
        )

    # A concrete zero bias strength (the default) costs nothing in the compiled update.
    no_bias_term = isinstance(bias_strength, int | float) and bias_strength == 0

    def init_fn(params: PyTree) -> SpectralRegularizationState:
        resolved = _resolve_mask(mask, params)
        leaves, treedef = jax.tree.flatten(params)
        flags = _mask_leaves(resolved, treedef)
        us: list[jax.Array | None] = []
        vs: list[jax.Array | None] = []
        sigmas: list[jax.Array | None] = []
        for i, (p, on) in enumerate(zip(leaves, flags, strict=True)):
            if not on:
                us.append(None)
                vs.append(None)
                sigmas.append(None)
                continue
            if jnp.ndim(p) < 2:
                raise ValueError(
                    f"mask selects a leaf of shape {jnp.shape(p)}: spectral regularization "
                    "needs ndim >= 2 (a kernel)."
                )
            fan_out = jnp.shape(p)[-1]
            fan_in = int(np.prod(jnp.shape(p)[:-1]))
            dtype = jnp.promote_types(p.dtype, jnp.float32)
            # Fixed NumPy draws (constants, no JAX op): deterministic per (seed, leaf index).
            draw = np.random.default_rng([seed, i])
            u, v = draw.normal(size=fan_in), draw.normal(size=fan_out)
            us.append(jnp.asarray(u / np.linalg.norm(u), dtype))
            vs.append(jnp.asarray(v / np.linalg.norm(v), dtype))
            sigmas.append(jnp.zeros([], dtype))
        return SpectralRegularizationState(
            u=jax.tree.unflatten(treedef, us),
            v=jax.tree.unflatten(treedef, vs),
            sigma=jax.tree.unflatten(treedef, sigmas),
        )

    def update_fn(
        updates: PyTree,
        state: SpectralRegularizationState,
        params: PyTree | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, SpectralRegularizationState]:
        del extra_args
        if params is None:
            raise ValueError(
                "spectral_regularization needs params: call update(grads, state, params)."
            )

        def leaf(u, v, g, p):
            dtype = jnp.promote_types(p.dtype, jnp.float32)
            lam, k = jnp.asarray(strength, dtype), jnp.asarray(power, dtype)
            if u is None:
                if jnp.ndim(p) != 1 or no_bias_term:
                    return _Leaf(g, None, None, None)
                # d/db ||b||^{2k} = 2k ||b||^{2k-2} b (finite at b = 0 since k >= 1)
                lam_b = jnp.asarray(bias_strength, dtype)
                p32 = p.astype(dtype)
                sq = jnp.sum(jnp.square(p32))
                extra = 2.0 * lam_b * k * sq ** (k - 1.0) * p32
                return _Leaf(g + extra.astype(g.dtype), None, None, None)
            matrix = as_matrix(p).astype(u.dtype)
            u, v, sigma = power_iteration_step(matrix, u, v)
            coeff = 2.0 * lam * k * (sigma**k - 1.0) * sigma ** (k - 1.0)
            grad = (coeff * jnp.outer(u, v)).reshape(p.shape)
            return _Leaf(g + grad.astype(g.dtype), u, v, sigma)

        out = jax.tree.map(leaf, state.u, state.v, updates, params, is_leaf=_is_none)
        new_state = SpectralRegularizationState(
            u=jax.tree.map(lambda o: o.u, out),
            v=jax.tree.map(lambda o: o.v, out),
            sigma=jax.tree.map(lambda o: o.sigma, out),
        )
        return jax.tree.map(lambda o: o.update, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def spectral_norms(params: PyTree, mask: Mask = None) -> PyTree:
    """The exact largest singular value of every matrix of ``params`` (an SVD per leaf).

    A measurement for logging (the paper's diagnostic), not part of any update: leaves are
    viewed as matrices as :func:`spectral_regularization` does; unselected leaves give
    ``None``.

    Args:
      params: the parameter pytree.
      mask: as in :func:`spectral_regularization` (default: every leaf with ``ndim >= 2``).

    Returns:
      A params-shaped tree of scalars (``None`` at unselected leaves).

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> optlab.spectral_norms({"w": jnp.diag(jnp.array([3.0, 1.0])), "b": jnp.ones(2)})
      {'b': None, 'w': Array(3., dtype=float32)}
    """
    resolved = _resolve_mask(mask, params)
    return jax.tree.map(
        lambda p, on: (
            jnp.linalg.svd(
                as_matrix(p).astype(jnp.promote_types(p.dtype, jnp.float32)), compute_uv=False
            )[0]
            if on
            else None
        ),
        params,
        resolved,
    )

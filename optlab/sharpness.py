"""Sharpness measurements: the Hessian's top eigenvalue and its trace, matrix-free.

Both work with Hessian-vector products only, computed forward-over-reverse
(``jax.jvp`` of ``jax.grad``): one product costs about two gradient evaluations and never
forms the Hessian. They are measurements, not updates: pure functions of
``(loss_fn, params, batch)`` that run under ``jax.jit`` (close over ``loss_fn`` or mark it
static) with a fixed, validated number of products, so their cost is known in advance.

The products run in a ``lax.fori_loop`` whose ``unroll`` both functions expose. The default
(``unroll=None``) picks it: on the CPU backend, a loss with convolutions is fully unrolled
when it needs at most 32 products, because XLA:CPU runs the weight-gradient convolutions of a
Hessian-vector product about 20-80x slower inside a loop than in straight-line code (20
power iterations on the MNIST-1D CNN: ~5-9 s rolled, ~0.25 s unrolled), while unrolling
costs compile time that grows faster than linearly with the number of products (and makes
dense-only losses slower on CPU). Everything else keeps the loop.

``loss_fn(params, batch) -> scalar`` is the loss to measure. Close over everything else
(model state such as BatchNorm statistics in evaluation mode, a fixed dropout key, the L2
penalty if the sharpness of the regularised loss is wanted): the Hessian is taken with
respect to ``params`` only. ``params`` must be a pytree of floating-point arrays.

References:
  Power iteration on Hessian-vector products and Hutchinson's trace estimator as used for
  neural networks: Z. Yao, A. Gholami, K. Keutzer, M. Mahoney. *PyHessian: Neural Networks
  Through the Lens of the Hessian.* IEEE BigData 2020. arXiv:1912.07145.
  M. F. Hutchinson. *A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines.* Communications in Statistics - Simulation and Computation,
  1989.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np

from optlab.perturbation import safe_global_norm
from optlab.validation import check_int_in_range

__all__ = ["AUTO_UNROLL_MAX_PRODUCTS", "hessian_top_eigenvalue", "hessian_trace"]

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]
Unroll = int | bool | None

AUTO_UNROLL_MAX_PRODUCTS = 32
"""With ``unroll=None`` on CPU, a loss with convolutions is fully unrolled up to this many
Hessian-vector products (compiling 50 unrolled products of the MNIST-1D CNN takes ~30 s)."""


def _resolve_unroll(
    unroll: Unroll, num_products: int, loss_fn: LossFn, params: PyTree, batch: Any
) -> int | bool:
    """The ``unroll`` handed to ``lax.fori_loop``: validated, or chosen when ``None``."""
    if unroll is None:
        auto = (
            jax.default_backend() == "cpu"
            and num_products <= AUTO_UNROLL_MAX_PRODUCTS
            and _has_convolution(loss_fn, params, batch)
        )
        return True if auto else 1
    if isinstance(unroll, bool):
        return unroll
    return check_int_in_range("unroll", unroll, min_value=1, note=" (or True / False / None)")


def _has_convolution(loss_fn: LossFn, params: PyTree, batch: Any) -> bool:
    """Whether ``loss_fn`` contains a convolution (traced once, abstractly; nothing runs)."""
    jaxpr = jax.make_jaxpr(loss_fn)(params, batch)
    return _contains_primitive(jaxpr.jaxpr, "conv_general_dilated")


def _contains_primitive(jaxpr: Any, name: str) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            return True
        for value in eqn.params.values():
            subs = value if isinstance(value, tuple | list) else (value,)
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns") and _contains_primitive(inner, name):
                    return True
    return False


def _hvp(loss_fn: LossFn, params: PyTree, batch: Any) -> Callable[[PyTree], PyTree]:
    """``v -> H v`` at ``params``: forward-mode derivative of the reverse-mode gradient.

    ``jax.jvp`` re-runs the gradient's forward pass per product instead of storing a
    linearisation (``jax.linearize``) across the loop: less memory for large models.
    """
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))
    return lambda v: jax.jvp(grad_fn, (params,), (v,))[1]


def _accumulation_dtype(tree: PyTree) -> jnp.dtype:
    """float32 at least (sums of bf16 products lose too much), float64 when a leaf is."""
    return jnp.result_type(jnp.float32, *jax.tree.leaves(tree))


def _vdot(a: PyTree, b: PyTree, dtype: jnp.dtype) -> jax.Array:
    terms = jax.tree.map(lambda x, y: jnp.sum(x.astype(dtype) * y.astype(dtype)), a, b)
    return sum(jax.tree.leaves(terms), jnp.zeros((), dtype))


def _normalize(tree: PyTree, dtype: jnp.dtype) -> PyTree:
    """``tree / ‖tree‖`` over all leaves; a zero tree stays zero (no NaN).

    The norm's floor is near the square root of the smallest normal number (its square
    stays normal: CPUs may flush subnormals to zero), so any norm that does not underflow
    when squared is used exactly.
    """
    inv = 1.0 / safe_global_norm(tree, eps=16 * np.sqrt(jnp.finfo(dtype).tiny))
    return jax.tree.map(lambda x: (x.astype(dtype) * inv).astype(x.dtype), tree)


def _random_like(key: jax.Array, tree: PyTree, sample: Callable[..., jax.Array]) -> PyTree:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [sample(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves, strict=True)],
    )


@overload
def hessian_top_eigenvalue(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    key: jax.Array,
    iters: int = ...,
    return_vector: Literal[False] = ...,
    unroll: Unroll = ...,
) -> jax.Array: ...


@overload
def hessian_top_eigenvalue(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    key: jax.Array,
    iters: int = ...,
    return_vector: Literal[True],
    unroll: Unroll = ...,
) -> tuple[jax.Array, PyTree]: ...


def hessian_top_eigenvalue(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    key: jax.Array,
    iters: int = 20,
    return_vector: bool = False,
    unroll: Unroll = None,
) -> jax.Array | tuple[jax.Array, PyTree]:
    """The Hessian eigenvalue of largest magnitude, by power iteration on H·v products.

    Power iteration from a random Gaussian direction ``v_0``::

        v_{k+1} = H v_k / ‖H v_k‖            k = 0 .. iters-2   (global L2 norm over the pytree)
        λ       = v_{K}ᵀ H v_{K}             K = iters-1        (Rayleigh quotient, ‖v_K‖ = 1)

    exactly ``iters`` Hessian-vector products. The error of λ shrinks like
    ``|λ₂/λ₁|^(2·iters)``, so it converges slowly when the top two eigenvalues are close; the
    iteration finds the eigenvalue of largest *magnitude*, which is negative at a saddle whose
    negative curvature dominates (as PyHessian's). A zero Hessian gives ``0`` (not NaN). With
    ``return_vector=True`` the unit vector ``v_K`` is returned too, so
    ``‖H v_K − λ v_K‖`` can be checked as a convergence diagnostic.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; close over model state and rngs.
      params: pytree of floating-point arrays at which the Hessian is taken.
      batch: passed through to ``loss_fn`` unchanged (any pytree).
      key: PRNG key for the starting direction.
      iters: number of Hessian-vector products, a Python int >= 1.
      return_vector: also return the (approximate) eigenvector, shaped like ``params``.
      unroll: unrolling of the loop over the first ``iters - 1`` products: ``True`` (fully
        unrolled), ``False`` or ``1`` (rolled), an int ``n >= 1`` (``n`` products per loop
        iteration), or ``None`` (the module's rule: fully unrolled on CPU for a loss with
        convolutions and at most :data:`AUTO_UNROLL_MAX_PRODUCTS` products, else rolled).
        The result is the same up to floating-point rounding (XLA may fuse unrolled products
        differently).

    Returns:
      The eigenvalue estimate, a scalar of at least float32 precision (float64 if the
      params are); with ``return_vector=True`` the pair ``(eigenvalue, eigenvector)``.

    Example (a least-squares loss whose Hessian is ``diag(9, 1)``):

      >>> import jax, jax.numpy as jnp, optlab
      >>> loss = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
      >>> params = {"w": jnp.zeros(2)}
      >>> batch = {"x": jnp.diag(jnp.array([3.0, 1.0])), "y": jnp.zeros(2)}
      >>> top = jax.jit(lambda p, b, k: optlab.hessian_top_eigenvalue(loss, p, b, key=k))
      >>> lam = top(params, batch, jax.random.key(0))
      >>> print(f"{lam:.3f}")
      9.000

    Reference:
      Z. Yao, A. Gholami, K. Keutzer, M. Mahoney. *PyHessian: Neural Networks Through the
      Lens of the Hessian.* IEEE BigData 2020. arXiv:1912.07145.
    """
    iters = check_int_in_range("iters", iters, min_value=1)
    unroll = _resolve_unroll(unroll, iters, loss_fn, params, batch)
    dtype = _accumulation_dtype(params)
    hvp = _hvp(loss_fn, params, batch)
    v = _normalize(_random_like(key, params, jax.random.normal), dtype)
    v = jax.lax.fori_loop(0, iters - 1, lambda _, v: _normalize(hvp(v), dtype), v, unroll=unroll)
    # Divided by ‖v‖² (1 unless H v underflowed, 0 for a zero Hessian) for a true quotient.
    sq_norm = _vdot(v, v, dtype)
    eigenvalue = _vdot(v, hvp(v), dtype) / jnp.maximum(sq_norm, jnp.finfo(dtype).tiny)
    return (eigenvalue, v) if return_vector else eigenvalue


def hessian_trace(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    key: jax.Array,
    num_samples: int = 100,
    unroll: Unroll = None,
) -> jax.Array:
    """Hutchinson's estimate of the Hessian trace with Rademacher probes.

    ::

        tr(H) ≈ (1/m) Σ_{i=1..m} z_iᵀ H z_i,     z_i entries i.i.d. ±1,   m = num_samples

    Unbiased; one Hessian-vector product per probe. Its variance is
    ``(2/m) Σ_{j≠k} H_jk²`` (the off-diagonal mass of H), so a diagonal Hessian is recovered
    exactly by any number of probes and the standard error falls like ``1/√m``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; close over model state and rngs.
      params: pytree of floating-point arrays at which the Hessian is taken.
      batch: passed through to ``loss_fn`` unchanged (any pytree).
      key: PRNG key for the probes (probe i uses ``fold_in(key, i)``).
      num_samples: number of probes m, a Python int >= 1.
      unroll: unrolling of the loop over the probes, as in :func:`hessian_top_eigenvalue`
        (``None``: fully unrolled on CPU for a loss with convolutions and at most
        :data:`AUTO_UNROLL_MAX_PRODUCTS` probes, else rolled).

    Returns:
      The trace estimate, a scalar of at least float32 precision (float64 if the params are).

    Example (a Hessian ``diag(9, 1)``: diagonal, so exact with any number of probes):

      >>> import jax, jax.numpy as jnp, optlab
      >>> loss = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
      >>> params = {"w": jnp.zeros(2)}
      >>> batch = {"x": jnp.diag(jnp.array([3.0, 1.0])), "y": jnp.zeros(2)}
      >>> trace = optlab.hessian_trace(loss, params, batch, key=jax.random.key(0), num_samples=8)
      >>> print(f"{trace:.3f}")
      10.000

    Reference:
      M. F. Hutchinson. *A stochastic estimator of the trace of the influence matrix for
      Laplacian smoothing splines.* Communications in Statistics - Simulation and Computation
      18(3), 1989. Used for networks in PyHessian (Yao et al., IEEE BigData 2020,
      arXiv:1912.07145).
    """
    num_samples = check_int_in_range("num_samples", num_samples, min_value=1)
    unroll = _resolve_unroll(unroll, num_samples, loss_fn, params, batch)
    dtype = _accumulation_dtype(params)
    hvp = _hvp(loss_fn, params, batch)

    def body(i, total):
        z = _random_like(jax.random.fold_in(key, i), params, jax.random.rademacher)
        return total + _vdot(z, hvp(z), dtype)

    total = jax.lax.fori_loop(0, num_samples, body, jnp.zeros((), dtype), unroll=unroll)
    return total / num_samples

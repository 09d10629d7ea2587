"""Gradient diversity: how far per-example gradients are from pointing the same way.

For per-example gradients ``g_1 .. g_n`` (Yin et al.)::

    Δ = Σ_i ‖g_i‖² / ‖Σ_i g_i‖²          Δ ∈ [1/n, ∞)

``Δ = 1/n`` when every example has the same gradient; ``Δ`` is large when the gradients
cancel. Mini-batch SGD with batch ``B <= δ·n·Δ`` keeps the per-example convergence of small
batches (Yin et al.), which DiveBatch uses to grow the batch (:mod:`optlab.divebatch`) and
Chen et al. use to explain why wide networks tolerate larger batches than deep ones.

It is a measurement, not an update. Three ways to get it:

- :func:`gradient_diversity` on explicit per-example gradients (leaves with a leading
  example axis, e.g. from :func:`per_example_grads`);
- a streaming estimator, :class:`GradientDiversityState` with
  :func:`gradient_diversity_init` / :func:`gradient_diversity_update` /
  :func:`gradient_diversity_result`, which keeps only ``Σ‖g_i‖²``, ``Σ g_i`` (one params-shaped
  tree) and a count, so it accumulates over any number of batches;
- :func:`gradient_diversity_update_from_loss`, which feeds the estimator from a per-example
  loss in chunks of ``chunk_size`` examples and never holds more than that many
  per-example gradients.

Under data parallelism (``jax.shard_map``, ``jax.pmap``, or ``jax.vmap`` with an axis name)
each device accumulates its own examples and ``axis_name`` sums **both** parts over the
axis before the ratio is formed, so the result is the diversity of all examples on all
devices, independent of their number (a mean of per-device ratios would not be).

Zero gradients: the denominator is floored at the smallest normal number of the
accumulation dtype and the ratio capped at its largest finite value, so the result is
always finite: ``0`` when every gradient is zero, and very large (at most the dtype's
maximum, not ``inf``) when non-zero gradients sum to exactly zero.

References:
  D. Yin, A. Pananjady, M. Lam, D. Papailiopoulos, K. Ramchandran, P. Bartlett. *Gradient
  Diversity: a Key Ingredient for Scalable Distributed Learning.* AISTATS 2018.
  arXiv:1706.05699.

  L. Chen, H. Wang, J. Zhao, D. Papailiopoulos, P. Koutris. *The Effect of Network Width on
  the Performance of Large-batch Training.* NeurIPS 2018. arXiv:1806.03791.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optlab.parallel import pvary
from optlab.validation import check_int_in_range

__all__ = [
    "GradientDiversityState",
    "gradient_diversity",
    "gradient_diversity_init",
    "gradient_diversity_result",
    "gradient_diversity_update",
    "gradient_diversity_update_from_loss",
    "per_example_grads",
]

PyTree = Any
AxisName = str | tuple[str, ...] | None


class GradientDiversityState(NamedTuple):
    """The streaming estimator's accumulator (see :func:`gradient_diversity_update`).

    Attributes:
      sum_sq_norms: ``Σ_i ‖g_i‖²`` over the examples seen, a scalar in the accumulation
        dtype (float32 at least, float64 for float64 params).
      grad_sum: ``Σ_i g_i``, shaped like the params, in the accumulation dtype.
      count: the number of examples seen (int32).
    """

    sum_sq_norms: jax.Array
    grad_sum: PyTree
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _accumulation_dtype(tree: PyTree) -> jnp.dtype:
    """float32 at least (sums of bf16 squares lose too much), float64 when a leaf is."""
    return jnp.result_type(jnp.float32, *jax.tree.leaves(tree))


def _num_examples(per_example_grads: PyTree) -> int:
    leaves = jax.tree.leaves(per_example_grads)
    if not leaves:
        raise ValueError("the examples must hold at least one array, got an empty tree.")
    shapes = [jnp.shape(x) for x in leaves]
    if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
        raise ValueError(
            f"every leaf needs the same leading example axis, got leaf shapes {shapes}."
        )
    return int(shapes[0][0])


def _local(params: PyTree, axis_name: AxisName) -> PyTree:
    """``params`` marked varying over ``axis_name`` under ``shard_map`` (else unchanged).

    Under ``shard_map`` the gradient of a replicated (invariant) parameter is summed over
    the axis by the autodiff transpose; marked varying, it is this device's own.
    """
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name or ())
    for name in names:
        params = pvary(params, name)
    return params


def _stats(per_example_grads: PyTree) -> tuple[jax.Array, PyTree]:
    """``(Σ_i ‖g_i‖², Σ_i g_i)`` of explicit per-example gradients, in the accumulation dtype."""
    dtype = _accumulation_dtype(per_example_grads)
    leaves = [x.astype(dtype) for x in jax.tree.leaves(per_example_grads)]
    sum_sq = sum((jnp.sum(jnp.square(x)) for x in leaves), jnp.zeros((), dtype))
    grad_sum = jax.tree.map(lambda x: jnp.sum(x.astype(dtype), axis=0), per_example_grads)
    return sum_sq, grad_sum


def _ratio(sum_sq_norms: jax.Array, grad_sum: PyTree, axis_name: AxisName) -> jax.Array:
    """Both parts summed over ``axis_name`` first, then ``Σ‖g_i‖² / max(‖Σg_i‖², tiny)``,
    capped at the dtype's largest finite value."""
    if axis_name is not None:
        sum_sq_norms, grad_sum = jax.lax.psum((sum_sq_norms, grad_sum), axis_name)
    dtype = jnp.result_type(sum_sq_norms)
    leaves = jax.tree.leaves(grad_sum)
    den = sum((jnp.sum(jnp.square(x.astype(dtype))) for x in leaves), jnp.zeros((), dtype))
    info = jnp.finfo(dtype)
    return jnp.minimum(sum_sq_norms / jnp.maximum(den, info.tiny), info.max)


def gradient_diversity(per_example_grads: PyTree, *, axis_name: AxisName = None) -> jax.Array:
    """The gradient diversity ``Σ_i ‖g_i‖² / ‖Σ_i g_i‖²`` of explicit per-example gradients.

    Norms are global L2 norms over all leaves. ``Δ = 1/n`` for ``n`` identical non-zero
    gradients; a zero tree gives ``0``, gradients that sum to exactly zero a very large
    finite number (see the module docstring).

    Args:
      per_example_grads: a pytree whose leaves all carry the same leading example axis
        (``g_i`` is the tree of the ``i``-th slices), e.g. ``jax.vmap(jax.grad(loss))``.
      axis_name: a named axis (``shard_map`` / ``pmap`` / ``vmap``) over which the examples
        are split; both sums are ``psum``-ed over it before the ratio. ``None``: no axis.

    Returns:
      A scalar in the accumulation dtype (float32 at least, float64 for float64 gradients).

    Example (two examples whose gradients are orthogonal: Δ = (1 + 1) / ‖(1, 1)‖² = 1):

      >>> import jax.numpy as jnp, optlab
      >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> print(optlab.gradient_diversity(grads))
      1.0

    Reference:
      Yin et al. *Gradient Diversity: a Key Ingredient for Scalable Distributed Learning.*
      AISTATS 2018. arXiv:1706.05699.
    """
    _num_examples(per_example_grads)
    return _ratio(*_stats(per_example_grads), axis_name)


def per_example_grads(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: Any,
    *,
    chunk_size: int | None = None,
    axis_name: AxisName = None,
) -> PyTree:
    """The gradient of ``loss_fn(params, example)`` for every example of ``batch``.

    ``jax.vmap(jax.grad(loss_fn))`` over the leading axis of the batch's leaves; with
    ``chunk_size`` it runs ``chunk_size`` examples at a time under ``lax.map`` (then one
    ``vmap`` over the remainder), which bounds the memory of the intermediate activations to
    a chunk's. The result holds all ``n`` per-example gradients (``n`` times the params'
    memory): to accumulate the diversity of many examples without storing them, use
    :func:`gradient_diversity_update_from_loss`.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example (the batch's leaves
        without their leading axis; a model that needs a batch axis adds it, ``x[None]``).
      params: the pytree differentiated.
      batch: a pytree of arrays with a common leading example axis.
      chunk_size: examples per ``vmap`` (``None``: all at once), an int >= 1.
      axis_name: under ``jax.shard_map`` with replicated ``params``, the axis the batch is
        split over: the params are marked varying first (:func:`optlab.parallel.pvary`),
        so each device gets its own examples' gradients and not their sum over devices.

    Returns:
      A pytree shaped like ``params`` with a leading example axis on every leaf.

    Example:

      >>> import jax, jax.numpy as jnp, optlab
      >>> loss = lambda p, ex: 0.5 * jnp.sum((p["w"] - ex) ** 2)
      >>> grads = optlab.per_example_grads(loss, {"w": jnp.zeros(2)}, jnp.eye(2), chunk_size=1)
      >>> grads["w"]
      Array([[-1.,  0.],
             [ 0., -1.]], dtype=float32)
    """
    grad = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))
    params = _local(params, axis_name)
    n = _num_examples(batch)
    if chunk_size is None:
        return grad(params, batch)
    chunk_size = check_int_in_range("chunk_size", chunk_size, min_value=1)
    full, rest = divmod(n, chunk_size)
    parts = []
    if full:
        head = jax.tree.map(
            lambda x: x[: full * chunk_size].reshape(full, chunk_size, *x.shape[1:]), batch
        )
        mapped = jax.lax.map(lambda chunk: grad(params, chunk), head)
        parts.append(jax.tree.map(lambda g: g.reshape(full * chunk_size, *g.shape[2:]), mapped))
    if rest:
        parts.append(grad(params, jax.tree.map(lambda x: x[full * chunk_size :], batch)))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *parts)


def gradient_diversity_init(params: PyTree) -> GradientDiversityState:
    """An empty accumulator for gradients shaped like ``params``."""
    dtype = _accumulation_dtype(params)
    return GradientDiversityState(
        sum_sq_norms=jnp.zeros((), dtype),
        grad_sum=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params),
        count=jnp.zeros((), jnp.int32),
    )


def gradient_diversity_update(
    state: GradientDiversityState, per_example_grads: PyTree
) -> GradientDiversityState:
    """Adds a batch of explicit per-example gradients to the accumulator.

    ``sum_sq_norms += Σ_i ‖g_i‖²``, ``grad_sum += Σ_i g_i``, ``count += n``. Gradients of the
    per-example loss, not of a batch mean: a mean-reduced loss scales both sums by ``1/B``
    and ``1/B²`` alike only when every batch has the same size ``B``.

    Args:
      state: the accumulator (:func:`gradient_diversity_init`).
      per_example_grads: a pytree shaped like the params with a leading example axis.

    Returns:
      The updated accumulator.
    """
    n = _num_examples(per_example_grads)
    sum_sq, grad_sum = _stats(per_example_grads)
    return _add(state, sum_sq, grad_sum, n)


def _add(
    state: GradientDiversityState, sum_sq: jax.Array, grad_sum: PyTree, n: int | jax.Array
) -> GradientDiversityState:
    dtype = jnp.result_type(state.sum_sq_norms)
    return GradientDiversityState(
        sum_sq_norms=state.sum_sq_norms + sum_sq.astype(dtype),
        grad_sum=jax.tree.map(lambda a, b: a + b.astype(a.dtype), state.grad_sum, grad_sum),
        count=state.count + jnp.asarray(n, jnp.int32),
    )


def gradient_diversity_update_from_loss(
    state: GradientDiversityState,
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: Any,
    *,
    chunk_size: int | None = None,
    axis_name: AxisName = None,
) -> GradientDiversityState:
    """Adds the examples of ``batch`` to the accumulator, ``chunk_size`` at a time.

    The same as ``gradient_diversity_update(state, per_example_grads(loss_fn, params,
    batch))`` up to rounding, but each chunk's per-example gradients are reduced to their
    two sums inside a ``lax.scan`` before the next chunk runs, so the memory is that of
    ``chunk_size`` per-example gradients, whatever the batch size.

    Args:
      state: the accumulator (:func:`gradient_diversity_init`).
      loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example.
      params: the point at which the gradients are taken.
      batch: a pytree of arrays with a common leading example axis.
      chunk_size: examples per ``vmap`` (``None``: the whole batch at once), an int >= 1.
      axis_name: under ``jax.shard_map`` with replicated ``params``, the axis the batch is
        split over (see :func:`per_example_grads`); the accumulator stays per device until
        :func:`gradient_diversity_result` sums it over the same axis.

    Returns:
      The updated accumulator.

    Example (the streaming estimate over two batches equals the one-shot value,
    (1 + 1 + 2) / ‖(2, 2)‖² = 0.5):

      >>> import jax, jax.numpy as jnp, optlab
      >>> loss = lambda p, ex: 0.5 * jnp.sum((p["w"] - ex) ** 2)
      >>> params, data = {"w": jnp.zeros(2)}, jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> acc = optlab.gradient_diversity_init(params)
      >>> for batch in (data[:2], data[2:]):
      ...     acc = optlab.gradient_diversity_update_from_loss(acc, loss, params, batch)
      >>> print(optlab.gradient_diversity_result(acc))
      0.5
      >>> print(optlab.gradient_diversity(optlab.per_example_grads(loss, params, data)))
      0.5
    """
    grad = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))
    params, state = _local((params, state), axis_name)  # the scan carries a varying sum
    n = _num_examples(batch)
    if chunk_size is None:
        return _add(state, *_stats(grad(params, batch)), n)
    chunk_size = check_int_in_range("chunk_size", chunk_size, min_value=1)
    full, rest = divmod(n, chunk_size)
    if full:
        head = jax.tree.map(
            lambda x: x[: full * chunk_size].reshape(full, chunk_size, *x.shape[1:]), batch
        )

        def body(acc, chunk):
            return _add(acc, *_stats(grad(params, chunk)), chunk_size), None

        state = jax.lax.scan(body, state, head)[0]
    if rest:
        tail = jax.tree.map(lambda x: x[full * chunk_size :], batch)
        state = _add(state, *_stats(grad(params, tail)), rest)
    return state


def gradient_diversity_result(
    state: GradientDiversityState, *, axis_name: AxisName = None
) -> jax.Array:
    """The diversity ``sum_sq_norms / ‖grad_sum‖²`` of everything accumulated.

    Args:
      state: the accumulator.
      axis_name: the named axis over which examples were split (``shard_map`` / ``pmap`` /
        ``vmap``): both parts are ``psum``-ed over it before the ratio. ``None``: no axis.

    Returns:
      A finite scalar (``0`` for an empty accumulator or all-zero gradients).
    """
    return _ratio(state.sum_sq_norms, state.grad_sum, axis_name)

"""Helpers for data parallelism over a named worker axis.

optlab's multi-worker methods take an ``axis_name`` and call ``lax.pmean`` & co. inside
``update``. The same code then runs simulated under ``jax.vmap(..., axis_name=...)``, on real
devices under ``jax.shard_map``, and on many hosts after ``jax.distributed.initialize()``.

One trap makes these helpers necessary: under ``jax.shard_map`` (with the default
``check_vma=True``) the gradient of a *replicated* parameter with respect to a loss computed
on the device's own batch is already summed over the axis, so a further ``pmean`` gives N
times the true gradient. :func:`pvary` marks the parameters as varying first, after which
the per-device gradient is the local one and ``pmean`` is the data-parallel mean. Under
``vmap`` and outside any mapped context it is the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["data_parallel_value_and_grad", "is_manual_axis", "pmean", "pvary"]

PyTree = Any


def is_manual_axis(axis_name: str) -> bool:
    """Whether ``axis_name`` is a ``shard_map`` (manual) mesh axis at the current trace point."""
    return axis_name in jax.sharding.get_abstract_mesh().manual_axes


def pvary(tree: PyTree, axis_name: str | None) -> PyTree:
    """Marks every leaf of ``tree`` as varying over ``axis_name`` where that is needed.

    Leaves already varying over the axis are left alone (``pcast`` rejects them), as is
    everything when ``axis_name`` is ``None`` or not a ``shard_map`` axis (``vmap``).
    """
    if axis_name is None or not is_manual_axis(axis_name):
        return tree

    def cast(leaf):
        if axis_name in jax.typeof(leaf).manual_axis_type.varying:
            return leaf
        return jax.lax.pcast(leaf, axis_name, to="varying")

    return jax.tree.map(cast, tree)


def pmean(tree: PyTree, axis_name: str | None) -> PyTree:
    """``lax.pmean`` over ``axis_name``; the identity when ``axis_name`` is ``None``."""
    if axis_name is None:
        return tree
    return jax.lax.pmean(tree, axis_name)


def data_parallel_value_and_grad(
    fun: Callable[..., Any],
    axis_name: str | None,
    *,
    has_aux: bool = False,
    average: bool = True,
) -> Callable[..., Any]:
    """``jax.value_and_grad(fun)`` for replicated parameters and a per-worker batch.

    Differentiates with respect to the first argument. Inside ``shard_map`` or a named
    ``vmap`` the returned gradient (and value) is the mean over workers when ``average`` is
    true (synchronous data parallelism), or the worker's own when false (for methods that
    average something else themselves, e.g. SAM's per-device perturbation). Auxiliary
    outputs are returned per worker, unaveraged.

    Example (two devices, each with half of the batch):

      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> loss = lambda w, x: jnp.mean((w * x) ** 2)
      >>> grad = data_parallel_value_and_grad(loss, "data")
      >>> mesh = Mesh(jax.devices()[:2], ("data",))
      >>> step = jax.shard_map(grad, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
      >>> w, x = jnp.ones(()), jnp.array([1.0, 2.0, 3.0, 4.0])
      >>> value, g = step(w, x)
      >>> print(value, g)  # as jax.value_and_grad(loss)(w, x) on the whole batch
      7.5 15.0
    """
    value_and_grad = jax.value_and_grad(fun, has_aux=has_aux)

    def wrapped(params, *args, **kwargs):
        out, grads = value_and_grad(pvary(params, axis_name), *args, **kwargs)
        if average:
            out = (pmean(out[0], axis_name), out[1]) if has_aux else pmean(out, axis_name)
            grads = pmean(grads, axis_name)
        return out, grads

    return wrapped

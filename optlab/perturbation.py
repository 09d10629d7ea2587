"""The gradient at a transformed point: the shared core of SAM, ASAM, SA-SAM, EXTRAP-SGD & co.

Several methods take their second gradient somewhere other than the current parameters:
SAM and ASAM ascend along the (scaled) normalised gradient, EXTRAP-SGD descends along it,
average-direction SAM adds random noise, SA-SAM also looks back at the previous iterate.
They differ only in the *point map*; the mechanism is built once here.

API (everything a method needs, nothing more)::

    PointMap = Callable[[params, grads], point]     # where to take the second gradient

    safe_global_norm(tree, eps=1e-12) -> scalar
        sqrt(max(sum of squares over all leaves, eps**2)), accumulated in >= float32.
        Exact for ||tree|| >= eps; finite value and finite (zero) gradient at tree == 0.

    translate(params, direction, scale) -> params + scale * direction, in params' dtypes.

    sharpness_point(rho, *, scale=None, eps=1e-12) -> PointMap
        (p, g) -> p + rho * T(p)^2 g / ||T(p) g||   (SAM: T = I; ASAM: T = |p| + eta).
        ``scale`` is ``None`` or ``scale(p) -> T``, a params-shaped tree.

    extrapolation_point(gamma) -> PointMap
        (p, g) -> p - gamma * g                     (EXTRAP-SGD's descent-side look-ahead).

    gaussian_like(key, tree) -> tree of i.i.d. N(0, 1) entries, in ``tree``'s dtypes.

    grad_at_point(grad_fn, params, grads, point_map, *, groups=None, axis_name=None,
                  vectorize=False) -> grads
        groups=None: h = grad_fn(point_map(params, grads)).
        groups=m:    h = mean_k grad_fn(point_map(params, grad_fn(params, k)), k), k < m
                     (m-sharpness; ``grads`` is unused, ``grad_fn(params, k)`` is the gradient
                     on the k-th of m groups of the batch, see :func:`group_grad_fn`).
        Then ``pmean(h, axis_name)``: the point is per worker (from its local gradient),
        only the final gradient is averaged. Returned in the dtypes of ``grads``.
        ``vectorize`` runs the m groups with ``vmap`` instead of a sequential loop.

    mean_over(num, fn, *, vectorize=False) -> mean_{j<num} fn(j)
        Sequential ``lax.fori_loop`` (memory of one result) or ``vmap`` (num results at once).

    group_grad_fn(grad_fn, batch, groups) -> (params, k) -> grad_fn(params, k-th group of batch)

    microbatched_grad_fn(grad_fn, batch, num_micro_batches, *, vectorize=False)
        -> params -> mean_k grad_fn(params, k-th micro-batch of batch)
        (the gradient on the whole batch, computed one micro-batch at a time).

    raw_key(seed, name="seed") -> uint32[2] key data from an int seed, a typed key
        (``jax.random.key``) or a raw key (``jax.random.PRNGKey``).

    refuse_inside_multi_steps(transform) -> raises ValueError when ``update`` is running
        inside ``optax.MultiSteps`` (see "Gradient accumulation" below).

Contract for ``grad_fn``: a pure function of the params (closed over the batch, the
model state in training mode, a fixed dropout key) returning a params-shaped gradient.
It must not update model state: both official SAM code bases take BatchNorm statistics from
the first forward pass only. Under ``jax.shard_map``/named ``vmap`` with ``axis_name`` it
must return the worker's *local* gradient (``optlab.data_parallel_value_and_grad(...,
average=False)``; do not ``pmean`` it), and ``grads`` must be local too; if both are already
averaged, leave ``axis_name=None`` and the point becomes global instead of per worker.

Gradient accumulation. ``optax.MultiSteps(tx, k)`` averages k micro-batch gradients but
forwards the extra args of the last micro-step only: a ``grad_fn`` it passes on is closed
over the last micro-batch, so a transform that calls ``grad_fn`` would silently drop the
other k - 1 micro-batches. The transforms built here that call ``grad_fn`` detect that
composition while tracing and raise (:func:`refuse_inside_multi_steps`). Two correct ways:

* Whole batch, exact: call ``update`` once per accumulated batch with
  ``gfn = microbatched_grad_fn(per_example_grad_fn, batch, k)`` as both ``grads = gfn(params)``
  and ``grad_fn=gfn``; every gradient evaluation then loops over the k micro-batches
  (memory of one micro-batch) and the step is the method's step on the whole batch.
* Per micro-batch (SAM, ASAM, average-direction SAM, EXTRAP-SGD): put ``MultiSteps``
  *inside*, as the base optimizer, ``sam(optax.MultiSteps(base, k), rho)``. Each micro-batch
  then takes its second gradient at its own transformed point (SAM's m-sharpness with the
  micro-batches as groups) and ``MultiSteps`` averages those; the transform's schedules and
  counters advance once per micro-step.

Example (SAM by hand, the step :func:`optlab.sam` takes):

>>> import jax, jax.numpy as jnp, optax, optlab
>>> from optlab.perturbation import grad_at_point, sharpness_point
>>> grad_fn = jax.grad(lambda w: jnp.sum((w - 1.0) ** 2))
>>> base = optax.sgd(0.1)
>>> params = jnp.zeros(3)
>>> base_state = base.init(params)
>>> grads = grad_fn(params)
>>> h = grad_at_point(grad_fn, params, grads, sharpness_point(0.05))
>>> updates, base_state = base.update(h, base_state, params)
>>> print(h.round(4))  # the gradient at params + 0.05 * grads / ||grads||
[-2.0577 -2.0577 -2.0577]
>>> tx = optlab.sam(base, rho=0.05)
>>> sam_updates, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
>>> bool(jnp.allclose(updates, sam_updates))
True
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optlab.parallel import pmean
from optlab.validation import check_int_in_range

__all__ = [
    "PointMap",
    "extrapolation_point",
    "gaussian_like",
    "grad_at_point",
    "group_grad_fn",
    "mean_over",
    "microbatched_grad_fn",
    "raw_key",
    "refuse_inside_multi_steps",
    "safe_global_norm",
    "sharpness_point",
    "translate",
]

PyTree = Any
PointMap = Callable[[PyTree, PyTree], PyTree]
"""``point_map(params, grads) -> point``: where the second gradient is taken."""

DEFAULT_EPS = 1e-12


def _accumulation_dtype(dtype: Any) -> Any:
    """At least float32, so that bf16/f16 squares and sums neither overflow nor underflow."""
    return jnp.promote_types(dtype, jnp.float32)


def safe_global_norm(tree: PyTree, eps: float | jax.Array = DEFAULT_EPS) -> jax.Array:
    r"""The global L2 norm of a pytree, clamped below at ``eps`` so that it is safe to divide by.

    .. math::

      \mathrm{norm}(t) = \sqrt{\max\big(\textstyle\sum_\ell \|t_\ell\|_2^2,\ \epsilon^2\big)}

    It equals ``optax.tree.norm(tree)`` whenever that is at least ``eps`` (no bias on ordinary
    gradients), is ``eps`` (finite, nonzero) at ``tree == 0`` and its derivative there is zero,
    not NaN (the plain ``sqrt`` has an infinite derivative at 0). Squares are summed in at
    least float32, so bf16 trees neither overflow nor lose the small leaves.

    Args:
      tree: a pytree of arrays (an empty tree has norm ``eps``).
      eps: the floor, a positive float (may be traced).

    Returns:
      A scalar in the accumulation dtype (float32, or float64 for float64 trees).
    """
    leaves = jax.tree.leaves(tree)
    dtype = _accumulation_dtype(jnp.result_type(*leaves)) if leaves else jnp.float32
    sum_sq = sum((jnp.sum(jnp.square(x.astype(dtype))) for x in leaves), jnp.zeros((), dtype))
    eps = jnp.asarray(eps, dtype)
    return jnp.sqrt(jnp.maximum(sum_sq, eps * eps))


def translate(params: PyTree, direction: PyTree, scale: Any = 1.0) -> PyTree:
    """``params + scale * direction`` leafwise, kept in each leaf's dtype of ``params``."""
    return jax.tree.map(
        lambda p, d: (p + jnp.asarray(scale, _accumulation_dtype(p.dtype)) * d).astype(p.dtype),
        params,
        direction,
    )


def sharpness_point(
    rho: Any,
    *,
    scale: Callable[[PyTree], PyTree] | None = None,
    eps: float | jax.Array = DEFAULT_EPS,
) -> PointMap:
    r"""The SAM/ASAM ascent point ``p + rho * T^2 g / ||T g||`` as a :data:`PointMap`.

    ``T = I`` (``scale=None``) is SAM's ``p + rho * g / ||g||``; ``T = |p| + eta`` elementwise
    is ASAM. The norm is :func:`safe_global_norm`, so a zero gradient maps to ``p`` itself.

    Args:
      rho: the radius (a float or a traced scalar, e.g. a schedule's value at this step).
      scale: ``None`` or ``scale(params) -> T``, a params-shaped tree of elementwise factors.
      eps: the floor of the norm.
    """

    def point_map(params: PyTree, grads: PyTree) -> PyTree:
        if scale is None:
            direction = grads
        else:
            t = scale(params)
            scaled = jax.tree.map(lambda g, s: g * s.astype(g.dtype), grads, t)
            direction = jax.tree.map(lambda g, s: g * s.astype(g.dtype), scaled, t)
            grads = scaled
        norm = safe_global_norm(grads, eps)
        return translate(params, direction, rho / norm)

    return point_map


def extrapolation_point(gamma: Any) -> PointMap:
    """EXTRAP-SGD's look-ahead ``p - gamma * g`` as a :data:`PointMap`."""

    def point_map(params: PyTree, grads: PyTree) -> PyTree:
        return translate(params, grads, -gamma)

    return point_map


def gaussian_like(key: jax.Array, tree: PyTree) -> PyTree:
    """I.i.d. standard normal entries shaped and typed like ``tree``.

    One draw of the total size (one PRNG kernel, however many leaves), in at least float32,
    then sliced and cast per leaf.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    dtype = _accumulation_dtype(jnp.result_type(*leaves))
    sizes = [int(np.prod(jnp.shape(x))) for x in leaves]
    draw = jax.random.normal(key, (sum(sizes),), dtype)
    noise, start = [], 0
    for x, size in zip(leaves, sizes, strict=True):
        noise.append(draw[start : start + size].reshape(jnp.shape(x)).astype(jnp.result_type(x)))
        start += size
    return jax.tree.unflatten(treedef, noise)


def mean_over(num: int, fn: Callable[[jax.Array], PyTree], *, vectorize: bool = False) -> PyTree:
    """``mean_{j < num} fn(j)`` with ``j`` an int32 scalar.

    ``vectorize=False`` runs a ``lax.fori_loop`` that keeps one running sum (memory of about
    two results, sequential); ``vectorize=True`` ``vmap``s ``fn`` (memory of ``num`` results
    and their intermediates, parallel). Sums are accumulated in at least float32 and the mean
    is returned in ``fn``'s output dtypes.
    """
    num = check_int_in_range("num", num, min_value=1)
    if num == 1:
        return fn(jnp.zeros((), jnp.int32))
    if vectorize:
        stacked = jax.vmap(fn)(jnp.arange(num, dtype=jnp.int32))
        return jax.tree.map(
            lambda x: jnp.mean(x.astype(_accumulation_dtype(x.dtype)), axis=0).astype(x.dtype),
            stacked,
        )
    # The first term initialises the sum: under shard_map it already carries the right
    # varying-axes type, which zeros built from a shape would not.
    first = fn(jnp.zeros((), jnp.int32))
    dtypes = jax.tree.map(lambda x: x.dtype, first)

    def body(j, total):
        return jax.tree.map(lambda s, x: s + x.astype(s.dtype), total, fn(j))

    total = jax.tree.map(lambda x: x.astype(_accumulation_dtype(x.dtype)), first)
    total = jax.lax.fori_loop(1, num, body, total)
    return jax.tree.map(lambda s, d: (s / num).astype(d), total, dtypes)


def grad_at_point(
    grad_fn: Callable[..., PyTree],
    params: PyTree,
    grads: PyTree,
    point_map: PointMap,
    *,
    groups: int | None = None,
    axis_name: str | None = None,
    vectorize: bool = False,
) -> PyTree:
    r"""The gradient at ``point_map(params, grads)``, per group and per worker, then averaged.

    .. math::

      h = \operatorname{pmean}_{\text{axis}}\Big(\frac1m \sum_{k<m}
          \nabla L_k\big(\mathrm{point\_map}(x, \nabla L_k(x))\big)\Big)

    With ``groups=None`` (m = 1) the first gradient is ``grads`` and ``grad_fn(point)`` is
    called once. With ``groups=m`` (m-sharpness under plain ``jit``) ``grad_fn(params, k)``
    must return the gradient on the k-th of m equal groups of the batch (build it with
    :func:`group_grad_fn`); each group gets its own point from its own gradient, ``grads``
    is not used, and ``grad_fn`` is called 2m times on 1/m of the batch each.

    Args:
      grad_fn: ``grad_fn(params)`` (or ``grad_fn(params, k)`` with ``groups``), see the
        module docstring for its contract.
      params: the current parameters.
      grads: the gradient at ``params`` (local to the worker under ``axis_name``).
      point_map: ``(params, grads) -> point``.
      groups: ``None`` or the number m >= 1 of groups.
      axis_name: the worker axis to ``pmean`` the final gradient over, or ``None``.
      vectorize: run the groups with ``vmap`` instead of a sequential loop.

    Returns:
      The gradient at the transformed point, in the dtypes of ``grads`` (of ``params`` when
      ``groups`` is set).
    """
    if groups is None:
        h = grad_fn(point_map(params, grads))
        reference = grads
    else:
        groups = check_int_in_range("groups", groups, min_value=1)

        def one_group(k: jax.Array) -> PyTree:
            return grad_fn(point_map(params, grad_fn(params, k)), k)

        h = mean_over(groups, one_group, vectorize=vectorize)
        reference = params
    h = jax.tree.map(lambda x, r: jnp.asarray(x).astype(r.dtype), h, reference)
    return pmean(h, axis_name)


def group_grad_fn(
    grad_fn: Callable[[PyTree, PyTree], PyTree], batch: PyTree, groups: int
) -> Callable[[PyTree, jax.Array], PyTree]:
    """Turns ``grad_fn(params, batch)`` into ``grad_fn(params, k)`` on the k-th of m groups.

    Every leaf of ``batch`` is split along its leading axis into ``groups`` equal,
    contiguous groups; the leading size must divide by ``groups`` (checked here, when the
    shapes are known). ``k`` may be traced.

    Example (m-sharpness with m = 4 under plain ``jit``):

      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
      >>> batch = {"x": jnp.ones((8, 2)), "y": jnp.arange(8.0)}
      >>> gfn = group_grad_fn(jax.grad(loss), batch, 4)  # group k: examples 2k and 2k + 1
      >>> w = jnp.zeros(2)
      >>> print(gfn(w, 3))  # the gradient on y = 6, 7 only
      [-13. -13.]
      >>> tx = optlab.sam(optax.sgd(0.1), rho=0.05, groups=4)
      >>> step = jax.jit(lambda w, s: tx.update(jax.grad(loss)(w, batch), s, w, grad_fn=gfn))
      >>> updates, state = step(w, tx.init(w))
      >>> updates.shape
      (2,)
    """
    groups = check_int_in_range("groups", groups, min_value=1)
    leaves = jax.tree.leaves(batch)
    for leaf in leaves:
        if jnp.ndim(leaf) == 0 or leaf.shape[0] % groups:
            raise ValueError(
                f"groups={groups} must divide the leading (batch) size of every batch leaf, "
                f"got a leaf of shape {jnp.shape(leaf)}."
            )

    def grouped(params: PyTree, k: jax.Array) -> PyTree:
        part = jax.tree.map(
            lambda x: x.reshape(groups, x.shape[0] // groups, *x.shape[1:])[k], batch
        )
        return grad_fn(params, part)

    return grouped


def microbatched_grad_fn(
    grad_fn: Callable[[PyTree, PyTree], PyTree],
    batch: PyTree,
    num_micro_batches: int,
    *,
    vectorize: bool = False,
) -> Callable[[PyTree], PyTree]:
    """The gradient on the whole ``batch``, computed one micro-batch at a time.

    ``params -> mean_k grad_fn(params, b_k)`` over the ``num_micro_batches`` equal, contiguous
    micro-batches ``b_k`` of ``batch`` (split along the leading axis, which must divide).
    For a loss that is a mean over examples this is the gradient on the whole batch, with the
    activation memory of one micro-batch (a sequential ``lax.fori_loop``; ``vectorize=True``
    ``vmap``s the micro-batches instead). It is the correct way to accumulate gradients for
    a transform that calls ``grad_fn``: pass it as both the gradient and ``grad_fn`` and call
    ``update`` once per accumulated batch, not under ``optax.MultiSteps``.

    Example (SAM on a batch of 4 x 2 examples, 2 at a time):

      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
      >>> batch = {"x": jnp.arange(16.0).reshape(8, 2) / 8, "y": jnp.arange(8.0)}
      >>> gfn = microbatched_grad_fn(jax.grad(loss), batch, 4)
      >>> w = jnp.zeros(2)
      >>> bool(jnp.allclose(gfn(w), jax.grad(loss)(w, batch)))  # the whole-batch gradient
      True
      >>> tx = optlab.sam(optax.sgd(0.1), rho=0.05)
      >>> state = tx.init(w)
      >>> updates, state = tx.update(gfn(w), state, w, grad_fn=gfn)

    Args:
      grad_fn: ``grad_fn(params, micro_batch) -> grads`` (no model-state update).
      batch: a pytree of arrays sharing a leading (batch) axis.
      num_micro_batches: k >= 1, a Python int dividing the leading size.
      vectorize: run the micro-batches with ``vmap`` (k times the memory) instead of a loop.

    Returns:
      ``grad_fn(params) -> grads`` on the whole batch, in the dtypes of ``grad_fn``'s output.
    """
    num_micro_batches = check_int_in_range("num_micro_batches", num_micro_batches, min_value=1)
    grouped = group_grad_fn(grad_fn, batch, num_micro_batches)

    def whole_batch(params: PyTree) -> PyTree:
        return mean_over(num_micro_batches, lambda k: grouped(params, k), vectorize=vectorize)

    return whole_batch


def raw_key(seed: Any, name: str = "seed") -> jax.Array:
    """PRNG key data (``uint32[2]``, the default threefry key) for a state to hold.

    Accepts an integer seed (a Python int or an integer scalar array, e.g. as
    ``optax.inject_hyperparams`` passes it), a typed key (``jax.random.key``) or a raw key
    (``jax.random.PRNGKey``, ``uint32[2]``); the raw form of the same key is returned, so
    ``jax.random.key(0)`` and ``jax.random.PRNGKey(0)`` give the same stream. Anything else
    raises a ``ValueError`` naming ``name``.
    """
    if isinstance(seed, jax.Array | np.ndarray):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            if seed.shape == ():
                data = jax.random.key_data(seed)
                if data.shape == (2,) and data.dtype == jnp.uint32:
                    return data
        elif seed.shape == (2,) and seed.dtype == np.uint32:
            return jnp.asarray(seed)
        elif seed.shape == () and jnp.issubdtype(seed.dtype, jnp.integer):
            return jax.random.key_data(jax.random.key(seed))
    elif isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        return jax.random.key_data(jax.random.key(int(seed)))
    raise ValueError(
        f"{name} must be an integer seed, a typed PRNG key (jax.random.key) or a raw "
        f"uint32[2] key (jax.random.PRNGKey) of the default implementation, got {seed!r}."
    )


def refuse_inside_multi_steps(transform: str, fixes: str = "") -> None:
    """Raises ``ValueError`` when called (at any depth) from ``optax.MultiSteps.update``.

    ``optax.MultiSteps`` forwards the extra args of its last micro-step only, so a
    ``grad_fn`` it passes on sees the last micro-batch, not the accumulated batch: a
    transform that calls ``grad_fn`` would silently drop the other micro-batches. Called
    from such a transform's ``update``; the check walks the Python call stack while
    tracing (no cost in the compiled step). ``MultiSteps`` used *inside* the transform (as
    its base optimizer) is called from it, not around it, and is not refused.

    Args:
      transform: the transform's name for the message, e.g. ``"optlab.sam"``.
      fixes: the transform-specific correct compositions, appended to the message.
    """
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "update" and isinstance(
            frame.f_locals.get("self"), optax.MultiSteps
        ):
            raise ValueError(
                f"{transform} inside optax.MultiSteps would silently drop micro-batches: "
                "MultiSteps accumulates the gradients of k micro-batches but forwards the "
                "grad_fn of the last one only, so the second gradient would see 1/k of the "
                "batch. Accumulate correctly instead: call update once per accumulated batch "
                "with a grad_fn over the whole batch, built micro-batch by micro-batch with "
                "optlab.perturbation.microbatched_grad_fn(grad_fn, batch, k), passed as both "
                f"the gradient and grad_fn (the exact step on the whole batch){fixes}."
            )
        frame = frame.f_back

"""Dynamic Pruning with Feedback (DPF) and gradual magnitude pruning as drop-in optax transforms.

The params are the model's own tree: they are the **dense** weights. The pruning mask lives
in the optimizer state, and :func:`masked_params` returns the pruned weights ``m * w`` at
which the loss is evaluated (forward and backward pass) and the model is evaluated. With
feedback (DPF) the gradient taken at the pruned weights updates every dense coordinate,
pruned ones included, so a pruned weight whose dense value grows back is re-activated at
the next mask refresh. Without feedback (``feedback=False``: gradual magnitude pruning, Zhu
& Gupta 2017) the gradient and the update are masked and pruned weights are zeroed in the
dense copy, so they never come back.

Cost: the mask is recomputed (one global selection of the n-th smallest prunable magnitude,
a 31-step bisection of compare-and-count passes) inside a ``lax.cond`` taken only on
refresh steps; an ordinary step costs the inner optimizer plus, without feedback, two
elementwise selects. Under ``jax.vmap`` (several runs stacked, each
with its own step count) a plain ``lax.cond`` would become a select and refresh on every
step; the refresh has its own batching rule that keeps the branch (taken when any run
refreshes). Under nested ``vmap`` only the innermost level keeps it.

References:
  T. Lin, S. U. Stich, L. Barba, D. Dmitriev, M. Jaggi. *Dynamic Model Pruning with
  Feedback.* ICLR 2020. arXiv:2006.07253.

  M. Zhu, S. Gupta. *To prune, or not to prune: exploring the efficacy of pruning for model
  compression.* ICLR workshop 2018. arXiv:1710.01878.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optlab.validation import check_float_in_range, check_injectable_int

__all__ = [
    "SCHEDULES",
    "DPFState",
    "Sparsity",
    "default_prunable",
    "dpf",
    "masked_params",
    "sparsity",
]

PyTree = Any
Prunable = Callable[[tuple[Any, ...], Any], bool] | PyTree
SCHEDULES: tuple[str, ...] = ("cubic", "constant")
_MAX_STEP = 2**31 - 1  # the step counter is int32


class DPFState(NamedTuple):
    """State of :func:`dpf`.

    Attributes:
      inner_state: the inner optimizer's state.
      mask: a params-shaped tree of ``bool`` arrays, ``True`` where the weight is kept. A
        prunable leaf's mask has the leaf's shape (unstructured) or ``(1, ..., 1, C)`` (one
        entry per output channel, ``structured=True``); a leaf that is never pruned has a
        scalar ``True``. :func:`masked_params` broadcasts it against the params.
      count: updates taken so far (int32, saturating at its maximum).
    """

    inner_state: optax.OptState
    mask: PyTree
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


class Sparsity(NamedTuple):
    """What :func:`sparsity` reports: fractions of weights that are exactly zero.

    Attributes:
      prunable: over the prunable tensors (what ``target_sparsity`` controls).
      overall: over every parameter (biases, norms and unpruned layers included).
    """

    prunable: jax.Array
    overall: jax.Array


def default_prunable(path: tuple[Any, ...], leaf: Any) -> bool:
    """The default choice of prunable tensors: every leaf of rank >= 2.

    These are the dense and convolution kernels; biases and normalisation scales and offsets
    (rank 1) are never pruned. The final classifier is pruned too, as the rank alone cannot
    tell it apart; pass a predicate on the path to keep it dense, e.g.
    ``lambda path, leaf: leaf.ndim >= 2 and "head" not in jax.tree_util.keystr(path)``.
    """
    del path
    return jnp.ndim(leaf) >= 2


def dpf(
    inner: optax.GradientTransformation,
    target_sparsity: float | jax.Array,
    *,
    end_step: int,
    begin_step: int = 0,
    schedule: Literal["cubic", "constant"] = "cubic",
    mask_every: int = 16,
    prunable: Prunable | None = None,
    structured: bool = False,
    feedback: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Dynamic Pruning with Feedback: dense weights, a refreshed magnitude mask.

    With dense weights :math:`w` (the params), mask :math:`m` (in the state) and the
    gradient :math:`g_t = \nabla L(\tilde w_t)` taken at the pruned weights
    :math:`\tilde w_t = m_t \odot w_t` (see the example), each update does

    .. math::

      w_{t+1} = w_t + \mathrm{inner}(g_t), \qquad
      m_{t+1} = \begin{cases} \mathrm{top}_{1 - s(t+1)}(|w_{t+1}|) & t + 1 \in R \\
      m_t & \text{otherwise,} \end{cases}

    where :math:`\mathrm{top}_{1-s}` keeps all but the :math:`n = \mathrm{round}(s N)`
    smallest magnitudes among the :math:`N` weights of the prunable tensors (ONE global
    threshold; ties are broken by position, so exactly :math:`n` are pruned), and the
    refresh steps are :math:`R = \{k : b \le k \le e,\ (k - b) \bmod p = 0 \text{ or }
    k = e\}` for ``begin_step`` :math:`b`, ``end_step`` :math:`e` and ``mask_every``
    :math:`p`. After step :math:`e` the mask is frozen, and its sparsity over the prunable
    tensors is exactly ``round(target_sparsity * N) / N``. The sparsity schedule (Zhu &
    Gupta) is

    .. math::

      s(k) = s_f \left(1 - \left(1 - \frac{\min(\max(k, b), e) - b}{e - b}\right)^3\right)
      \ (\texttt{"cubic"}), \qquad s(k) = s_f \ (\texttt{"constant"}, k \ge b),

    and :math:`s(k) = 0` for :math:`k < b`. The mask at ``init`` is the refresh at step 0
    when ``begin_step = 0`` (all kept for the cubic schedule), else all kept.

    The gradient is **not** masked (straight-through): the dense coordinates of pruned
    weights keep receiving the gradient signal (the error feedback of the paper) and come
    back when their magnitude grows past the threshold. Take the gradient with respect to
    the pruned tensor itself, ``jax.grad(loss)(optlab.masked_params(state, params))``, not
    through ``m * w`` (that would multiply it by the mask). Weight decay and momentum inside
    ``inner`` act on the dense weights.

    ``feedback=False`` is gradual magnitude pruning without feedback (the paper's baseline):
    the gradient is masked before ``inner`` and the emitted update sets pruned weights to
    zero in the dense copy (``w_{t+1} = m_{t+1} \odot (w_t + \mathrm{inner}(m_t \odot
    g_t))``), so a pruned weight never returns; the same train step serves both modes.

    This transform needs ``params`` and, without feedback, must be the **outermost** one
    (its update zeroes weights); put clipping and weight decay inside ``inner`` or before
    it in a chain. ``target_sparsity`` may be a traced value
    (``optax.inject_hyperparams(optlab.dpf)(inner, target_sparsity=0.9, end_step=...)``);
    the exact final count is then computed in the float dtype. A predicate ``prunable``
    is a callable, which ``inject_hyperparams`` would take for a schedule: name it in
    ``static_args`` there.

    Args:
      inner: the optimizer of the dense weights (extra args are forwarded to it).
      target_sparsity: the final fraction :math:`s_f \in [0, 1)` of pruned weights (or
        output channels, structured) among the prunable tensors.
      end_step: the update count :math:`e > b` at which the target is reached and the mask
        frozen (the paper's reproduction: 75% of training).
      begin_step: the update count :math:`b \ge 0` at which pruning starts.
      schedule: ``"cubic"`` (Zhu & Gupta, from 0 at :math:`b` to :math:`s_f` at :math:`e`)
        or ``"constant"`` (:math:`s_f` at every refresh from :math:`b` on).
      mask_every: the refresh period :math:`p \ge 1` in updates (16 in the paper).
      prunable: which tensors are pruned: a predicate ``prunable(path, leaf) -> bool`` on
        the key path of ``jax.tree_util.tree_flatten_with_path``, or a params-shaped tree
        of Python bools; ``None`` is :func:`default_prunable` (every leaf of rank >= 2).
      structured: prune whole output channels (the last axis of a kernel, flax's layout)
        by their L2 norm over the other axes, with one global ranking of the channels of
        all prunable tensors; ``target_sparsity`` is then the fraction of channels (the
        fraction of weights differs when layers have different fan-in; see
        :func:`sparsity`).
      feedback: ``True`` is DPF; ``False`` is gradual magnitude pruning (see above).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> params = {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2), "bias": jnp.zeros(2)}
      >>> tx = optlab.dpf(optax.sgd(0.01), target_sparsity=0.5, end_step=4, mask_every=2)
      >>> state = tx.init(params)
      >>> def loss(p, x):
      ...     return jnp.sum((x @ p["kernel"] + p["bias"] - 1.0) ** 2)
      >>> x = jnp.ones((3, 4))
      >>> @jax.jit
      ... def step(params, state):
      ...     pruned = optlab.masked_params(state, params)  # the forward pass sees these
      ...     grads = jax.grad(loss)(pruned, x)  # the gradient at the pruned weights ...
      ...     updates, state = tx.update(grads, state, params)
      ...     return optax.apply_updates(params, updates), state  # ... moves the dense ones
      >>> for _ in range(6):
      ...     params, state = step(params, state)
      >>> optlab.sparsity(optlab.masked_params(state, params)).prunable
      Array(0.5, dtype=float32)

    Reference:
      Lin, Stich, Barba, Dmitriev, Jaggi. *Dynamic Model Pruning with Feedback.* ICLR 2020.
      arXiv:2006.07253.
    """
    target = check_float_in_range(
        "target_sparsity", target_sparsity, low=0.0, high=1.0, high_inclusive=False
    )
    if callable(target):
        raise ValueError(
            "target_sparsity must be a number in [0, 1), got a callable; the schedule is "
            f"chosen with schedule= (one of {SCHEDULES})."
        )
    begin = check_injectable_int("begin_step", begin_step, min_value=0, max_value=_MAX_STEP)
    end = check_injectable_int("end_step", end_step, min_value=1, max_value=_MAX_STEP)
    period = check_injectable_int("mask_every", mask_every, min_value=1, max_value=_MAX_STEP)
    if isinstance(begin, int) and isinstance(end, int) and end <= begin:
        raise ValueError(
            f"end_step must be > begin_step ({begin}), got end_step={end}: the schedule "
            "needs at least one step to reach the target."
        )
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    for name, flag in (("structured", structured), ("feedback", feedback)):
        if not isinstance(flag, bool | np.bool_):
            raise ValueError(f"{name} must be a bool, got {flag!r}.")
    prunable = default_prunable if prunable is None else prunable
    if not callable(prunable) and not isinstance(prunable, dict | list | tuple):
        raise ValueError(
            "prunable must be a predicate prunable(path, leaf) -> bool or a params-shaped "
            f"tree of bools, got {prunable!r}."
        )
    inner = optax.with_extra_args_support(inner)

    def sparsity_at(k: jax.Array) -> jax.Array:
        """s(k) for an update count k (float32, or the float dtype of a traced target)."""
        s_f = jnp.asarray(target, dtype=jnp.result_type(float))
        if schedule == "constant":
            return jnp.where(k >= begin, s_f, 0.0)
        frac = (jnp.clip(k, begin, end) - begin) / (end - begin)
        return s_f * (1.0 - (1.0 - frac) ** 3)

    def pruned_count(k: jax.Array, units: int) -> jax.Array:
        """n(k) = round(s(k) N); exactly round(s_f N) from ``end_step`` on when s_f is
        a Python number (float32 products of large N would be off by one)."""
        n = jnp.round(sparsity_at(k) * units).astype(jnp.int32)
        if isinstance(target, int | float | np.floating | np.integer):
            n = jnp.where(k >= end, jnp.int32(round(float(target) * units)), n)
        return jnp.clip(n, 0, units)

    def is_refresh(k: jax.Array) -> jax.Array:
        on_grid = ((k - begin) % period == 0) | (k == end)
        return (k >= begin) & (k <= end) & on_grid

    def init_fn(params: PyTree) -> DPFState:
        flags = _prunable_flags(params, prunable)
        mask = _full_mask(params, flags, structured)
        count = jnp.zeros([], jnp.int32)
        # The step-0 refresh (the cubic schedule starts at sparsity 0: nothing to prune).
        if isinstance(begin, int) and begin == 0 and schedule == "constant":
            n = pruned_count(count, _units(params, flags, structured))
            mask = _magnitude_mask(params, flags, structured, n)
        return DPFState(inner_state=inner.init(params), mask=mask, count=count)

    def update_fn(
        updates: PyTree,
        state: DPFState,
        params: PyTree | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, DPFState]:
        if params is None:
            raise ValueError(
                "dpf needs params: call update(grads, state, params) with the dense weights "
                "(the mask is refreshed from them)."
            )
        flags = _prunable_flags(params, prunable)
        if not feedback:
            updates = _apply_mask(updates, state.mask, flags)
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        count = optax.safe_increment(state.count)
        n = pruned_count(count, _units(params, flags, structured))
        refresh = _refresh_when(flags, structured)
        mask = refresh(is_refresh(count), params, inner_updates, state.mask, n)
        if not feedback:
            # w_{t+1} = m_{t+1} * (w_t + u): pruned weights are zeroed in the dense copy.
            inner_updates = jax.tree.map(
                lambda u, p, m, f: jnp.where(m, u, -p.astype(u.dtype)) if f else u,
                inner_updates,
                params,
                mask,
                flags,
            )
        return inner_updates, DPFState(inner_state=inner_state, mask=mask, count=count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _prunable_flags(params: PyTree, prunable: Prunable) -> PyTree:
    """A params-shaped tree of Python bools: which leaves are pruned."""
    if callable(prunable):
        return jax.tree_util.tree_map_with_path(lambda path, p: bool(prunable(path, p)), params)
    try:
        flags = jax.tree.map(lambda p, f: f, params, prunable)
    except ValueError as error:
        raise ValueError(
            f"prunable must be a params-shaped tree of bools; its structure differs: {error}"
        ) from None
    for f in jax.tree.leaves(flags):
        if not isinstance(f, bool | np.bool_):
            raise ValueError(f"prunable must hold Python bools, got {f!r}.")
    return jax.tree.map(bool, flags)


def _mask_shape(leaf: Any, structured: bool) -> tuple[int, ...]:
    shape = jnp.shape(leaf)
    return (1,) * (len(shape) - 1) + shape[-1:] if structured else shape


def _full_mask(params: PyTree, flags: PyTree, structured: bool) -> PyTree:
    """Everything kept: ``True`` of the mask's shape for prunable leaves, scalar otherwise."""
    return jax.tree.map(
        lambda p, f: jnp.ones(_mask_shape(p, structured) if f else (), bool), params, flags
    )


def _scores(leaf: jax.Array, structured: bool) -> jax.Array:
    """The saliency of every pruning unit of one tensor, flat, in float32."""
    magnitude = jnp.abs(leaf.astype(jnp.float32))
    if not structured:
        return magnitude.reshape(-1)
    if leaf.ndim < 2:
        return magnitude.reshape(-1)  # a vector's channels are its entries
    squares = jnp.sum(jnp.square(magnitude), axis=tuple(range(leaf.ndim - 1)))
    return jnp.sqrt(squares)  # the L2 norm of each output channel (no NaN gradient needed)


def _units(params: PyTree, flags: PyTree, structured: bool) -> int:
    """N: the number of pruning units (weights, or output channels) of the prunable leaves."""
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(flags), strict=True)
    return sum(int(np.prod(_mask_shape(p, structured))) for p, f in leaves if f)


def _magnitude_mask(params: PyTree, flags: PyTree, structured: bool, pruned: jax.Array) -> PyTree:
    """Keeps all but the ``pruned`` smallest units over all prunable tensors (one global
    ranking; ties are broken by position, so the count is exact)."""
    leaves, treedef = jax.tree.flatten(params)
    leaf_flags = jax.tree.leaves(flags)
    scores = [_scores(p, structured) for p, f in zip(leaves, leaf_flags, strict=True) if f]
    units = sum(int(s.size) for s in scores)
    if units == 0:
        return _full_mask(params, flags, structured)
    flat = jnp.concatenate(scores)
    # The n-th smallest score is the threshold; everything below it is pruned, and of the
    # scores equal to it the first ones by position, up to n in all: the order of a stable
    # argsort. The threshold comes from a bisection on the scores' bits (non-negative
    # float32 order like their uint32 patterns; NaN last): 31 fused compare-and-count
    # passes, where XLA:CPU's sort (and argsort's scatter back) costs ~100x more.
    pruned = jnp.clip(pruned, 0, units)
    bits = jax.lax.bitcast_convert_type(flat, jnp.uint32)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits <= mid, dtype=jnp.int32) >= pruned
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    start = (jnp.uint32(0), jnp.uint32(0x7FFFFFFF))  # the sign bit is 0
    threshold, _ = jax.lax.fori_loop(0, 31, bisect, start)
    below = bits < threshold
    tie = bits == threshold
    ties_to_prune = pruned - jnp.sum(below, dtype=jnp.int32)
    # Usually every tie goes (distinct magnitudes: one tie); the position scan only when not.
    pruned_ties = jax.lax.cond(
        ties_to_prune >= jnp.sum(tie, dtype=jnp.int32),
        lambda: tie,
        lambda: tie & (jnp.cumsum(tie, dtype=jnp.int32) <= ties_to_prune),
    )
    prune = below | pruned_ties
    keep = ~prune | (pruned == 0)
    out, offset = [], 0
    for p, f in zip(leaves, leaf_flags, strict=True):
        if not f:
            out.append(jnp.ones((), bool))
            continue
        shape = _mask_shape(p, structured)
        size = int(np.prod(shape))
        out.append(keep[offset : offset + size].reshape(shape))
        offset += size
    return jax.tree.unflatten(treedef, out)


def _refresh_when(flags: PyTree, structured: bool) -> Callable[..., PyTree]:
    """``refresh(pred, params, updates, mask, n)``: the mask of ``params + updates`` when
    ``pred``, else ``mask``, under a ``lax.cond`` that stays a branch under ``jax.vmap``.

    A plain ``lax.cond`` with a batched predicate (several runs stacked under ``vmap``, each
    with its own step count) becomes a select that refreshes on every step. The batching
    rule here keeps one ``lax.cond`` on "any run refreshes", refreshes every run inside it and
    selects per run, so steps on which no run refreshes still cost nothing.
    """

    def compute(params: PyTree, updates: PyTree, n: jax.Array) -> PyTree:
        dense = jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, updates)
        return _magnitude_mask(dense, flags, structured, n)

    @jax.custom_batching.custom_vmap
    def refresh(pred, params, updates, mask, n):
        return jax.lax.cond(pred, lambda: compute(params, updates, n), lambda: mask)

    @refresh.def_vmap
    def refresh_batched(axis_size, in_batched, pred, params, updates, mask, n):
        def batched(x, is_batched):
            return x if is_batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))

        pred_b, params_b, updates_b, mask_b, n_b = in_batched
        operands = (
            batched(pred, pred_b),
            jax.tree.map(batched, params, params_b),
            jax.tree.map(batched, updates, updates_b),
            jax.tree.map(batched, mask, mask_b),
            batched(n, n_b),
        )

        def run(operands):
            pred, params, updates, mask, n = operands
            new = jax.vmap(compute)(params, updates, n)
            return jax.tree.map(
                lambda a, b: jnp.where(pred.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                new,
                mask,
            )

        out = jax.lax.cond(jnp.any(operands[0]), run, lambda ops: ops[3], operands)
        return out, jax.tree.map(lambda _: True, mask)

    return refresh


def _apply_mask(tree: PyTree, mask: PyTree, flags: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x, m, f: jnp.where(m, x, jnp.zeros((), x.dtype)) if f else x, tree, mask, flags
    )


def _find_state(opt_state: PyTree, caller: str) -> DPFState:
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, DPFState))
    found = [n for n in nodes if isinstance(n, DPFState)]
    if not found:
        raise ValueError(f"{caller}: opt_state holds no DPFState (was it built with optlab.dpf?).")
    if len(found) > 1:
        raise ValueError(
            f"{caller}: opt_state holds {len(found)} DPF states side by side; apply the "
            "mask of the one you want."
        )
    return found[0]


def masked_params(opt_state: PyTree, params: PyTree) -> PyTree:
    """The pruned weights ``mask * params``: evaluate the loss and the model here.

    Finds the :class:`DPFState` anywhere inside ``opt_state`` (an ``optax.chain``,
    ``optax.MultiSteps``, ``optax.inject_hyperparams`` or ``flax.nnx.Optimizer`` state, or
    a train state's ``opt_state``) and zeroes the params its mask prunes (same dtypes).

    Raises:
      ValueError: ``opt_state`` holds no DPF state, or several side by side (e.g. under
        ``optax.multi_transform``).
    """
    mask = jax.tree.leaves(_find_state(opt_state, "masked_params").mask)
    leaves, treedef = jax.tree.flatten(params)
    if len(mask) != len(leaves):
        raise ValueError(
            f"masked_params: params have {len(leaves)} leaves, the DPF mask {len(mask)}."
        )
    # Leaf by leaf: flax.nnx wraps the params and the optimizer state in different
    # Variable types, so the two trees match in their leaves only.
    pruned = [jnp.where(m, p, jnp.zeros((), p.dtype)) for p, m in zip(leaves, mask, strict=True)]
    return jax.tree.unflatten(treedef, pruned)


def sparsity(params: PyTree, prunable: Prunable | None = None) -> Sparsity:
    """The fraction of exactly-zero weights over the prunable tensors and over all params.

    Pass the pruned weights (:func:`masked_params`) to measure what a mask achieved. Jit
    compatible; an empty selection reports 0.

    Args:
      params: a tree of arrays.
      prunable: the same selection as given to :func:`dpf` (predicate or tree of bools;
        ``None``: :func:`default_prunable`).
    """
    prunable = default_prunable if prunable is None else prunable
    flags = jax.tree.leaves(_prunable_flags(params, prunable))
    leaves = jax.tree.leaves(params)
    zeros = [jnp.sum(jnp.asarray(p) == 0, dtype=jnp.int32) for p in leaves]
    sizes = [int(np.size(p)) for p in leaves]
    sel_zeros = sum((z for z, f in zip(zeros, flags, strict=True) if f), jnp.int32(0))
    sel_size = sum(s for s, f in zip(sizes, flags, strict=True) if f)
    all_zeros = sum(zeros, jnp.int32(0))
    total = sum(sizes)
    return Sparsity(
        prunable=(sel_zeros / max(sel_size, 1)).astype(jnp.float32),
        overall=(all_zeros / max(total, 1)).astype(jnp.float32),
    )

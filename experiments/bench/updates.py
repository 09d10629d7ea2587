"""Update-only benchmark: ``jit(tx.update)`` of every entry on model-shaped pytrees."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from experiments.bench.registry import SGD_NAME, BenchEntry
from experiments.bench.timing import interleaved_times, median, ratio
from experiments.bench.trees import model_like_tree, tree_nbytes
from experiments.models import param_count

__all__ = ["bench_updates", "make_update_fn", "quadratic_grad_fn"]

PyTree = Any


def quadratic_grad_fn(target: PyTree) -> Callable[[PyTree], PyTree]:
    """The ``grad_fn`` the update benchmark passes: the gradient of ``0.5 |p - target|^2``.

    A cheap stand-in for a loss over a fixed batch: one fused elementwise loop that reads
    ``params`` and ``target`` and writes the gradient (12 B/param per call). Entries with
    ``needs_grad_fn`` include this traffic in their ``bytes_per_param``.
    """

    def grad_fn(params: PyTree) -> PyTree:
        return jax.tree.map(lambda p, t: p - t, params, target)

    return grad_fn


def make_update_fn(
    entry: BenchEntry, tx: optax.GradientTransformation
) -> Callable[..., tuple[PyTree, PyTree]]:
    """The jitted ``(grads, state, params[, target]) -> (state, updates)`` for one entry.

    The optimizer state is donated, as in the train step: the new state is written into the
    old state's buffers and the caller feeds it back into the next call. Without donation
    every call would also allocate a fresh state, and on CPU fresh buffers of this size cost
    a page fault per 4 KiB page (first touch), which is allocator work, not the update's.
    The new state comes *first* in the outputs: JAX pairs each output with the first donated
    input of the same shape and dtype, in output order, so with ``(updates, state)`` the
    updates would take the buffer of the first params-shaped state leaf and every such leaf
    would shift by one (the train step returns its state first too, so it is paired
    leaf by leaf). A state leaf passed through unchanged (Lookahead's slow weights off a
    sync step) then costs nothing instead of a copy.
    Gradients and params are not donated (fixed inputs, reused by every call); the updates
    are a fresh output. ``target`` is an argument rather than a closed-over constant, so it
    is not folded into the compiled program; it is passed only to entries with
    ``needs_grad_fn``, so plain entries see exactly ``tx.update(grads, state, params)``.
    """
    if entry.needs_grad_fn:
        tx = optax.with_extra_args_support(tx)

    if entry.needs_grad_fn:

        def update(grads: PyTree, state: PyTree, params: PyTree, target: PyTree):
            params = params if entry.params_in_update else None
            updates, state = tx.update(grads, state, params, grad_fn=quadratic_grad_fn(target))
            return state, updates

    else:

        def update(grads: PyTree, state: PyTree, params: PyTree):  # type: ignore[misc]
            updates, state = tx.update(grads, state, params if entry.params_in_update else None)
            return state, updates

    return jax.jit(update, donate_argnums=1)


def bench_updates(
    entries: Sequence[BenchEntry],
    sizes: Sequence[int],
    *,
    reps: int,
    bandwidth_gbs: float,
    steps_per_rep: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Times every entry's update at every size, entries interleaved within a size.

    One timed sample is ``steps_per_rep`` consecutive updates (the state carried forward);
    the per-update time is the sample over ``steps_per_rep``. A transform that does more
    work every k-th step (Lookahead syncs every 5) is then measured at its average cost when
    ``steps_per_rep`` is a multiple of k: with one update per sample the median is the cost
    of its cheap ordinary steps only.

    Args:
      entries: what to measure; ratios are reported against the entry named
        :data:`~experiments.bench.registry.SGD_NAME` and each entry's counterpart when they
        are among ``entries``.
      sizes: approximate parameter counts (the tree is model-shaped; rows give exact counts).
      reps: timed samples per entry and size (after one warm-up sample).
      bandwidth_gbs: the measured in-place bandwidth, for the fraction column.
      steps_per_rep: consecutive updates per timed sample.
      seed: for the random params, gradients and grad_fn target.

    Returns:
      One row per (size, entry): ``name, num_params, bytes_per_param, time_s`` (median
      per-update time), ``mean_time_s`` (mean over all samples: rare, costlier steps such as
      upper-level syncs count in proportion, but so does noise), ``gbs,
      fraction_of_bandwidth, ratio_to_sgd, counterpart, ratio_to_counterpart, state_bytes,
      state_bytes_per_param, times_s`` (per-update time of each sample). Ratios are of
      medians and ``None`` when the reference is absent.
    """
    rows: list[dict[str, Any]] = []
    for size in sizes:
        rng = np.random.default_rng(seed)
        params = model_like_tree(size, rng, scale=0.05)
        grads = model_like_tree(size, rng, scale=1e-3)
        target = model_like_tree(size, rng, scale=0.05)
        n = param_count(params)
        runners, state_bytes = _make_runners(entries, grads, params, target, steps_per_rep)
        samples = interleaved_times(runners, reps=reps, desc=f"updates {n:,}")
        times = {name: [t / steps_per_rep for t in ts] for name, ts in samples.items()}
        med = {name: median(ts) for name, ts in times.items()}
        for entry in entries:
            t = med[entry.name]
            gbs = entry.bytes_per_param * n / t / 1e9
            rows.append(
                {
                    "name": entry.name,
                    "num_params": n,
                    "bytes_per_param": float(entry.bytes_per_param),
                    "time_s": t,
                    "mean_time_s": float(np.mean(times[entry.name])),
                    "gbs": gbs,
                    "fraction_of_bandwidth": gbs / bandwidth_gbs,
                    "ratio_to_sgd": ratio(t, med.get(SGD_NAME)),
                    "counterpart": entry.counterpart,
                    "ratio_to_counterpart": ratio(t, med.get(entry.counterpart or "")),
                    "state_bytes": state_bytes[entry.name],
                    "state_bytes_per_param": state_bytes[entry.name] / n,
                    "times_s": times[entry.name],
                }
            )
    return rows


def _make_runners(
    entries: Sequence[BenchEntry],
    grads: PyTree,
    params: PyTree,
    target: PyTree,
    steps_per_rep: int,
) -> tuple[dict[str, Callable[[], None]], dict[str, int]]:
    """``steps_per_rep`` blocking update calls per entry, and its optimizer-state bytes."""
    runners: dict[str, Callable[[], None]] = {}
    state_bytes: dict[str, int] = {}
    for entry in entries:
        tx = entry.make()
        entry_params = entry.make_params(params) if entry.make_params is not None else params
        # jit: eager init would compile one small program per distinct leaf shape. The copy
        # (may_alias=False) keeps donation from deleting params that init may hand back.
        state = jax.device_put(jax.jit(tx.init)(entry_params), may_alias=False)
        state_bytes[entry.name] = tree_nbytes(state)
        fn = make_update_fn(entry, tx)
        holder = {"state": jax.block_until_ready(state)}
        extra = (target,) if entry.needs_grad_fn else ()

        def run(fn=fn, holder=holder, extra=extra, entry_params=entry_params) -> None:
            for _ in range(steps_per_rep):
                holder["state"], updates = fn(grads, holder["state"], entry_params, *extra)
                jax.block_until_ready((updates, holder["state"]))
                del updates  # freed before the next call, as in a training loop

        runners[entry.name] = run
    return runners, state_bytes

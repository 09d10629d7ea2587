"""Two-pass training: train, keep the final weights w*, replay the run measuring the path.

The geometry of an optimisation path (``optlab.path_geometry``: RSI, EB, their cosine, the
locally optimal step size) is measured against the *end* of the path, which is only known
once the run has finished. :func:`train_and_replay` therefore trains every run twice, as
the official code of Guille-Escuret et al. (ICML 2024) does:

1. **pass 1** trains the runs (seeds x float grid points, vectorized as in
   :mod:`experiments.train.vectorized`) and keeps the final params ``w_T``;
2. **pass 2** replays the identical runs (same init, seeds, batches, step keys and
   optimizer) and measures, at every step ``t`` before the update, the geometry of
   the step's own mini-batch gradient ``G(w_t)`` (what the optimizer receives, after
   micro-batch accumulation) and of the update direction ``−u_t`` against ``w* = w_T``,
   and optionally of the gradient on a **fixed measurement batch** (the same examples at
   every step, so sampling noise and drift can be told apart).

Both passes run the **same compiled program**: the reference point is an input (pass 1
gets the initial params, and its measurements are discarded), and the recorder is a
pass-through transform in front of the optimizer that writes the measurements into its
own state and hands the gradient on unchanged. Since nothing the trajectory depends on
differs between the passes, pass 2 reproduces pass 1 bitwise; the driver checks it
(params, optimizer state and every step's loss) and raises if not.

The step is :func:`experiments.train.vectorized.make_run_step` (one run's step of the
study runner, with its step keys, micro-batches and extra args), and pass 1 follows the
batches of a :class:`~experiments.train.plans.BatchPlan` exactly as
:func:`~experiments.train.vectorized.train_group` does, so the replayed runs are the
study's runs (equal to the study's own trained weights up to floating-point rounding:
the study's chunked program is a different compilation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optlab
from experiments.train.plans import BatchPlan
from experiments.train.vectorized import TxFactory, init_group_state, make_run_step

__all__ = ["GEOMETRY_FIELDS", "ReplayResult", "train_and_replay"]

PyTree = Any
GEOMETRY_FIELDS = optlab.PathGeometry._fields
_REFERENCE = "__reference__"  # the hparams key that carries w* into make_tx (a pytree)


class _RecorderState(NamedTuple):
    """The inner optimizer's state plus the last step's measurements (scalars)."""

    inner: PyTree
    gradient: optlab.PathGeometry
    update: optlab.PathGeometry


def _recorded(
    inner: optax.GradientTransformation, reference: PyTree | None
) -> optax.GradientTransformationExtraArgs:
    """``inner`` with the geometry of its input gradient and of its update recorded.

    The updates are ``inner``'s, unchanged; ``reference`` may be ``None`` for ``init``.
    """
    inner = optax.with_extra_args_support(inner)

    def zeros(params):
        dtype = jnp.result_type(jnp.float32, *jax.tree.leaves(params))
        return optlab.PathGeometry(*(jnp.zeros((), dtype) for _ in GEOMETRY_FIELDS))

    def init(params):
        return _RecorderState(inner.init(params), zeros(params), zeros(params))

    def update(grads, state, params=None, **extra):
        if params is None or reference is None:
            raise ValueError("the path-geometry recorder needs params and a reference point.")
        updates, inner_state = inner.update(grads, state.inner, params, **extra)
        direction = jax.tree.map(jnp.negative, updates)
        return updates, _RecorderState(
            inner_state,
            optlab.path_geometry(grads, params, reference),
            optlab.path_geometry(direction, params, reference),
        )

    return optax.GradientTransformationExtraArgs(init, update)


class ReplayResult(NamedTuple):
    """What :func:`train_and_replay` returns (run axis ``R``, step axis ``S``).

    Attributes:
      params: the final params of pass 1, stacked ``[R, ...]``: the reference points w*.
      replay_params: the final params of pass 2 (bitwise equal to ``params``; checked).
      gradient: ``{field: float64[R, S]}``, the geometry of the step's training-batch
        gradient at ``w_t`` against w* (fields of :class:`optlab.PathGeometry`).
      update: the same for the update direction ``−u_t = w_t − w_{t+1}``.
      measure: the same for the gradient on the fixed measurement batch, or ``{}``.
      loss: float64 ``[R, S]``, the training loss of every step (of pass 2, equal to 1's).
    """

    params: PyTree
    replay_params: PyTree
    gradient: dict[str, np.ndarray]
    update: dict[str, np.ndarray]
    measure: dict[str, np.ndarray]
    loss: np.ndarray


def train_and_replay(
    *,
    loss_fn: Callable[..., Any],
    make_tx: TxFactory,
    init_fn: Callable[[jax.Array], tuple[PyTree, PyTree]],
    x: np.ndarray,
    y: np.ndarray,
    plan: BatchPlan,
    seeds: Sequence[int],
    steps: int,
    hparams: Mapping[str, Sequence[float]] | None = None,
    measure_batch: tuple[np.ndarray, np.ndarray] | None = None,
) -> ReplayResult:
    """Trains ``len(seeds)`` runs, then replays them measuring the path against their end.

    Args:
      loss_fn: ``loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics))``,
        as for :func:`~experiments.train.vectorized.train_group` (the geometry is that of
        this loss's gradient: leave weight decay out of it to measure the paper's G).
      make_tx: ``make_tx(hparams, axis_name) -> transform`` (``axis_name`` is None here).
      init_fn: ``init_fn(key) -> (params, model_state)``; run ``r`` uses ``key(seeds[r])``.
      x, y: the training arrays; ``plan`` indexes into them (one model per run: no workers).
      plan: the batch plan, as the study's (e.g. ``EpochPlan(len(x), batch_size)``).
      seeds: one per run.
      steps: steps per run.
      hparams: ``{name: [value per run]}`` float hyperparameters (may be empty).
      measure_batch: ``(x_m, y_m)``, a fixed batch whose gradient (at the step's model
        state, with a fixed key) is also measured at every step; None: not measured.

    Returns:
      A :class:`ReplayResult`.

    Raises:
      ValueError: for a worker plan, no seeds, or hparams of the wrong length.
      RuntimeError: if pass 2 does not reproduce pass 1 bitwise.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one run, got [].")
    if plan.workers:
        raise ValueError(f"train_and_replay needs a plan without workers, got {plan.workers}.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    hp = {k: jnp.asarray(list(v), jnp.float32) for k, v in (hparams or {}).items()}
    for name, values in hp.items():
        if values.shape != (len(seeds),):
            raise ValueError(
                f"hparams[{name!r}] has {values.shape[0]} values for {len(seeds)} runs (seeds)."
            )

    def recorded_tx(hparams, axis_name):
        floats = {k: v for k, v in hparams.items() if k != _REFERENCE}
        return _recorded(make_tx(floats, axis_name), hparams.get(_REFERENCE))

    step = make_run_step(loss_fn, recorded_tx, max_micro=plan.max_micro)
    # Under one jit: built eagerly, the optimizer state's many small ops compile one by one.
    state0 = jax.jit(lambda hp: init_group_state(init_fn, recorded_tx, seeds, hp))(hp)
    per_run = [plan.indices(seed, range(steps)) for seed in seeds]
    idx = jnp.asarray(np.stack([p["idx"] for p in per_run], axis=1))  # [S, R, M, mb]
    n_micro = jnp.asarray(np.stack([p["n_micro"] for p in per_run], axis=1))  # [S, R]
    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y)
    measured = measure_batch is not None
    m_batch = (
        {"x": jnp.asarray(measure_batch[0]), "y": jnp.asarray(measure_batch[1])}
        if measure_batch is not None
        else {}
    )

    @jax.jit
    def run(state, reference, x, y, idx, n_micro, m_batch):
        no_active = jnp.zeros((len(seeds), 0), bool)

        def measure(params, model_state, reference):
            loss = lambda p: loss_fn(p, model_state, m_batch, jax.random.key(0))[0]
            return optlab.path_geometry(jax.grad(loss)(params), params, reference)

        def body(state, xs):
            i, n = xs
            geo = jax.vmap(measure)(state.params, state.model_state, reference) if measured else ()
            hparams = {**hp, _REFERENCE: reference}
            state, metrics = jax.vmap(step, in_axes=(0, None, None, 0, 0, 0, 0))(
                state, x, y, i, n, no_active, hparams
            )
            out = (state.opt_state.gradient, state.opt_state.update, geo, metrics["loss"])
            return state, out

        return jax.lax.scan(body, state, (idx, n_micro))

    data = (x_dev, y_dev, idx, n_micro, m_batch)
    first, (_, _, _, first_loss) = run(state0, state0.params, *data)
    second, (gradient, update, geo, loss) = run(state0, first.params, *data)
    same = _bitwise_equal(
        (first.params, first.model_state, first.opt_state.inner, first_loss),
        (second.params, second.model_state, second.opt_state.inner, loss),
    )
    if not same:
        raise RuntimeError(
            "the replay did not reproduce the first pass bitwise; the path measurements "
            "would not be those of the trained run (nondeterministic ops on this backend?)."
        )

    def fields(g) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, np.float64).T for k, v in g._asdict().items()}

    return ReplayResult(
        params=first.params,
        replay_params=second.params,
        gradient=fields(gradient),
        update=fields(update),
        measure=fields(geo) if measured else {},
        loss=np.asarray(loss, np.float64).T,
    )


def _bitwise_equal(a: PyTree, b: PyTree) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(u).dtype == np.asarray(v).dtype
        and np.asarray(u).tobytes() == np.asarray(v).tobytes()
        for u, v in zip(la, lb, strict=True)
    )

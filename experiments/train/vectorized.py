"""Many runs as one jitted program: a leading run axis, and optionally a worker axis.

Runs that share shapes (the seeds of a method, the points of a float hyperparameter grid)
train together: their states are stacked along a leading *run* axis and one
``jax.vmap``-ed step advances all of them, ``log_every`` steps per dispatch under
``lax.scan``. One compile serves every run of the group; evaluation, checkpoints and
divergence checks are per group, not per run.

Two layouts of a run:

- **replicated** (``plan.workers == 0``): one model per run. With ``devices > 1`` every
  micro-batch is split over a ``"data"`` mesh axis and the gradient averaged (synchronous
  data parallelism, equal to the one-device step on the whole batch).
- **worker-local** (``plan.workers == W``): every run holds W copies of params, model
  state and optimizer state (a second leading axis), each worker trains on its own
  batches, and the gradient is **not** averaged: the optimizer is built with
  ``axis_name=WORKER_AXIS`` and communicates itself (``optlab.mean_gradients`` gives
  synchronous data parallelism back; Local SGD, DiLoCo, gossip and federated methods
  average something else, or less often). Workers are simulated with
  ``jax.vmap(..., axis_name="workers")`` on one device, or sharded over devices with
  ``jax.shard_map`` (W a multiple of the device count; the transform's ``axis_name`` is
  then the pair ``("workers", "local")`` when a device holds several workers, so pass it
  through rather than hard-coding the string).

The step of one run (either layout) accumulates ``n_micro`` micro-batches (see
:mod:`experiments.train.plans`): the loss, the gradient, ``grad_fn`` and ``value_fn`` are
means over them, so a SAM-type transform takes its second gradient on the same
accumulated batch. Extra args handed to the optimizer: ``grad_fn``, ``value_fn``,
``value``, ``grad`` and, when the plan samples clients, ``active`` (bool ``[W]``).

**Skipping the gradient** (``grad_skip``, PALSGD's pseudo-synchronisation steps): a
predicate of one worker's optimizer state, read *before* the forward/backward pass, says
that the update will ignore the gradient. The chunk reduces it over everything it maps
(all runs and all workers of the device, or of the program on one device) to one scalar,
and the step takes the forward/backward pass under a ``lax.cond`` on that scalar. It is a
real branch, so a skipped step computes no gradient, **only when every run and worker of
the device agrees**: shared coins with one coin seed for every run, or one worker per
device under ``shard_map`` (per-worker coins). Otherwise (per-worker coins simulated
under ``vmap``) every worker computes its gradient and the update discards it: the
result is the same bitwise, the time is not saved. Two metrics count it, per worker:
``grad_evals`` (the gradients the method needs, 1 - predicate) and ``grad_evals_run``
(the gradients this program computed); the other logged training metrics average over
the steps that computed one.

Divergence is tracked per run (``TrainState.first_nonfinite_step``); a diverged run keeps
training on NaNs without touching the others, and the caller scores it.

Resuming: checkpoints hold the stacked state at chunk boundaries; a resumed group replays
the same chunks and ends bitwise equal to an uninterrupted one (tested).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.train.checkpoint import Checkpointer
from experiments.train.metrics import MetricsWriter
from experiments.train.plans import BatchPlan
from experiments.train.step import DATA_AXIS, LossFn, TrainState, init_train_state
from optlab.parallel import pmean, pvary

__all__ = [
    "LOCAL_AXIS",
    "WORKER_AXIS",
    "GroupResult",
    "StackedEvaluator",
    "TxFactory",
    "group_eval_weights",
    "make_run_step",
    "train_group",
]

PyTree = Any
WORKER_AXIS = "workers"
LOCAL_AXIS = "local"
AxisName = str | tuple[str, ...]

# make_tx(hparams, axis_name) -> transform. ``hparams`` holds this run's float
# hyperparameters as traced scalars; ``axis_name`` is the worker axis (None: replicated).
TxFactory = Callable[[Mapping[str, jax.Array], AxisName | None], optax.GradientTransformation]
# evaluate(params [R, ...], model_state [R, ...]) -> {metric: [R]} (jit-compatible)
StackedEvaluator = Callable[[PyTree, PyTree], dict[str, jax.Array]]


class GroupResult(NamedTuple):
    """What :func:`train_group` returns.

    Attributes:
      state: the final stacked :class:`TrainState` (leading run axis, then workers).
      final: ``{name: float64[R]}`` of ``evaluate`` and ``final_evaluate`` at the end.
      diverged_at: int64 ``[R]``, the first step whose loss was non-finite, or -1.
      train_time_s: seconds spent in the jitted training chunks (dispatch to completion),
        the group's training compute as the harness sees it.
      start_step: the step the group resumed from (0 for a fresh start).
    """

    state: TrainState
    final: dict[str, np.ndarray]
    diverged_at: np.ndarray
    train_time_s: float
    start_step: int


def make_run_step(
    loss_fn: LossFn,
    make_tx: TxFactory,
    *,
    data_axis: str | None = None,
    worker_axis: AxisName | None = None,
    max_micro: int = 1,
    sampled: bool = False,
    grad_skip: Callable[[PyTree], jax.Array] | None = None,
    micro_batch: int = 0,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The step of ONE run: ``(state, x, y, idx, n_micro, active, hparams) -> (state, metrics)``.

    ``idx`` is int32 ``[max_micro, micro_batch]`` (this worker's, in worker mode), gathered
    from the device-resident ``x``/``y``. With ``data_axis`` the gradient (and loss and
    metrics) are averaged over it (replicated data parallelism); with ``worker_axis`` only
    the logged loss and metrics are averaged, the optimizer receives this worker's own
    gradient. ``active`` is forwarded to the optimizer when ``sampled``; with
    ``micro_batch > 0`` the step's batch size ``n_micro * micro_batch`` is forwarded as the
    extra argument ``batch_size`` (adaptive batch plans).

    With ``grad_skip`` (``grad_skip(opt_state) -> bool``, e.g.
    :func:`optlab.palsgd_is_pseudo_sync`) the step takes one more argument, ``skip``: a
    scalar bool that must not be batched (the caller reduces ``grad_skip`` over all it
    maps); when true the forward/backward pass is skipped under a ``lax.cond`` and the
    optimizer receives zeros. ``grad_skip`` of this worker's state also keeps its model
    state (no forward pass) whether or not the pass ran, so both give the same result.
    """

    def step(state, x, y, idx, n_micro, active, hparams, skip=None):
        tx = optax.with_extra_args_support(make_tx(hparams, worker_axis))
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if worker_axis is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(worker_axis))

        def micro(j):
            return {"x": x[idx[j]], "y": y[idx[j]]}

        def micro_rng(j):  # one batch: the step's key itself, as the one-run train step
            return rng if max_micro == 1 else jax.random.fold_in(rng, j)

        def one(params, model_state, j):
            (loss, (model_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                pvary(params, data_axis), model_state, micro(j), micro_rng(j)
            )
            return loss, model_state, metrics, grads

        def accumulated(params):
            if max_micro == 1:
                out = one(params, state.model_state, 0)
            else:
                # The model state (BatchNorm statistics) threads through the micro-batches.
                first = one(params, state.model_state, 0)

                def body(j, carry):
                    loss, model_state, metrics, grads = one(params, carry[1], j)
                    add = lambda a, b: a + b
                    return (
                        carry[0] + loss,
                        model_state,
                        jax.tree.map(add, carry[2], metrics),
                        jax.tree.map(add, carry[3], grads),
                    )

                loss, model_state, metrics, grads = jax.lax.fori_loop(1, n_micro, body, first)
                scale = 1.0 / n_micro.astype(jnp.float32)
                mean = lambda t: jax.tree.map(lambda v: (v * scale).astype(v.dtype), t)
                out = (mean(loss), model_state, mean(metrics), mean(grads))
            loss, model_state, metrics, grads = out
            loss, model_state, metrics, grads = pmean(
                (loss, model_state, metrics, grads), data_axis
            )
            return loss, model_state, metrics, grads

        counts = {}
        if grad_skip is None:
            loss, model_state, metrics, grads = accumulated(state.params)
        else:
            needed = ~grad_skip(state.opt_state)
            shapes = jax.eval_shape(accumulated, state.params)

            def skipped(params):
                del params
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
                return (zeros[0], state.model_state, *zeros[2:])

            loss, model_state, metrics, grads = jax.lax.cond(
                skip, skipped, accumulated, state.params
            )
            model_state = jax.tree.map(
                lambda new, old: jnp.where(needed, new, old), model_state, state.model_state
            )
            counts = {
                "grad_evals": needed.astype(jnp.float32),
                "grad_evals_run": jnp.where(skip, 0.0, 1.0).astype(jnp.float32),
            }
        extra = {"active": active} if sampled else {}
        if micro_batch:
            extra["batch_size"] = n_micro * micro_batch
        updates, opt_state = tx.update(
            grads,
            state.opt_state,
            state.params,
            grad_fn=lambda p: accumulated(p)[3],
            value_fn=lambda p: accumulated(p)[0],
            value=loss,
            grad=grads,
            **extra,
        )
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, **counts}
        if worker_axis is not None:  # logged values only: the run's mean over workers
            loss, metrics = jax.lax.pmean((loss, metrics), worker_axis)
        bad = (state.first_nonfinite_step < 0) & ~jnp.isfinite(loss)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            rng=state.rng,
            first_nonfinite_step=jnp.where(bad, state.step, state.first_nonfinite_step),
        )
        return new_state, {"loss": loss, **metrics}

    return step


class _Layout(NamedTuple):
    """How a group's arrays are placed and which axes its step maps over."""

    chunk: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    put_state: Callable[[TrainState], TrainState]
    put_plan: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]
    put_data: Callable[[Any], Any]
    worker_axis: AxisName | None


def _layout(
    loss_fn: LossFn,
    make_tx: TxFactory,
    plan: BatchPlan,
    devices: int,
    sampled: bool,
    grad_skip: Callable[[PyTree], jax.Array] | None = None,
    adaptive: bool = False,
) -> _Layout:
    """Builds the jitted chunk function for one device, data parallel or worker sharded.

    ``adaptive`` (a plan with ``observe``): ``live`` is per step and run, ``[S, R]``; a run
    not live at a step keeps its state, and the optimizer receives ``batch_size``.
    """
    workers = plan.workers
    mesh = None
    if devices > 1:
        if workers and workers % devices:
            raise ValueError(
                f"workers ({workers}) must be a multiple of devices ({devices}) to shard them."
            )
        if not workers and plan.micro_batch % devices:
            raise ValueError(
                f"batch_size ({plan.micro_batch}) must be divisible by devices ({devices})."
            )
        mesh = _mesh(devices, WORKER_AXIS if workers else DATA_AXIS)
    local = workers // devices if (workers and devices > 1) else workers
    if not workers:
        worker_axis: AxisName | None = None
    elif devices > 1 and local > 1:
        worker_axis = (WORKER_AXIS, LOCAL_AXIS)
    else:
        worker_axis = WORKER_AXIS
    data_axis = DATA_AXIS if (devices > 1 and not workers) else None
    step = make_run_step(
        loss_fn,
        make_tx,
        data_axis=data_axis,
        worker_axis=worker_axis,
        max_micro=plan.max_micro,
        sampled=sampled,
        grad_skip=grad_skip,
        micro_batch=plan.micro_batch if adaptive else 0,
    )

    def per_run(state, x, y, idx, n_micro, active, hparams, skip):
        """One run's step; in worker mode, mapped over its (local) workers."""
        if not workers:
            return step(state, x, y, idx, n_micro, active, hparams, skip)
        if devices > 1 and local == 1:  # the mesh axis is the worker axis
            squeeze = lambda t: jax.tree.map(lambda a: a[0], t)
            expand = lambda t: jax.tree.map(lambda a: a[None], t)
            out = step(squeeze(state), x, y, idx[0], n_micro, active, hparams, skip)
            return expand(out)
        name = LOCAL_AXIS if devices > 1 else WORKER_AXIS
        return jax.vmap(step, in_axes=(0, None, None, 0, None, None, None, None), axis_name=name)(
            state, x, y, idx, n_micro, active, hparams, skip
        )

    vmapped = jax.vmap(per_run, in_axes=(0, None, None, 0, 0, 0, 0, None))
    lead = 2 if workers else 1  # [R, (W,) ...]: the axes the predicate is mapped over

    def mapped(state, x, y, idx, n_micro, active, hparams):
        skip = None
        if grad_skip is not None:
            # One scalar for the whole device: a real branch needs an unbatched predicate.
            read = grad_skip
            for _ in range(lead):
                read = jax.vmap(read)
            skip = jnp.all(read(state.opt_state))
        return vmapped(state, x, y, idx, n_micro, active, hparams, skip)

    def chunk_body(state, x, y, idx, n_micro, active, live, hparams):
        """``log_every`` steps under ``lax.scan``; steps with ``live`` false are skipped.

        Every chunk has the same length, so the last, shorter one needs no second compile:
        its padding steps take the untaken-branch-free ``lax.cond`` and cost nothing.
        """

        def scan_step(carry, xs):
            i, n, a, on = xs
            metrics_shape = jax.eval_shape(mapped, carry, x, y, i, n, a, hparams)[1]

            def skip(carry):
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)
                return carry, zeros

            def run(carry):
                new, metrics = mapped(carry, x, y, i, n, a, hparams)
                if adaptive:  # per-run liveness: a finished run keeps its state
                    keep = lambda n, o: jnp.where(on.reshape(on.shape + (1,) * (n.ndim - 1)), n, o)
                    new = jax.tree.map(keep, new, carry)
                return new, metrics

            return jax.lax.cond(on.any() if adaptive else on, run, skip, carry)

        return jax.lax.scan(scan_step, state, (idx, n_micro, active, live))

    if mesh is None:
        device = jax.devices()[0]
        return _Layout(
            chunk=jax.jit(chunk_body, donate_argnums=0),
            put_state=lambda s: jax.device_put(s, device, may_alias=False),
            put_plan=lambda p: jax.device_put(p, device),
            put_data=lambda a: jax.device_put(a, device),
            worker_axis=worker_axis,
        )
    from experiments.train.step import _put_global

    if workers:
        state_spec = P(None, WORKER_AXIS)  # [R, W, ...]
        idx_spec = P(None, None, WORKER_AXIS)  # [S, R, W, M, mb]
    else:
        state_spec = P()
        idx_spec = P(None, None, None, DATA_AXIS)  # [S, R, M, mb]
    replicated = NamedSharding(mesh, P())
    specs = (state_spec, P(), P(), idx_spec, P(), P(), P(), P())
    sharded = jax.shard_map(
        chunk_body,
        mesh=mesh,
        in_specs=specs,
        out_specs=(state_spec, P()),
        # Worker mode: every array is per worker, and collectives over the pair
        # (mesh axis, vmap axis) are not expressible under the varying-axis checker.
        check_vma=not workers,
    )

    def put_plan(p):
        return {
            k: _put_global(v, NamedSharding(mesh, idx_spec if k == "idx" else P()))
            for k, v in p.items()
        }

    state_sharding = NamedSharding(mesh, state_spec)
    return _Layout(
        chunk=jax.jit(sharded, donate_argnums=0),
        put_state=lambda s: _put_global(jax.tree.map(jnp.copy, s), state_sharding),
        put_plan=put_plan,
        put_data=lambda a: _put_global(a, replicated),
        worker_axis=worker_axis,
    )


def group_eval_weights(
    state: TrainState,
    eval_params: Callable[[TrainState], PyTree] | None,
    workers: int,
    worker_eval: str = "mean",
) -> tuple[PyTree, PyTree]:
    """The weights to evaluate of every run, stacked: ``(params [R, ...], model_state)``.

    ``eval_params`` maps ONE run's (one worker's) state to its weights (default
    ``state.params``). In worker mode ``worker_eval="mean"`` averages the workers'
    params and model state; ``"per_worker"`` flattens runs x workers into one axis.
    Runs eagerly: selecting from the state moves no data.
    """
    select = eval_params or (lambda s: s.params)
    fn = lambda s: (select(s), s.model_state)
    params, model_state = (jax.vmap(jax.vmap(fn)) if workers else jax.vmap(fn))(state)
    if workers and worker_eval == "mean":
        mean = lambda t: jax.tree.map(lambda a: jnp.mean(a, axis=1).astype(a.dtype), t)
        params, model_state = mean(params), mean(model_state)
    elif workers:
        flat = lambda t: jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), t)
        params, model_state = flat(params), flat(model_state)
    return params, model_state


def _mesh(devices: int, axis: str) -> jax.sharding.Mesh:
    """A 1-D mesh named ``axis`` over the first ``devices`` devices (Auto axis type)."""
    available = len(jax.devices())
    if not 1 <= devices <= available:
        raise ValueError(
            f"devices must be in [1, {available}] (the devices JAX sees), got {devices}."
        )
    return jax.make_mesh(
        (devices,),
        (axis,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:devices],
    )


def init_group_state(
    init_fn: Callable[[jax.Array], tuple[PyTree, PyTree]],
    make_tx: TxFactory,
    seeds: Sequence[int],
    hparams: Mapping[str, jax.Array],
    *,
    workers: int = 0,
    worker_axis: AxisName | None = None,
) -> TrainState:
    """The stacked step-0 state: run ``r`` initialises its model from ``key(seeds[r])``.

    ``init_fn`` is vmapped over the seeds (pass a jitted function and reuse it: one
    compile serves every group of a task); the optimizer states are built eagerly under
    ``vmap`` (cheap, and no compile per method). In worker mode every worker of a run
    starts from the run's one initialisation.
    """
    keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
    params, model_state = jax.vmap(lambda k: init_fn(jax.random.wrap_key_data(k)))(keys)

    def one(p, ms, key, hp):
        return init_train_state(p, ms, make_tx(hp, worker_axis), key)

    state = jax.vmap(one)(params, model_state, keys, dict(hparams))
    if workers:
        state = jax.tree.map(
            lambda a: jnp.broadcast_to(a[:, None], (a.shape[0], workers, *a.shape[1:])), state
        )
    return state


def train_group(
    *,
    loss_fn: LossFn,
    make_tx: TxFactory,
    init_fn: Callable[[jax.Array], tuple[PyTree, PyTree]],
    x: np.ndarray,
    y: np.ndarray,
    plan: BatchPlan,
    seeds: Sequence[int],
    hparams: Mapping[str, Sequence[float]] | None = None,
    steps: int,
    run_dir: str | os.PathLike | None,
    evaluate: StackedEvaluator | None = None,
    final_evaluate: StackedEvaluator | None = None,
    eval_params: Callable[[TrainState], PyTree] | None = None,
    worker_eval: str = "mean",
    evaluate_workers: StackedEvaluator | None = None,
    log_every: int = 25,
    eval_every: int = 0,
    checkpoint_every: int = 0,
    devices: int = 1,
    metrics: Sequence[MetricsWriter] | None = None,
    on_progress: Callable[[int], None] | None = None,
    grad_skip: Callable[[PyTree], jax.Array] | None = None,
) -> GroupResult:
    """Trains ``len(seeds)`` runs of one method as one program, resuming from ``run_dir``.

    Args:
      loss_fn: ``loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics))``.
      make_tx: ``make_tx(hparams, axis_name) -> transform``, called inside the trace with
        this run's ``hparams`` as traced scalars (so one compile serves every grid point).
      init_fn: ``init_fn(key) -> (params, model_state)``.
      x, y: the training arrays, put on the device once; the plan indexes into them.
      plan: the :class:`~experiments.train.plans.BatchPlan`. An adaptive plan (one with
        ``observe``, e.g. :class:`~experiments.train.plans.EpochBatchPlan`) is driven
        between chunks (see :mod:`experiments.train.plans`): chunks also stop where a run
        ends an epoch, finished runs are frozen, the optimizer receives ``batch_size``,
        and the group restarts rather than resumes (``checkpoint_every`` must be 0).
      seeds: one per run; seeds the model init and the step RNG, and the plan's order.
      hparams: ``{name: [value per run]}`` float hyperparameters (may be empty).
      steps: steps per run.
      run_dir: where checkpoints go (``run_dir/checkpoints``); None: no checkpoints.
      evaluate: ``evaluate(params[R], model_state[R]) -> {name: [R]}`` (jitted by the
        caller, so one compile serves every group of a task), run every ``eval_every``
        steps (0: only at the end) and at the end, on the evaluated weights.
      final_evaluate: the same, run only at the end (e.g. the whole training set).
      eval_params: the weights to evaluate as a function of ONE run's (one worker's)
        state, e.g. Lookahead's slow weights; default ``state.params``.
      worker_eval: in worker mode, ``"mean"`` evaluates the workers' mean params (and
        mean model state); ``"per_worker"`` evaluates every worker and averages the metrics.
      evaluate_workers: worker mode only: ``evaluate_workers(params [R, W, ...],
        model_state [R, W, ...]) -> {name: [R]}`` on every worker's own weights (e.g. their
        consensus distance), run with ``evaluate`` and merged into its results.
      log_every: steps per jitted chunk and per logged training-metric window.
      eval_every, checkpoint_every: multiples of ``log_every`` (0: only at the end).
      devices: 1, or data-parallel / worker-sharded over that many devices.
      metrics: one :class:`MetricsWriter` per run (tags identify the run), or None.
      on_progress: called with the number of steps just completed (per chunk). Every
        logged window also records ``train_time_s``: the seconds this call has spent in
        training chunks so far (compiles included; it restarts at 0 on a resume).
      grad_skip: ``grad_skip(opt_state) -> bool`` of one worker's (one run's) optimizer
        state: the update will ignore the gradient, so the step may skip the
        forward/backward pass (see the module docstring for when it really does).
        Logs ``train_grad_evals`` and ``train_grad_evals_run`` (per worker, mean per step
        over the window).

    Returns:
      A :class:`GroupResult`.
    """
    seeds = list(seeds)
    num_runs = len(seeds)
    if num_runs < 1:
        raise ValueError("seeds must name at least one run, got [].")
    hparams = {k: list(v) for k, v in (hparams or {}).items()}
    for name, values in hparams.items():
        if len(values) != num_runs:
            raise ValueError(
                f"hparams[{name!r}] has {len(values)} values for {num_runs} runs (seeds)."
            )
    for name, every in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if every % log_every:
            raise ValueError(f"{name} ({every}) must be a multiple of log_every ({log_every}).")
    if worker_eval not in ("mean", "per_worker"):
        raise ValueError(f"worker_eval must be 'mean' or 'per_worker', got {worker_eval!r}.")
    sampled = hasattr(plan, "active")
    adaptive = callable(getattr(plan, "observe", None))
    if adaptive and checkpoint_every:
        raise ValueError(
            "checkpoint_every must be 0 with an adaptive plan (its decisions depend on the "
            f"trained state and are not checkpointed), got {checkpoint_every}."
        )
    layout = _layout(loss_fn, make_tx, plan, devices, sampled, grad_skip, adaptive)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}
    state = layout.put_state(
        init_group_state(
            init_fn, make_tx, seeds, hp, workers=plan.workers, worker_axis=layout.worker_axis
        )
    )
    x_dev, y_dev = layout.put_data(np.asarray(x)), layout.put_data(np.asarray(y))
    hp_dev = layout.put_data(hp) if hp else {}
    workers = plan.workers

    def evaluate_all(state, evaluate, on_workers=None) -> dict[str, np.ndarray]:
        if evaluate is None:
            return {}
        params, model_state = group_eval_weights(state, eval_params, workers, worker_eval)
        out = evaluate(params, model_state)
        if workers and worker_eval == "per_worker":
            out = {k: v.reshape(num_runs, workers).mean(1) for k, v in out.items()}
        if workers and on_workers is not None:  # every worker's own weights, [R, W, ...]
            select = eval_params or (lambda s: s.params)
            own = jax.vmap(jax.vmap(lambda s: (select(s), s.model_state)))(state)
            out = {**out, **on_workers(*own)}
        return {k: np.asarray(v, np.float64) for k, v in jax.device_get(out).items()}

    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints")) if run_dir else None
    try:
        start = checkpointer.latest_step() if checkpointer and not adaptive else None
        if adaptive:
            plan.start(seeds)  # type: ignore[attr-defined]
        if start is not None:
            state = checkpointer.restore(like=state, step=start)  # type: ignore[union-attr]
        start = start or 0
        if metrics is not None:
            for writer in metrics:
                writer.truncate_after(start)
        train_time = 0.0
        t0 = time.perf_counter()
        step = start
        while step < steps:
            length = min(log_every, steps - step)
            if adaptive:
                # Chunks stay on the log_every grid (evaluation and checkpoint steps) and
                # also stop where a run ends an epoch, so the plan decides exactly there.
                length = min(log_every - step % log_every, steps - step)
                decision = plan.next_decision(step)  # type: ignore[attr-defined]
                if decision is not None and decision > step:
                    length = min(length, decision - step)
            # Fixed-length chunks: the padding repeats the last step, marked not live.
            window = [min(t, steps - 1) for t in range(step, step + log_every)]
            if adaptive:
                per_run = [plan.run_indices(r, window) for r in range(num_runs)]  # type: ignore[attr-defined]
            else:
                per_run = [plan.indices(seed, window) for seed in seeds]
            live = np.arange(log_every) < length
            chunk = {
                "idx": np.stack([p["idx"] for p in per_run], axis=1),
                "n_micro": np.stack([p["n_micro"] for p in per_run], axis=1),
                "active": (
                    np.stack([p["active"] for p in per_run], axis=1)
                    if sampled
                    else np.zeros((log_every, num_runs, 0), bool)
                ),
                "live": (
                    live[:, None] & np.stack([p["live"] for p in per_run], axis=1)
                    if adaptive
                    else live
                ),
            }
            chunk_dev = layout.put_plan(chunk)
            tick = time.perf_counter()
            state, chunk_metrics = layout.chunk(
                state,
                x_dev,
                y_dev,
                chunk_dev["idx"],
                chunk_dev["n_micro"],
                chunk_dev["active"],
                chunk_dev["live"],
                hp_dev,
            )
            host_metrics = jax.device_get(chunk_metrics)  # waits for the chunk
            train_time += time.perf_counter() - tick
            step += length
            if adaptive:
                plan.observe(step, state)  # type: ignore[attr-defined]
                if plan.finished(step) and step < steps:  # type: ignore[attr-defined]
                    length += steps - step  # every run is done: the rest would be skipped
                    step = steps
            if on_progress is not None:
                on_progress(length)
            is_eval = bool(eval_every) and step % eval_every == 0 and step != steps
            record_eval = evaluate_all(state, evaluate, evaluate_workers) if is_eval else {}
            if metrics is not None:
                wall = time.perf_counter() - t0
                ran = host_metrics.get("grad_evals_run")
                for r, writer in enumerate(metrics):
                    record: dict[str, Any] = {"step": step}
                    # Adaptive plans: only the steps this run trained (not its frozen
                    # ones). With grad_skip, the loss and metrics average over the steps
                    # that computed a gradient (a skipped step has none; a window of
                    # skipped steps only logs the counters).
                    rows = chunk["live"][:, r] if adaptive else slice(0, length)
                    weights = None if ran is None else ran[rows, r]
                    for key, values in host_metrics.items():
                        if not np.size(values[rows, r]):
                            continue
                        if key.startswith("grad_evals") or weights is None:
                            record[f"train_{key}"] = float(np.mean(values[rows, r]))
                        elif weights.sum() > 0:
                            value = np.average(values[rows, r], weights=weights)
                            record[f"train_{key}"] = float(value)
                    record["train_time_s"] = train_time
                    record.update({k: float(v[r]) for k, v in record_eval.items()})
                    record["wall_time_s"] = wall
                    writer.write(record)
            is_ckpt = step == steps or (checkpoint_every and step % checkpoint_every == 0)
            if checkpointer is not None and is_ckpt:
                checkpointer.save(step, state)
        if checkpointer is not None:
            checkpointer.wait()
        final = evaluate_all(state, evaluate, evaluate_workers)
        final.update(evaluate_all(state, final_evaluate))
        diverged = np.asarray(jax.device_get(state.first_nonfinite_step)).reshape(num_runs, -1)
        diverged_at = diverged.max(axis=1).astype(np.int64)  # workers agree (mean loss)
        if metrics is not None:
            for r, writer in enumerate(metrics):
                writer.write(
                    {"step": steps, "final": True, **{k: float(v[r]) for k, v in final.items()}}
                )
        return GroupResult(state, final, diverged_at, train_time, start)
    finally:
        if checkpointer is not None:
            checkpointer.close()

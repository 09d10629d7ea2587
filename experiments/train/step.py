"""The jitted train step: one function for any optax transform, one device or data parallel.

The step sees only pure functions: a ``loss_fn(params, model_state, batch, rng)`` and an
optax transform. Transforms that need more than the gradient (SAM's ``grad_fn``, a line
search's ``value_fn``) receive it as keyword extra args; plain transforms are wrapped with
``optax.with_extra_args_support`` and ignore them.

Data parallelism: the same step body runs under ``jax.shard_map`` over a ``"data"`` mesh
axis, with the state replicated (``P()``) and the batch split along its first dimension.
Gradients are made per-device with :func:`optlab.pvary` (the ``check_vma`` trap in
DESIGN.md) and averaged with ``pmean``, so the result equals the single-device step on the
whole batch up to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optlab.parallel import pmean, pvary

PyTree = Any
Batch = dict[str, jax.Array]
# loss_fn(params, model_state, batch, rng) -> (loss, (new_model_state, metrics))
LossFn = Callable[[PyTree, PyTree, Batch, jax.Array], tuple[jax.Array, tuple[PyTree, dict]]]

DATA_AXIS = "data"


class TrainState(NamedTuple):
    """Everything a run needs to continue exactly; checkpointed as one pytree.

    Attributes:
      step: number of completed steps (int32 scalar); also the data position.
      params: the model's trainable parameters.
      model_state: non-trainable model variables (e.g. BatchNorm statistics), ``{}`` if none.
      opt_state: the optax state.
      rng: the run's base PRNG key data (uint32[2]); step t uses ``fold_in(rng, t)``.
      first_nonfinite_step: the first step whose loss was NaN/inf, or -1. Tracked on device
        so that detecting divergence needs no host round trip inside the step.
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    rng: jax.Array
    first_nonfinite_step: jax.Array


def init_train_state(
    params: PyTree, model_state: PyTree, tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """The state at step 0. ``rng`` is a typed or raw PRNG key."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=optax.with_extra_args_support(tx).init(params),
        rng=jnp.asarray(rng, jnp.uint32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def make_step_fn(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The un-jitted step body ``(state, batch) -> (state, metrics)``.

    With ``axis_name`` set it must run inside ``shard_map`` or a named ``vmap`` over that
    axis: gradients, the loss, metrics and model state are averaged over workers. The
    optimizer gets ``grad_fn(params) -> grads`` (averaged the same way, evaluated on the same
    batch and rng; its model-state update, e.g. BatchNorm statistics from the second forward
    pass, is discarded), ``value_fn(params) -> loss``, ``value=loss`` and ``grad=grads`` as
    extra args.
    """
    tx = optax.with_extra_args_support(tx)

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

        def loss_and_grad(params):
            (loss, (model_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                pvary(params, axis_name), state.model_state, batch, rng
            )
            return pmean((loss, model_state, metrics, grads), axis_name)

        loss, model_state, metrics, grads = loss_and_grad(state.params)

        def grad_fn(params):
            return loss_and_grad(params)[3]

        def value_fn(params):
            return loss_and_grad(params)[0]

        updates, opt_state = tx.update(
            grads,
            state.opt_state,
            state.params,
            grad_fn=grad_fn,
            value_fn=value_fn,
            value=loss,
            grad=grads,
        )
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss)
        first_bad = jnp.where(
            (state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step
        )
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            rng=state.rng,
            first_nonfinite_step=first_bad,
        )
        return new_state, {"loss": loss, **metrics}

    return step_fn


def make_mesh(num_devices: int) -> jax.sharding.Mesh:
    """A 1-D ``"data"`` mesh over the first ``num_devices`` devices (Auto axis type)."""
    available = len(jax.devices())
    if not 1 <= num_devices <= available:
        raise ValueError(
            f"devices must be in [1, {available}] (the devices JAX sees), got {num_devices}. "
            "On CPU, set jax.config.update('jax_num_cpu_devices', N) before the first JAX op."
        )
    return jax.make_mesh(
        (num_devices,),
        (DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:num_devices],
    )


class CompiledStep(NamedTuple):
    """A jitted step plus the functions that place its inputs on the right devices."""

    step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    put_state: Callable[[TrainState], TrainState]
    put_batch: Callable[[dict[str, np.ndarray]], Batch]
    mesh: jax.sharding.Mesh | None


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    num_devices: int = 1,
    donate: bool = True,
) -> CompiledStep:
    """Builds the jitted train step on one device or data parallel over ``num_devices``.

    Args:
      loss_fn: ``loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics))``,
        the mean loss over the (per-device) batch.
      tx: any optax transform, including ``GradientTransformationExtraArgs`` that need
        ``grad_fn`` / ``value_fn``.
      num_devices: 1 runs under plain ``jit``; N > 1 shards the batch over N devices with
        ``jax.shard_map`` and keeps the state replicated. The batch size must divide by N.
        With several processes (after ``jax.distributed.initialize()``) N must be the
        global device count; every process passes the same global batch and state, and
        each contributes its own devices' shards.
      donate: donate the input state's buffers (the state is updated in place).

    Returns:
      A :class:`CompiledStep`; call ``step(put_state(state), put_batch(batch))``.
      ``put_state`` always copies, so donating the state never deletes the caller's arrays.
    """
    donate_argnums = (0,) if donate else ()
    if jax.process_count() > 1 and num_devices != jax.device_count():
        raise ValueError(
            f"devices must equal the global device count ({jax.device_count()}) when running "
            f"on {jax.process_count()} processes, got {num_devices}."
        )
    if num_devices == 1:
        device = jax.devices()[0]
        return CompiledStep(
            step=jax.jit(make_step_fn(loss_fn, tx), donate_argnums=donate_argnums),
            # A copy: the step donates its state, which must not delete the caller's arrays.
            put_state=lambda s: jax.device_put(s, device, may_alias=False),
            put_batch=lambda b: jax.device_put(b, device),
            mesh=None,
        )
    mesh = make_mesh(num_devices)
    body = make_step_fn(loss_fn, tx, axis_name=DATA_AXIS)
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P(DATA_AXIS))

    def put_batch(batch: dict[str, np.ndarray]) -> Batch:
        size = len(next(iter(batch.values())))
        if size % num_devices:
            raise ValueError(
                f"batch_size must be divisible by devices={num_devices} for data parallelism, "
                f"got a batch of {size}."
            )
        return _put_global(batch, split)

    return CompiledStep(
        step=jax.jit(sharded, donate_argnums=donate_argnums),
        # Copy first: resharding to a replicated layout reuses the caller's buffer as the
        # first shard even with may_alias=False (jax 0.10.2), and the step donates it.
        put_state=lambda s: _put_global(jax.tree.map(jnp.copy, s), replicated),
        put_batch=put_batch,
        mesh=mesh,
    )


def _put_global(tree: Any, sharding: NamedSharding) -> Any:
    """Places host values (identical on every process) as global arrays with ``sharding``.

    One process: ``device_put``. Several: each process fills its own devices' shards from
    its copy of the full value (``make_array_from_callback``).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)

"""Average-direction SAM: the mean gradient over random perturbations of the parameters.

Zhu et al. show that decentralized SGD implicitly minimises an *average-direction* SAM
loss, the loss averaged over perturbations spread like the workers' deviations from their
mean (instead of SAM's worst case). As a standalone optimizer that is the gradient of a
Gaussian-smoothed loss, estimated with ``num_samples`` perturbations per step. Built on
:mod:`optlab.perturbation`.

Reference:
  T. Zhu, F. He, K. Chen, M. Song, D. Tao. *Decentralized SGD and Average-direction SAM
  are Asymptotically Equivalent.* ICML 2023. arXiv:2306.02913.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optlab.parallel import pmean
from optlab.perturbation import (
    gaussian_like,
    grad_at_point,
    mean_over,
    raw_key,
    refuse_inside_multi_steps,
    translate,
)
from optlab.validation import check_float_in_range, check_int_in_range

__all__ = ["AverageDirectionSAMState", "average_direction_sam"]

PyTree = Any


class AverageDirectionSAMState(NamedTuple):
    """State of :func:`average_direction_sam`.

    Attributes:
      count: number of ``update`` calls so far (int32); step ``t`` draws its perturbations
        from ``fold_in(key, t)``, so a restored state continues the same noise stream.
      key: the base PRNG key as raw key data (uint32[2]; checkpoints as a plain array), a
        fresh array (never the caller's key buffer).
      base_state: the base optimizer's state.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    key: jax.Array
    base_state: optax.OptState


def average_direction_sam(
    base: optax.GradientTransformation,
    sigma: float | jax.Array | optax.Schedule,
    num_samples: int = 1,
    *,
    seed: int | jax.Array = 0,
    axis_name: str | None = None,
    vectorize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Average-direction SAM: ``base`` fed the mean gradient at Gaussian-perturbed params.

    .. math::

      \epsilon_j \sim \mathcal N(0, \sigma^2 I)\ \text{i.i.d.},\qquad
      h = \frac1n \sum_{j=1}^{n} \nabla L_B(x + \epsilon_j),\qquad
      \text{updates} = \mathrm{base}(h)

    ``sigma`` is the per-coordinate standard deviation (in D-SGD it plays the role of the
    consensus distance, which shrinks with the learning rate: a schedule fits). The incoming
    ``grads`` are not used; ``grad_fn(params) -> grads`` (same batch, no model-state update)
    is called ``num_samples`` times per update. With ``sigma = 0`` it is the base optimizer
    fed ``grad_fn(params)``.

    **Memory.** ``vectorize=False`` (default) loops over the samples with ``lax.fori_loop``:
    one perturbed copy of the params and one running sum, at ``num_samples`` sequential
    gradient costs. ``vectorize=True`` ``vmap``s the samples: ``num_samples`` copies of the
    params *and of every activation* at once, faster on an accelerator with memory to spare.

    **Randomness.** Step ``t`` uses ``fold_in(key, t)`` (then ``fold_in`` of the worker
    index under ``axis_name`` and of the sample index), so trajectories are reproducible and
    resume exactly from a checkpoint.

    **Data parallel** (``axis_name``): every worker draws its own perturbations, evaluates
    them on its local batch with its local ``grad_fn`` and only the final mean gradient is
    ``pmean``-ed (``num_samples`` x workers perturbations in all).

    **Gradient accumulation.** ``optax.MultiSteps(average_direction_sam(...), k)`` is refused
    with a ``ValueError`` when traced: MultiSteps forwards the ``grad_fn`` of the last
    micro-batch only, and this transform does not use the accumulated gradient at all, so
    k - 1 micro-batches would be dropped. Either call ``update`` once per accumulated batch
    with a whole-batch ``grad_fn`` (:func:`optlab.perturbation.microbatched_grad_fn`), or put
    MultiSteps inside, ``average_direction_sam(optax.MultiSteps(base, k), sigma, n)``: each
    micro-batch then gets its own ``n`` perturbations (drawn from its micro-step count) and
    MultiSteps averages the k estimates, ``n·k`` perturbations per optimizer step. In that
    form a ``sigma`` schedule counts micro-steps.

    Args:
      base: the optimizer fed the averaged gradient (plain or extra-args).
      sigma: perturbation standard deviation >= 0; float, traced scalar or schedule.
      num_samples: perturbations per step, an int >= 1 (with ``optax.inject_hyperparams``
        list it in ``static_args``).
      seed: an int seed or a PRNG key, typed (``jax.random.key``) or raw
        (``jax.random.PRNGKey``, ``uint32[2]``); the same key in either form gives the same
        perturbations.
      axis_name: worker axis for per-worker perturbations and the final ``pmean``.
      vectorize: ``vmap`` over the samples instead of a sequential loop.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`AverageDirectionSAMState`.

    Example::

      >>> import jax, jax.numpy as jnp, optax, optlab
      >>> loss = lambda w: jnp.sum(jnp.cos(w))
      >>> tx = optlab.average_direction_sam(optax.sgd(0.1), sigma=0.1, num_samples=4)
      >>> w = jnp.ones(3)
      >>> state = tx.init(w)
      >>> updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
      >>> bool(jnp.allclose(updates, -0.1 * jax.grad(loss)(w), atol=0.02))  # near SGD's step
      True

    Reference:
      Zhu et al., *Decentralized SGD and Average-direction SAM are Asymptotically
      Equivalent*, ICML 2023, arXiv:2306.02913.
    """
    check_float_in_range("sigma", sigma, low=0.0)
    num_samples = check_int_in_range("num_samples", num_samples, min_value=1)
    raw_key(seed)  # validated at construction; a traced seed (inject_hyperparams) passes
    base = optax.with_extra_args_support(base)

    def init_fn(params: PyTree) -> AverageDirectionSAMState:
        return AverageDirectionSAMState(
            count=jnp.zeros((), jnp.int32),
            key=jnp.array(raw_key(seed), copy=True),
            base_state=base.init(params),
        )

    def update_fn(
        updates: PyTree,
        state: AverageDirectionSAMState,
        params: PyTree | None = None,
        *,
        grad_fn: Callable[[PyTree], PyTree] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, AverageDirectionSAMState]:
        if params is None:
            raise ValueError("average_direction_sam needs params: call update(g, state, params).")
        if grad_fn is None:
            raise ValueError("average_direction_sam needs the extra argument grad_fn.")
        refuse_inside_multi_steps(
            "optlab.average_direction_sam",
            "; or put MultiSteps inside, average_direction_sam(optax.MultiSteps(base, k), "
            "sigma), to perturb every micro-batch and average the estimates",
        )
        sigma_t = sigma(state.count) if callable(sigma) else sigma
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
        if axis_name is not None:
            step_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))

        def one_sample(j: jax.Array) -> PyTree:
            noise = gaussian_like(jax.random.fold_in(step_key, j), params)
            point_map = lambda p, _: translate(p, noise, sigma_t)
            return grad_at_point(grad_fn, params, updates, point_map)

        mean_grads = pmean(mean_over(num_samples, one_sample, vectorize=vectorize), axis_name)
        new_updates, base_state = base.update(
            mean_grads, state.base_state, params, grad_fn=grad_fn, **extra_args
        )
        return new_updates, AverageDirectionSAMState(
            count=optax.safe_increment(state.count), key=state.key, base_state=base_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

"""Shared fixtures for the gradient-at-a-transformed-point tests (SAM, ASAM, average-direction
SAM, extrapolation): a tiny MLP regression problem, a flat float64 view for reference loops
written from the equations, a jitted driver for ``update(grads, state, params, grad_fn=...)``
and an Orbax round trip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import optlab
from experiments.train.checkpoint import Checkpointer

PyTree = Any
NUM_EXAMPLES = 16


@contextlib.contextmanager
def enable_x64() -> Iterator[None]:
    """float64 inside the block (the ``x64`` fixture as a context manager)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def mlp_params(dtype=jnp.float32, seed: int = 0) -> dict[str, jax.Array]:
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "w1": (0.8 * jax.random.normal(k[0], (3, 4))).astype(dtype),
        "b1": (0.1 * jax.random.normal(k[1], (4,))).astype(dtype),
        "w2": (0.8 * jax.random.normal(k[2], (4, 2))).astype(dtype),
        "b2": jnp.zeros((2,), dtype),
    }


def mlp_data(steps: int, seed: int = 1, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """``steps`` batches of ``NUM_EXAMPLES`` examples: x (steps, 16, 3), y (steps, 16, 2)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, NUM_EXAMPLES, 3))
    y = np.tanh(x @ rng.normal(size=(3, 2))) + 0.1 * rng.normal(size=(steps, NUM_EXAMPLES, 2))
    return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def mlp_loss(params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


mlp_grad = jax.grad(mlp_loss)


def flat(tree: PyTree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)


_FLAT_GRADS: dict[Any, Callable[..., jax.Array]] = {}


def flat_grad_fn(params: PyTree) -> Callable[[np.ndarray, jax.Array, jax.Array], np.ndarray]:
    """``(flat_w, x, y) -> flat gradient`` in float64 (call inside ``enable_x64``).

    One jitted function per params structure, shared by all tests.
    """
    assert jax.config.jax_enable_x64, "call flat_grad_fn inside enable_x64()"
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    unravel = ravel_pytree(params)[1]
    key = (jax.tree.structure(params), tuple(p.shape for p in jax.tree.leaves(params)))
    if key not in _FLAT_GRADS:
        _FLAT_GRADS[key] = jax.jit(lambda w, x, y: ravel_pytree(mlp_grad(unravel(w), x, y))[0])
    grad = _FLAT_GRADS[key]
    return lambda w, x, y: np.asarray(grad(jnp.asarray(w), x, y), np.float64)


def reference_heavy_ball(params: PyTree, xs, ys, lr: float, momentum: float) -> np.ndarray:
    """Plain momentum SGD (``optax.sgd(lr, momentum)``) as a float64 loop; the flat result.

    Call inside ``enable_x64``.
    """
    grad = flat_grad_fn(params)
    w, m = flat(params), 0.0
    for t in range(len(xs)):
        m = momentum * m + grad(w, xs[t], ys[t])
        w = w - lr * m
    return w


def unflatten_like(params: PyTree, vector: np.ndarray) -> PyTree:
    return ravel_pytree(params)[1](jnp.asarray(vector))


def make_step(tx: optax.GradientTransformation, *, with_grad_fn: bool = True, donate: bool = False):
    """A jitted ``(params, state, x, y) -> (params, state)`` passing ``grad_fn`` on the batch.

    ``donate=True`` donates both params and state (``donate_argnums=(0, 1)``).
    """

    def step(params, state, x, y):
        grads = mlp_grad(params, x, y)
        extra = {"grad_fn": lambda p: mlp_grad(p, x, y)} if with_grad_fn else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def run(tx, params, xs, ys, *, state=None, start: int = 0, with_grad_fn: bool = True):
    """Runs steps ``start..len(xs)-1``; returns ``(params, state, [params after each step])``."""
    step = make_step(tx, with_grad_fn=with_grad_fn)
    state = tx.init(params) if state is None else state
    path = []
    for t in range(start, len(xs)):
        params, state = step(params, state, xs[t], ys[t])
        path.append(params)
    return params, state, path


def assert_trees_close(a: PyTree, b: PyTree, *, rtol: float = 1e-6, atol: float = 0.0) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(
            np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol
        ),
        a,
        b,
    )


def assert_trees_equal(a: PyTree, b: PyTree) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def orbax_round_trip(directory, params: PyTree, state: PyTree, tx) -> tuple[PyTree, PyTree]:
    """Saves ``(params, state)`` and restores it against an abstract target from ``tx.init``."""
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, (params, state))
        ckpt.wait()
        like = jax.eval_shape(lambda: (params, tx.init(params)))
        return ckpt.restore(like=like, step=1)


def trace_counter(fn: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    """``jax.jit(fn)`` plus a list whose length is the number of times ``fn`` was traced."""
    traces: list[int] = []

    def counted(*args):
        traces.append(1)
        return fn(*args)

    return jax.jit(counted), traces


# ----------------------------------------------------------------------------------------
# Contract checks shared by the modules (DESIGN.md section 6).


def check_no_retrace(tx, steps: int = 3) -> None:
    """The jitted step is traced once over ``steps`` updates (no recompilation)."""
    params = mlp_params()
    xs, ys = mlp_data(steps)
    step, traces = trace_counter(make_step(tx))
    state = tx.init(params)
    for t in range(steps):
        params, state = step(params, state, xs[t], ys[t])
    assert len(traces) == 1


def check_dtype_is_kept(tx, dtype, steps: int = 3) -> PyTree:
    """Params (and float state leaves) keep ``dtype`` and stay finite; returns the state."""
    params = mlp_params(dtype)
    xs, ys = mlp_data(steps, dtype=dtype)
    step = make_step(tx)
    state = tx.init(params)
    for t in range(steps):
        params, state = step(params, state, xs[t], ys[t])
        assert all(p.dtype == dtype for p in jax.tree.leaves(params))
        assert all(np.isfinite(np.asarray(p, np.float32)).all() for p in jax.tree.leaves(params))
    return state


def check_orbax_resume(tx, directory, steps: int = 6, split: int = 3):
    """Save after ``split`` steps, restore abstractly, resume: bitwise the uninterrupted run.

    Returns the restored state for further checks.
    """
    params = mlp_params()
    xs, ys = mlp_data(steps)
    full, _, _ = run(tx, params, xs, ys)
    half_params, half_state, _ = run(tx, params, xs[:split], ys[:split])
    restored_params, restored_state = orbax_round_trip(directory, half_params, half_state, tx)
    assert type(restored_state) is type(half_state)
    assert_trees_equal(restored_state, half_state)
    resumed, _, _ = run(tx, restored_params, xs, ys, state=restored_state, start=split)
    assert_trees_equal(resumed, full)
    return restored_state


def check_nnx_optimizer(tx, steps: int = 3, *, with_grad_fn: bool = True) -> PyTree:
    """``flax.nnx.Optimizer`` (grad_fn passed as an update kwarg) follows the functional run.

    Returns the optimizer's state.
    """
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 4, rngs=rngs)
            self.out = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    xs, ys = mlp_data(steps)

    def loss(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    model = Model(nnx.Rngs(0))
    graphdef = nnx.graphdef(model)
    params = jax.tree.map(jnp.copy, nnx.as_pure(nnx.state(model, nnx.Param)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def grad_fn_at(x, y):
        return jax.grad(lambda p: loss(nnx.merge(graphdef, p), x, y))

    @nnx.jit
    def step(model, optimizer, x, y):
        grads = nnx.grad(loss)(model, x, y)
        extra = {"grad_fn": grad_fn_at(x, y)} if with_grad_fn else {}
        optimizer.update(model, grads, **extra)

    for t in range(steps):
        step(model, optimizer, xs[t], ys[t])

    @jax.jit
    def functional_step(params, state, x, y):
        grad_fn = grad_fn_at(x, y)
        extra = {"grad_fn": grad_fn} if with_grad_fn else {}
        updates, state = tx.update(grad_fn(params), state, params, **extra)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for t in range(steps):
        params, state = functional_step(params, state, xs[t], ys[t])
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    assert_trees_close(got, params, rtol=1e-5, atol=1e-7)
    return nnx.as_pure(optimizer.opt_state)


def check_donating_step(tx, steps: int = 3, *, with_grad_fn: bool = True) -> PyTree:
    """A jitted step donating both params and state, from ``tx.init(params)`` on the very
    params it donates, runs (no state leaf is a params buffer or another state leaf's
    buffer: XLA refuses to donate one buffer twice) and follows the non-donating run.
    Returns the final state."""
    xs, ys = mlp_data(steps)
    expected, _, _ = run(tx, mlp_params(), xs, ys, with_grad_fn=with_grad_fn)
    params = mlp_params()
    state = tx.init(params)
    buffers = [
        leaf.unsafe_buffer_pointer()
        for leaf in jax.tree.leaves((params, state))
        if isinstance(leaf, jax.Array) and not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    ]
    assert len(set(buffers)) == len(buffers), "a state leaf aliases params or another leaf"
    step = make_step(tx, with_grad_fn=with_grad_fn, donate=True)
    for t in range(steps):
        params, state = step(params, state, xs[t], ys[t])
    assert_trees_close(params, expected, rtol=1e-6, atol=1e-7)
    return state


def worker_step(tx: optax.GradientTransformation, *, with_grad_fn: bool = True) -> Callable:
    """One data-parallel step per worker on the MLP loss: the worker's *local* gradient and
    ``grad_fn`` (axis ``"data"``, not averaged), for use under ``shard_map`` or named ``vmap``."""
    local = optlab.data_parallel_value_and_grad(mlp_loss, "data", average=False)

    def step(params, state, x, y):
        def grad_fn(p):
            return local(p, x, y)[1]

        extra = {"grad_fn": grad_fn} if with_grad_fn else {}
        updates, state = tx.update(grad_fn(params), state, params, **extra)
        return optax.apply_updates(params, updates), state

    return step

"""Control flow shared by the worker-axis transforms (private)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["run_if"]


def run_if(pred: jax.Array, fn: Callable[[Any], Any], operands: Any) -> Any:
    """``fn(operands)`` if ``pred`` else ``operands``, paying for ``fn`` only when it runs.

    A ``lax.cond`` whose taken branch is a while loop that runs ``fn`` once. Unbatched
    (``shard_map``, one run), the conditional alone skips ``fn``. Under ``vmap`` with a
    per-member predicate (every worker and run holds its own step count, as in a
    vectorized simulation), ``lax.cond`` turns into a select that evaluates both
    branches; the inner loop's predicate is then batched too and the loop runs while
    *any* member needs ``fn``, so steps on which no member does skip it. ``fn`` must
    return the structure and types of ``operands``.

    Example (a batched predicate: ``fn`` runs for the members that ask for it):
      >>> import jax, jax.numpy as jnp
      >>> from optlab._control import run_if
      >>> double = jax.vmap(lambda p, x: run_if(p, lambda v: 2.0 * v, x))
      >>> double(jnp.array([True, False]), jnp.array([1.0, 1.0]))
      Array([2., 1.], dtype=float32)
      >>> double(jnp.array([False, False]), jnp.array([1.0, 1.0]))  # fn does not run
      Array([1., 1.], dtype=float32)
    """

    def once(operands):
        def body(carry):
            pending, operands = carry
            return jnp.zeros_like(pending), fn(operands)

        return jax.lax.while_loop(lambda carry: carry[0], body, (pred, operands))[1]

    return jax.lax.cond(pred, once, lambda operands: operands, operands)

"""Lookahead and Multilayer Lookahead (1, 2, 3 levels) against optax.lookahead, all on plain SGD.

Every entry has the same inner optimizer (``optax.sgd`` at the baselines' learning rate) and
the same levels, ``k = 5`` and ``alpha = 0.5`` at each. The optax counterpart of L levels is
``optax.lookahead`` nested L times (level l syncs every ``K_l = 5**l`` fast steps), which
follows the same trajectory as ``optlab.multilayer_lookahead`` (tested in
``tests/test_bench.py``); its params are ``optax.LookaheadParams`` nested L times, built by the
entry's ``make_params`` from the model's tree, so it is measured in the update benchmark only.

Byte models (float32 bytes per parameter, each array read or written once per update, as in
``baselines.py``), averaged over one top-level cycle of ``K_L`` steps. A step "of depth d"
is one after which the levels 1..d sync (``d = 0``: an ordinary step); with ``k = 5`` a
fraction ``5**-d - 5**-(d+1)`` of steps has depth exactly ``d`` (``5**-L`` for ``d = L``).

- ``optlab.lookahead`` / ``optlab.multilayer_lookahead`` (slow weights ``phi_1..phi_L`` in
  the state, one params-sized copy per level: state 4 B/param per level). Depth 0: reads
  ``g``, writes ``u = -lr g``: 8 B. Depth d: reads ``g, x, phi_1..phi_d``, writes
  ``phi_1..phi_d`` (the synced value, which also resets the lower levels) and
  ``u = phi_d' - x``: ``4 (2d + 3)`` B. Averages: 1 level 10.4, 2 levels 10.72, 3 levels
  10.784 B/param.
- ``optax.lookahead`` nested L times (slow weights in the params: the params tree holds
  ``2**L`` copies, optimizer state 0 B/param). Every update emits one update tree per copy
  (``2**L`` writes) from ``g``: ``4 (2**L + 1)`` B at depth 0. A depth-d step also reads the
  copies the synced levels interpolate: the fast pair ``x, phi_1`` at level 1 (8 B) and,
  at level l >= 2, level l's slow tree, ``2**(l-1)`` copies. Averages: 1 level 13.6,
  2 levels 21.92, 3 levels 38.048 B/param. (optax computes the sync blend on every step,
  reading every copy; that extra traffic shows up as a lower fraction of bandwidth.)

``optax.sgd + idle lookahead state x3`` is SGD whose state carries three untouched
params-sized copies (the 3-level state): 8 B/param like SGD. Its ratio to SGD is the floor of
the 3-level entry, the per-buffer cost of passing that state through a jitted, donated call.

The implementations' own traffic is larger. optlab, on the step after a depth-d sync (the
first of the new cycles), re-anchors levels 1..d to the params (a read of ``x`` and d
writes), and XLA:CPU computes the jump ``phi_d' - x`` in a second pass over ``phi_d'`` and
``x``; its ordinary steps touch no slow weights (two-way ``lax.cond`` per level, with the
donated state passed through in place).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import optlab
from experiments.bench.baselines import LEARNING_RATE
from experiments.bench.registry import SGD_NAME, BenchEntry, BenchGoal, register, register_goal

__all__ = [
    "ALPHA",
    "GOALS",
    "IDLE_STATE",
    "LEVELS",
    "SYNC_PERIOD",
    "nested_lookahead_params",
    "nested_optax_lookahead",
]

SYNC_PERIOD = 5
ALPHA = 0.5
LEVELS = (1, 2, 3)


def _depth_fractions(num_levels: int, k: int = SYNC_PERIOD) -> list[float]:
    """Fraction of steps after which exactly levels 1..d sync, for d = 0..L."""
    at_least = [k**-d for d in range(num_levels + 1)]
    return [
        at_least[d] - (at_least[d + 1] if d < num_levels else 0.0) for d in range(num_levels + 1)
    ]


def optlab_bytes_per_param(num_levels: int) -> float:
    """The optlab byte model (module docstring), averaged over a top-level cycle."""
    cost = [8.0] + [4.0 * (2 * d + 3) for d in range(1, num_levels + 1)]
    return sum(f * c for f, c in zip(_depth_fractions(num_levels), cost, strict=True))


def optax_bytes_per_param(num_levels: int) -> float:
    """The nested ``optax.lookahead`` byte model (module docstring), averaged likewise."""
    base = 4.0 * (2**num_levels + 1)
    extra = [0.0]
    for d in range(1, num_levels + 1):
        extra.append(extra[-1] + (8.0 if d == 1 else 4.0 * 2 ** (d - 1)))
    return sum(f * (base + e) for f, e in zip(_depth_fractions(num_levels), extra, strict=True))


def nested_optax_lookahead(num_levels: int) -> optax.GradientTransformation:
    """``optax.lookahead`` around SGD, nested: level l syncs every ``SYNC_PERIOD**l`` steps."""
    tx = optax.sgd(LEARNING_RATE)
    for level in range(1, num_levels + 1):
        tx = optax.lookahead(tx, sync_period=SYNC_PERIOD**level, slow_step_size=ALPHA)
    return tx


def nested_lookahead_params(num_levels: int, params: Any) -> Any:
    """The params of :func:`nested_optax_lookahead`: ``LookaheadParams`` nested, all synced."""
    for _ in range(num_levels):
        params = optax.LookaheadParams.init_synced(params)
    return params


def _optlab(num_levels: int) -> optax.GradientTransformation:
    inner = optax.sgd(LEARNING_RATE)
    if num_levels == 1:
        return optlab.lookahead(inner, sync_period=SYNC_PERIOD, alpha=ALPHA)
    return optlab.multilayer_lookahead(inner, levels=((SYNC_PERIOD, ALPHA),) * num_levels)


def _names(num_levels: int) -> tuple[str, str]:
    if num_levels == 1:
        return "optax.lookahead(k=5,a=.5)", "optlab.lookahead(k=5,a=.5)"
    return (
        f"optax.lookahead nested x{num_levels}",
        f"optlab.multilayer_lookahead x{num_levels}",
    )


OPTAX_ENTRIES: dict[int, BenchEntry] = {}
OPTLAB_ENTRIES: dict[int, BenchEntry] = {}
for _levels in LEVELS:
    _optax_name, _optlab_name = _names(_levels)
    OPTAX_ENTRIES[_levels] = register(
        BenchEntry(
            name=_optax_name,
            make=functools.partial(nested_optax_lookahead, _levels),
            bytes_per_param=optax_bytes_per_param(_levels),
            make_params=functools.partial(nested_lookahead_params, _levels),
        )
    )
    OPTLAB_ENTRIES[_levels] = register(
        BenchEntry(
            name=_optlab_name,
            make=functools.partial(_optlab, _levels),
            bytes_per_param=optlab_bytes_per_param(_levels),
            counterpart=_optax_name,
        )
    )


class IdleState(NamedTuple):
    """State of :func:`sgd_with_idle_copies`: SGD's state and copies of the params."""

    inner_state: optax.OptState
    copies: tuple[Any, ...]


def sgd_with_idle_copies(num_copies: int) -> optax.GradientTransformation:
    """``optax.sgd`` whose state also carries ``num_copies`` params-shaped trees, untouched.

    The floor of any transform with that much state: its update is SGD's, so what it costs
    over SGD is the per-buffer cost of passing the copies through a jitted, donated call
    (dispatch and donation bookkeeping), not arithmetic or memory traffic. With
    ``num_copies = 3`` it is the floor of the 3-level Multilayer Lookahead.
    """
    inner = optax.sgd(LEARNING_RATE)

    def init_fn(params: Any) -> IdleState:
        copies = tuple(jax.tree.map(jnp.copy, params) for _ in range(num_copies))
        return IdleState(inner.init(params), copies)

    def update_fn(updates: Any, state: IdleState, params: Any = None) -> tuple[Any, IdleState]:
        updates, inner_state = inner.update(updates, state.inner_state, params)
        return updates, IdleState(inner_state, state.copies)

    return optax.GradientTransformation(init_fn, update_fn)


IDLE_STATE = register(
    BenchEntry(
        name="optax.sgd + idle lookahead state x3",
        make=functools.partial(sgd_with_idle_copies, 3),
        bytes_per_param=8.0,  # read g, write u; the copies are passed through
        counterpart=SGD_NAME,
    )
)

_SOURCE = "issue #9 item 7"
GOALS: list[BenchGoal] = []
for _levels in (2, 3):
    GOALS.append(
        register_goal(
            BenchGoal(
                name=f"multilayer x{_levels} / optax nested x{_levels}",
                numerator=OPTLAB_ENTRIES[_levels].name,
                denominator=OPTAX_ENTRIES[_levels].name,
                max_ratio=1.0,
                source=_SOURCE,
            )
        )
    )
    GOALS.append(
        register_goal(
            BenchGoal(
                name=f"multilayer x{_levels} / optlab.lookahead",
                numerator=OPTLAB_ENTRIES[_levels].name,
                denominator=OPTLAB_ENTRIES[1].name,
                max_ratio=1.2,
                source=_SOURCE,
            )
        )
    )
GOALS.append(
    register_goal(
        BenchGoal(
            name="multilayer x3 / sgd",
            numerator=OPTLAB_ENTRIES[3].name,
            denominator=SGD_NAME,
            max_ratio=1.1,
            part="train_steps",
            models=("mlp",),
            source=_SOURCE,
        )
    )
)

"""The benchmark registry: which optimizer transforms ``python -m experiments bench`` measures.

A later issue adds its transform with one call, in its own ``experiments/bench/entries_*.py``
module imported by ``experiments/bench/__init__.py``::

    register(BenchEntry(
        name="optlab.lookahead(k=5)",
        make=lambda: optlab.lookahead(optax.sgd(0.1), sync_period=5),
        bytes_per_param=...,           # documented byte model, see baselines.py
        counterpart="optax.lookahead(k=5)",  # registered before this entry
    ))

The byte model is the *compulsory* float32 traffic of one update: every array the update's
arithmetic must read or write, counted once. It is a lower bound on memory traffic, so the
benchmark's "achieved GB/s" (model bytes / time) against the machine's copy bandwidth says how
close the implementation gets to the physical limit; a non-fused implementation that reads an
array twice shows up as a lower fraction, not as a larger byte count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import optax

__all__ = [
    "GOAL_PARTS",
    "SGD_NAME",
    "BenchEntry",
    "BenchGoal",
    "Registry",
    "entries",
    "get_entry",
    "goals",
    "register",
    "register_goal",
]

SGD_NAME = "optax.sgd"
"""The baseline every update time and train-step time is divided by."""


@dataclasses.dataclass(frozen=True)
class BenchEntry:
    """One optimizer transform to benchmark.

    Attributes:
      name: unique display name, e.g. ``"optax.sgd"`` or ``"optlab.lookahead(k=5)"``.
      make: builds a fresh transform (called once per measured setting).
      bytes_per_param: float32 bytes read plus written per parameter by one update, counting
        each array once (e.g. sgd: grads in + updates out = 8). Averaged over steps for
        transforms that do extra work only every k steps. Entries with ``needs_grad_fn``
        include the bench's ``grad_fn`` traffic (see :func:`experiments.bench.updates.
        quadratic_grad_fn`: 12 B per stand-alone call, but XLA fuses it into the update, so
        count only what the fused loop adds, e.g. the target read: see entries_sam.py).
      counterpart: name of another registered entry to report a time ratio against (e.g. the
        optax implementation of the same method); it must be registered first.
      needs_grad_fn: ``update`` receives ``grad_fn=...``: a cheap quadratic-loss closure over
        a fixed target in the update benchmark, the real loss in the train-step benchmark.
      params_in_update: ``update`` receives ``params`` (otherwise ``None``).
      make_params: builds the params ``init`` and ``update`` expect from the model's params
        tree, for transforms whose params are not that tree (e.g.
        ``optax.LookaheadParams.init_synced`` for ``optax.lookahead``); gradients stay
        model-shaped. Such entries are measured in the update benchmark only: the train step
        differentiates the loss with respect to a plain params tree.
    """

    name: str
    make: Callable[[], optax.GradientTransformation]
    bytes_per_param: float
    counterpart: str | None = None
    needs_grad_fn: bool = False
    params_in_update: bool = True
    make_params: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"BenchEntry.name must be a non-empty string, got {self.name!r}")
        if not callable(self.make):
            raise ValueError(f"BenchEntry.make must be callable, got {self.make!r}")
        bpp = self.bytes_per_param
        if (
            isinstance(bpp, bool)
            or not isinstance(bpp, int | float)
            or not (math.isfinite(bpp) and bpp > 0)
        ):
            raise ValueError(
                f"BenchEntry.bytes_per_param must be a finite number > 0, got {bpp!r} "
                f"(entry {self.name!r})"
            )
        if self.counterpart == self.name:
            raise ValueError(f"BenchEntry {self.name!r} names itself as its counterpart")
        if self.make_params is not None and not callable(self.make_params):
            raise ValueError(f"BenchEntry.make_params must be callable, got {self.make_params!r}")


GOAL_PARTS = ("updates", "train_steps")


@dataclasses.dataclass(frozen=True)
class BenchGoal:
    """A target time ratio between two entries, reported next to the measured ratio.

    Goals are printed and recorded, never asserted (no timing thresholds in tests): the
    report shows, for every size (``updates``) or model (``train_steps``) where both entries
    were measured, ``median time of numerator / median time of denominator`` against
    ``max_ratio``.

    Attributes:
      name: short label, e.g. ``"multilayer x3 vs optax nested x3"``.
      numerator: entry whose time is divided.
      denominator: entry it is divided by.
      max_ratio: the goal, a finite number > 0 (met when measured <= max_ratio).
      part: ``"updates"`` (the update benchmark) or ``"train_steps"``.
      models: for ``train_steps``, the models it applies to (``None``: all).
      source: where the goal comes from (an issue item), for the reader.
    """

    name: str
    numerator: str
    denominator: str
    max_ratio: float
    part: str = "updates"
    models: tuple[str, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"BenchGoal.name must be a non-empty string, got {self.name!r}")
        if self.part not in GOAL_PARTS:
            raise ValueError(
                f"BenchGoal.part must be one of {GOAL_PARTS}, got {self.part!r} "
                f"(goal {self.name!r})"
            )
        r = self.max_ratio
        finite_positive = isinstance(r, int | float) and math.isfinite(r) and r > 0
        if isinstance(r, bool) or not finite_positive:
            raise ValueError(
                f"BenchGoal.max_ratio must be a finite number > 0, got {r!r} (goal {self.name!r})"
            )
        if self.numerator == self.denominator:
            raise ValueError(f"BenchGoal {self.name!r} divides an entry by itself")


class Registry:
    """An ordered collection of :class:`BenchEntry` with unique names, and goals over them.

    The module-level :func:`register` / :func:`entries` / :func:`register_goal` /
    :func:`goals` use one default instance; tests build their own so they never change what
    the real benchmark measures.
    """

    def __init__(self) -> None:
        self._entries: dict[str, BenchEntry] = {}
        self._goals: dict[str, BenchGoal] = {}

    def register(self, entry: BenchEntry) -> BenchEntry:
        """Adds ``entry`` and returns it.

        Raises:
          ValueError: if the name is already registered, or the counterpart is not.
        """
        if not isinstance(entry, BenchEntry):
            raise TypeError(f"register() takes a BenchEntry, got {type(entry).__name__}")
        if entry.name in self._entries:
            raise ValueError(f"a bench entry named {entry.name!r} is already registered")
        if entry.counterpart is not None and entry.counterpart not in self._entries:
            known = ", ".join(repr(n) for n in self._entries) or "none"
            raise ValueError(
                f"bench entry {entry.name!r} names counterpart {entry.counterpart!r}, which is "
                f"not registered; register the counterpart first. Registered: {known}"
            )
        self._entries[entry.name] = entry
        return entry

    def entries(self) -> list[BenchEntry]:
        """All entries, in registration order."""
        return list(self._entries.values())

    def register_goal(self, goal: BenchGoal) -> BenchGoal:
        """Adds ``goal`` and returns it.

        Raises:
          ValueError: if a goal of that name exists, or an entry it names is not registered.
        """
        if not isinstance(goal, BenchGoal):
            raise TypeError(f"register_goal() takes a BenchGoal, got {type(goal).__name__}")
        if goal.name in self._goals:
            raise ValueError(f"a bench goal named {goal.name!r} is already registered")
        for name in (goal.numerator, goal.denominator):
            if name not in self._entries:
                raise ValueError(f"bench goal {goal.name!r} names entry {name!r}, not registered")
        self._goals[goal.name] = goal
        return goal

    def goals(self) -> list[BenchGoal]:
        """All goals, in registration order."""
        return list(self._goals.values())

    def get(self, name: str) -> BenchEntry:
        """The entry called ``name``.

        Raises:
          KeyError: if there is none (the message lists the registered names).
        """
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self._entries) or "none"
            raise KeyError(f"no bench entry named {name!r}; registered: {known}") from None

    def __len__(self) -> int:
        return len(self._entries)


_DEFAULT = Registry()


def register(entry: BenchEntry) -> BenchEntry:
    """Adds ``entry`` to the default registry (see :meth:`Registry.register`)."""
    return _DEFAULT.register(entry)


def entries() -> list[BenchEntry]:
    """The default registry's entries, in registration order."""
    return _DEFAULT.entries()


def register_goal(goal: BenchGoal) -> BenchGoal:
    """Adds ``goal`` to the default registry (see :meth:`Registry.register_goal`)."""
    return _DEFAULT.register_goal(goal)


def goals() -> list[BenchGoal]:
    """The default registry's goals, in registration order."""
    return _DEFAULT.goals()


def get_entry(name: str) -> BenchEntry:
    """The default registry's entry called ``name`` (see :meth:`Registry.get`)."""
    return _DEFAULT.get(name)

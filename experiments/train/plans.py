"""Batch plans: which examples each step of each run (and each worker) trains on.

A plan is the trainer hook for the data side. The training data stays on the device; a
plan only hands out *indices* into it, a chunk of steps at a time, so one jitted program
runs many steps with no host round trip. Every plan is a pure function of
``(seed, step)``, which is what makes a resumed run continue exactly.

A plan has three static numbers, fixed for the whole run, so nothing recompiles:

- ``workers``: 0 for one model per run, or W > 0 when every worker of a run draws its own
  batches (worker-local training: Local SGD, DiLoCo, federated clients);
- ``max_micro``: the most micro-batches one step accumulates;
- ``micro_batch``: the examples in one micro-batch.

``indices(seed, steps)`` returns, for the given steps, a dict of arrays with a leading
step axis:

- ``"idx"``: int32 ``[S, (W,) max_micro, micro_batch]`` indices into the training arrays;
- ``"n_micro"``: int32 ``[S]``, the micro-batches actually accumulated at each step (the
  rest of ``idx`` is ignored): a batch size ``n_micro * micro_batch`` that changes during
  training without recompiling (DiveBatch);
- optionally ``"active"``: bool ``[S, W]``, the workers (clients) taking part in each
  step, handed to the optimizer as the extra argument ``active`` (client sampling).

Plans here: :class:`EpochPlan` (the usual shuffled epochs), :class:`WorkerPlan` (one
stream per worker over its partition), :class:`GrowingBatchPlan` (a batch-size schedule
over micro-batches), :class:`EpochBatchPlan` (a batch size chosen at every epoch boundary,
from a schedule or from a measurement of the run's state: AdaBatch, DiveBatch),
:class:`TaskStreamPlan` (continual learning: a stream of tasks, each a block of the
training arrays) and :class:`ClientSamplingPlan` (a fraction of the clients per round).

**Adaptive plans** (those with an ``observe`` method, such as :class:`EpochBatchPlan`)
are driven by the trainer between chunks, all on the host and without recompiling:
``start(seeds)`` once per group; ``next_decision(step)``, the next step at which some run
ends an epoch (the trainer's chunk stops there); ``run_indices(run, steps)`` instead of
``indices`` (per run, with a per-run ``"live"`` mask: a run that has finished its epochs
is frozen while the others go on); ``observe(step, state)`` after every chunk, with the
stacked state, where the plan measures and decides; ``finished(step)`` when every run is
done. Their decisions depend on the trained state, so they are not a pure function of the
step: such a group restarts from step 0 instead of resuming a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from optlab.validation import check_int_in_range

__all__ = [
    "BatchPlan",
    "ClientSamplingPlan",
    "EpochBatchPlan",
    "EpochPlan",
    "GrowingBatchPlan",
    "TaskStreamPlan",
    "WorkerPlan",
]


class BatchPlan(Protocol):
    """Anything that hands out per-step training indices (see the module docstring)."""

    workers: int
    max_micro: int
    micro_batch: int

    def indices(self, seed: int, steps: Sequence[int]) -> dict[str, np.ndarray]: ...


class _Stream:
    """Shuffled epochs over ``pool`` (a 1-D index array) in batches of ``batch_size``.

    Epoch ``e`` visits ``pool`` in the order ``default_rng([seed, *salt, e]).permutation``,
    and drops the last incomplete batch. With ``salt=()`` and ``pool=arange(n)`` this is
    exactly :class:`experiments.data.BatchIterator`'s order.
    """

    def __init__(self, pool: np.ndarray, batch_size: int, seed: int, salt: tuple[int, ...]):
        self.pool = np.asarray(pool, np.int64)
        self.batch_size = check_int_in_range(
            "batch_size",
            batch_size,
            min_value=1,
            max_value=len(self.pool),
            note=" (the examples this stream draws from)",
        )
        self.seed, self.salt = seed, salt
        self.per_epoch = len(self.pool) // self.batch_size
        self._epoch, self._order = -1, self.pool

    def batch(self, step: int) -> np.ndarray:
        epoch, slot = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, *self.salt, epoch])
            self._order, self._epoch = self.pool[rng.permutation(len(self.pool))], epoch
        return self._order[slot * self.batch_size : (slot + 1) * self.batch_size]


class EpochPlan:
    """Shuffled epochs over ``num_examples`` examples, one batch of ``batch_size`` a step.

    The order is :class:`experiments.data.BatchIterator`'s (epoch ``e`` permutes with
    ``default_rng([seed, e])``; the remainder of an epoch is dropped).
    """

    workers = 0
    max_micro = 1

    def __init__(self, num_examples: int, batch_size: int):
        self.num_examples = check_int_in_range("num_examples", num_examples, min_value=1)
        self.micro_batch = check_int_in_range(
            "batch_size",
            batch_size,
            min_value=1,
            max_value=num_examples,
            note=" (the training set)",
        )
        self._streams: dict[int, _Stream] = {}

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.micro_batch

    def _stream(self, seed: int) -> _Stream:
        if seed not in self._streams:
            self._streams[seed] = _Stream(np.arange(self.num_examples), self.micro_batch, seed, ())
        return self._streams[seed]

    def indices(self, seed: int, steps: Sequence[int]) -> dict[str, np.ndarray]:
        stream = self._stream(seed)
        idx = np.stack([stream.batch(s) for s in steps])[:, None, :]
        return {"idx": idx.astype(np.int32), "n_micro": np.ones(len(steps), np.int32)}


class WorkerPlan:
    """Worker-local batches: worker ``w`` draws shuffled epochs over its own partition.

    Args:
      partitions: one index array per worker (e.g. from
        :func:`experiments.data.partition_dirichlet`).
      batch_size: examples per worker per step.
    """

    max_micro = 1

    def __init__(self, partitions: Sequence[np.ndarray], batch_size: int):
        if not partitions:
            raise ValueError("partitions must hold at least one worker's indices, got [].")
        smallest = min(len(p) for p in partitions)
        self.partitions = [np.asarray(p, np.int64) for p in partitions]
        self.workers = len(self.partitions)
        self.micro_batch = check_int_in_range(
            "batch_size",
            batch_size,
            min_value=1,
            max_value=smallest,
            note=" (the smallest worker partition)",
        )
        self._streams: dict[tuple[int, int], _Stream] = {}

    def _stream(self, seed: int, worker: int) -> _Stream:
        key = (seed, worker)
        if key not in self._streams:
            self._streams[key] = _Stream(
                self.partitions[worker], self.micro_batch, seed, (1_000_003, worker)
            )
        return self._streams[key]

    def indices(self, seed: int, steps: Sequence[int]) -> dict[str, np.ndarray]:
        idx = np.stack(
            [np.stack([self._stream(seed, w).batch(s) for w in range(self.workers)]) for s in steps]
        )[:, :, None, :]
        return {"idx": idx.astype(np.int32), "n_micro": np.ones(len(steps), np.int32)}


class GrowingBatchPlan:
    """A batch size that changes during training, in whole micro-batches, never recompiling.

    Step ``t`` accumulates ``micro_batches(t)`` micro-batches of ``micro_batch`` examples
    (at most ``max_micro``), drawn consecutively from shuffled epochs; the step averages
    their gradients (see :func:`experiments.train.vectorized.train_group`).

    Args:
      num_examples: training-set size.
      micro_batch: examples per micro-batch.
      max_micro: the static bound on ``micro_batches(t)``.
      micro_batches: ``step -> int`` in ``[1, max_micro]``, e.g. DiveBatch's decision.
        It must be a pure function of the step (resuming calls it again).
    """

    workers = 0

    def __init__(
        self,
        num_examples: int,
        micro_batch: int,
        max_micro: int,
        micro_batches: Callable[[int], int],
    ):
        self.micro_batch = check_int_in_range(
            "micro_batch", micro_batch, min_value=1, max_value=num_examples
        )
        self.max_micro = check_int_in_range("max_micro", max_micro, min_value=1)
        self.num_examples = num_examples
        self.micro_batches = micro_batches
        self._streams: dict[int, _Stream] = {}

    def indices(self, seed: int, steps: Sequence[int]) -> dict[str, np.ndarray]:
        if seed not in self._streams:
            self._streams[seed] = _Stream(np.arange(self.num_examples), self.micro_batch, seed, ())
        stream = self._streams[seed]
        counts = np.array([int(self.micro_batches(s)) for s in steps], np.int32)
        if counts.min(initial=1) < 1 or counts.max(initial=1) > self.max_micro:
            raise ValueError(
                f"micro_batches(step) must lie in [1, {self.max_micro}] (max_micro), "
                f"got {sorted(set(counts.tolist()))}."
            )
        idx = np.zeros((len(steps), self.max_micro, self.micro_batch), np.int32)
        for i, step in enumerate(steps):
            # Micro-batch j of step t is the stream's batch number max_micro * t + j, so
            # the order does not depend on earlier steps' sizes (a pure function of step).
            for j in range(counts[i]):
                idx[i, j] = stream.batch(self.max_micro * step + j)
        return {"idx": idx, "n_micro": counts}


class EpochBatchPlan:
    """Shuffled epochs whose batch size, in whole micro-batches, is set at each epoch's start.

    Run ``r`` trains ``epochs`` epochs; epoch ``e`` has a batch of ``k_e * micro_batch``
    examples (``1 <= k_e <= max_micro``) and ``num_examples // (k_e * micro_batch)`` steps
    over the permutation ``default_rng([seed, e])`` (the remainder is dropped; with
    ``k_e = 1`` this is exactly :class:`EpochPlan`'s order). ``k_0`` is
    ``initial_micro``; each later ``k_e`` comes from ``decide`` when epoch ``e - 1`` ends,
    or from ``schedule(e)`` when there is no ``decide``. The step averages the ``k_e``
    micro-batch gradients and hands the batch size to the optimizer as the extra argument
    ``batch_size`` (for :func:`optlab.scale_by_batch_size`). A run that has finished its
    epochs is frozen (its state no longer changes) while the others go on, so runs whose
    batches grow at different times keep the same epoch budget.

    Args:
      num_examples: training-set size.
      micro_batch: examples per micro-batch (the compiled shape).
      max_micro: the most micro-batches per step; ``max_micro * micro_batch`` must not
        exceed ``num_examples``.
      epochs: epochs per run (>= 1).
      initial_micro: ``k_0``.
      schedule: ``epoch -> k_e`` (a fixed schedule such as AdaBatch's), used when
        ``decide`` is None; default: ``initial_micro`` throughout.
      decide: ``decide(ended, state, step) -> [k]``: called by the trainer (through
        :meth:`observe`) when runs end an epoch at ``step``; ``ended`` lists
        ``(run, epoch)`` pairs (``epoch`` the 0-based epoch that just ended, the last one
        included), ``state`` is the group's stacked :class:`~experiments.train.step.TrainState`
        (runs on the leading axis). It returns each run's ``k`` for its next epoch
        (ignored after the last). DiveBatch measures the gradient diversity here.

    Attributes:
      history: per run, ``[(epoch, start_step, micro_batches)]`` of every epoch begun.
    """

    workers = 0

    def __init__(
        self,
        num_examples: int,
        micro_batch: int,
        max_micro: int,
        epochs: int,
        *,
        initial_micro: int = 1,
        schedule: Callable[[int], int] | None = None,
        decide: Callable[[list[tuple[int, int]], Any, int], Sequence[int]] | None = None,
    ):
        self.num_examples = check_int_in_range("num_examples", num_examples, min_value=1)
        self.micro_batch = check_int_in_range(
            "micro_batch", micro_batch, min_value=1, max_value=num_examples
        )
        self.max_micro = check_int_in_range(
            "max_micro",
            max_micro,
            min_value=1,
            max_value=num_examples // self.micro_batch,
            note=" (num_examples // micro_batch)",
        )
        self.epochs = check_int_in_range("epochs", epochs, min_value=1)
        self.initial_micro = self._check_micro(initial_micro, "initial_micro")
        self.schedule = schedule
        self.decide = decide
        self.start([0])

    def _check_micro(self, value: Any, name: str) -> int:
        return check_int_in_range(
            name, int(value), min_value=1, max_value=self.max_micro, note=" (max_micro)"
        )

    def start(self, seeds: Sequence[int]) -> None:
        """Resets the plan for a group whose run ``r`` has seed ``seeds[r]``."""
        self.seeds = [int(s) for s in seeds]
        self._counts: list[list[int]] = [[self.initial_micro] for _ in self.seeds]
        self._starts: list[list[int]] = [[0] for _ in self.seeds]
        self._finished = [False for _ in self.seeds]
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    @property
    def history(self) -> list[list[tuple[int, int, int]]]:
        return [
            [(e, s, k) for e, (s, k) in enumerate(zip(starts, counts, strict=True))]
            for starts, counts in zip(self._starts, self._counts, strict=True)
        ]

    def _steps_in(self, k: int) -> int:
        return self.num_examples // (k * self.micro_batch)

    def _epoch_end(self, run: int) -> int:
        """The step at which the run's latest decided epoch ends."""
        return self._starts[run][-1] + self._steps_in(self._counts[run][-1])

    def next_decision(self, step: int) -> int | None:
        """The first step after ``step`` at which a run still training ends an epoch."""
        ends = [self._epoch_end(r) for r, done in enumerate(self._finished) if not done]
        return min(ends) if ends else None

    def finished(self, step: int) -> bool:
        """Whether every run has ended its last epoch (by ``step``)."""
        del step
        return all(self._finished)

    def observe(self, step: int, state: Any) -> None:
        """Ends the epochs that end at ``step`` and sets the next batch sizes."""
        ended = [
            (r, len(self._counts[r]) - 1)
            for r, done in enumerate(self._finished)
            if not done and self._epoch_end(r) == step
        ]
        if not ended:
            return
        if self.decide is not None:
            counts = list(self.decide(ended, state, step))
            if len(counts) != len(ended):
                raise ValueError(f"decide returned {len(counts)} sizes for {len(ended)} runs.")
        else:
            counts = [
                self.schedule(epoch + 1) if self.schedule else self.initial_micro
                for _, epoch in ended
            ]
        for (run, epoch), k in zip(ended, counts, strict=True):
            if epoch + 1 < self.epochs:
                self._counts[run].append(self._check_micro(k, "decide/schedule micro-batches"))
                self._starts[run].append(step)
            else:
                self._finished[run] = True

    def _order(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._orders:
            if len(self._orders) > 4 * len(self.seeds):
                self._orders.clear()
            self._orders[key] = np.random.default_rng([seed, epoch]).permutation(self.num_examples)
        return self._orders[key]

    def run_indices(self, run: int, steps: Sequence[int]) -> dict[str, np.ndarray]:
        """``idx``, ``n_micro`` and ``live`` (bool ``[S]``) of run ``run`` at ``steps``."""
        idx = np.zeros((len(steps), self.max_micro, self.micro_batch), np.int32)
        counts = np.ones(len(steps), np.int32)
        live = np.zeros(len(steps), bool)
        starts, decided = self._starts[run], self._counts[run]
        for i, step in enumerate(steps):
            epoch = int(np.searchsorted(starts, step, side="right")) - 1
            k = decided[epoch]
            slot = step - starts[epoch]
            if slot >= self._steps_in(k):  # finished, or not decided yet (chunk padding)
                continue
            batch = k * self.micro_batch
            chosen = self._order(self.seeds[run], epoch)[slot * batch : (slot + 1) * batch]
            idx[i, :k] = chosen.reshape(k, self.micro_batch)
            counts[i], live[i] = k, True
        return {"idx": idx, "n_micro": counts, "live": live}

    def indices(self, seed: int, steps: Sequence[int]) -> dict[str, np.ndarray]:
        """The :class:`BatchPlan` view of a one-run group with seed ``seed``."""
        if self.seeds != [seed]:
            self.start([seed])
        return self.run_indices(0, steps)


class TaskStreamPlan:
    """Continual learning: task ``k`` trains on block ``k`` of the training arrays.

    The training arrays hold every task's examples one block after another (e.g. the
    same images under T pixel permutations); steps ``[k * steps_per_task, (k + 1) *
    steps_per_task)`` draw shuffled epochs from block ``k`` only.

    Args:
      blocks: one index array per task, into the training arrays.
      steps_per_task: training steps spent on each task.
      batch_size: examples per step.
    """

    workers = 0
    max_micro = 1

    def __init__(self, blocks: Sequence[np.ndarray], steps_per_task: int, batch_size: int):
        if not blocks:
            raise ValueError("blocks must hold at least one task, got [].")
        self.blocks = [np.asarray(b, np.int64) for b in blocks]
        self.steps_per_task = check_int_in_range("steps_per_task", steps_per_task, min_value=1)
        self.micro_batch = check_int_in_range(
            "batch_size",
            batch_size,
            min_value=1,
            max_value=min(len(b) for b in self.blocks),
            note=" (the smallest task)",
        )
        self._streams: dict[tuple[int, int], _Stream] = {}

    def task_at(self, step: int) -> int:
        """The task trained at ``step`` (the last task after the stream ends)."""
        return min(step // self.steps_per_task, len(self.blocks) - 1)

    def indices(self, seed: int, steps: Sequence[int]) -> dict[str, np.ndarray]:
        rows = []
        for step in steps:
            task = self.task_at(step)
            key = (seed, task)
            if key not in self._streams:
                self._streams[key] = _Stream(self.blocks[task], self.micro_batch, seed, (7, task))
            rows.append(self._streams[key].batch(step - task * self.steps_per_task))
        idx = np.stack(rows)[:, None, :].astype(np.int32)
        return {"idx": idx, "n_micro": np.ones(len(steps), np.int32)}


class ClientSamplingPlan:
    """Federated rounds: ``per_round`` of the plan's W clients take part in each round.

    Wraps a :class:`WorkerPlan`; the clients of round ``r = step // round_steps`` are drawn
    without replacement with ``default_rng([seed, 31337, r])``. The mask reaches the
    optimizer as the extra argument ``active`` (bool ``[W]``, one entry per worker).
    """

    def __init__(self, base: WorkerPlan, per_round: int, round_steps: int = 1):
        self.base = base
        self.workers = base.workers
        self.max_micro = base.max_micro
        self.micro_batch = base.micro_batch
        self.per_round = check_int_in_range(
            "per_round",
            per_round,
            min_value=1,
            max_value=base.workers,
            note=" (the number of clients)",
        )
        self.round_steps = check_int_in_range("round_steps", round_steps, min_value=1)

    def active(self, seed: int, step: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 31337, step // self.round_steps])
        mask = np.zeros(self.workers, bool)
        mask[rng.choice(self.workers, self.per_round, replace=False)] = True
        return mask

    def indices(self, seed: int, steps: Sequence[int]) -> dict[str, np.ndarray]:
        out = self.base.indices(seed, steps)
        out["active"] = np.stack([self.active(seed, s) for s in steps])
        return out

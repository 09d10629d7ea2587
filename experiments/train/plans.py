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
over micro-batches), :class:`TaskStreamPlan` (continual learning: a stream of tasks, each
a block of the training arrays) and :class:`ClientSamplingPlan` (a fraction of the
clients per round).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from optlab.validation import check_int_in_range

__all__ = [
    "BatchPlan",
    "ClientSamplingPlan",
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

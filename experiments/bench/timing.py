"""Side-by-side wall-clock timing: warm up, then interleave the candidates round-robin.

Machine drift (frequency scaling, other processes, cache state) hits every candidate in the
same way when the repetitions are interleaved, so the *ratios* stay meaningful on a noisy
machine even when absolute times move. Each round starts at a different candidate, so no
candidate always runs right after the same neighbour.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping

from tqdm import tqdm

__all__ = ["interleaved_times", "median", "progress", "ratio"]

Runner = Callable[[], object]
"""Runs one timed unit of work and returns only after it finished (``block_until_ready``)."""


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries only the tables)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def interleaved_times(
    runners: Mapping[str, Runner],
    *,
    reps: int,
    warmup: int = 1,
    desc: str = "",
) -> dict[str, list[float]]:
    """Times every runner ``reps`` times, interleaved round-robin.

    Args:
      runners: name -> a zero-argument callable that blocks until its work is done.
      reps: timed repetitions per runner (>= 1).
      warmup: untimed calls per runner first (compilation, allocator warm-up).
      desc: label of the progress bar (on stderr, shown only on a terminal).

    Returns:
      name -> the ``reps`` wall-clock times in seconds, in the order they were taken.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in tqdm(range(reps), desc=desc, leave=False, disable=None, file=sys.stderr):
        shift = rep % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    """The median (robust to the occasional slow repetition)."""
    return float(statistics.median(values))


def ratio(time_s: float, reference_s: float | None) -> float | None:
    """``time_s / reference_s``, or ``None`` when there is no usable reference."""
    if reference_s is None or not math.isfinite(reference_s) or reference_s <= 0:
        return None
    return time_s / reference_s

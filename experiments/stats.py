"""Honest verdicts: paired per-seed differences with a t-based 95 % interval.

Method and baseline run on the same seeds (the same data order and, where the models
match, the same initialisation), so their results are paired: for each seed ``s`` the
difference ``d_s = better_sign * (method_s - baseline_s)``. The verdict reads the 95 %
t-interval of the mean difference (``scipy.stats.t``, ``n - 1`` degrees of freedom):

- **held**: the whole interval is on the claimed side of 0;
- **did not hold**: the whole interval is on the other side;
- **inconclusive**: the interval contains 0 (the difference is within seed noise).

A claim "A is at least as good as B" that comes out *inconclusive* is reported as such,
never as "held". Seeds whose value is missing (NaN, e.g. a metric of a diverged run) on
either side are left out and counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["HELD", "INCONCLUSIVE", "NOT_HELD", "PairedResult", "combine", "paired"]

HELD = "held"
INCONCLUSIVE = "inconclusive"
NOT_HELD = "did not hold"


class PairedResult(NamedTuple):
    """A paired comparison.

    Attributes:
      outcome: ``"held"``, ``"inconclusive"`` or ``"did not hold"``.
      mean_diff: mean of ``method - baseline`` over the paired seeds (raw sign).
      low, high: the 95 % t-interval of that mean (-inf, inf for n = 1: no verdict).
      n: paired seeds used; ``dropped``: seeds left out for a missing value.
    """

    outcome: str
    mean_diff: float
    low: float
    high: float
    n: int
    dropped: int


def paired(
    method: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    *,
    higher_is_better: bool = True,
    confidence: float = 0.95,
) -> PairedResult:
    """The verdict on "``method`` is better than ``baseline``" from per-seed values.

    Args:
      method, baseline: values per seed, in the same seed order.
      higher_is_better: the metric's direction (accuracy: True; loss, sharpness: False).
      confidence: the two-sided level of the interval.

    Returns:
      A :class:`PairedResult`. One paired seed gives no interval (its bounds are
      infinite): inconclusive, whatever the difference. When every difference of two or
      more seeds is the same (no spread, e.g. deterministic runs), the interval is that
      one value: a nonzero difference decides and a zero difference is inconclusive.

    Example:
      >>> paired([0.9, 0.8, 0.85], [0.7, 0.6, 0.66]).outcome
      'held'
      >>> paired([0.9, 0.6, 0.8], [0.8, 0.7, 0.8]).outcome
      'inconclusive'
      >>> paired([0.9], [0.1]).outcome  # one seed decides nothing
      'inconclusive'
    """
    from scipy import stats

    a = np.asarray(method, np.float64)
    b = np.asarray(baseline, np.float64)
    if a.shape != b.shape:
        raise ValueError(
            f"method and baseline need one value per seed each, got {a.shape} {b.shape}"
        )
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n, dropped = int(d.size), int((~keep).sum())
    if n == 0:
        return PairedResult(INCONCLUSIVE, math.nan, math.nan, math.nan, 0, dropped)
    mean = float(d.mean())
    if n > 1:
        se = float(d.std(ddof=1)) / math.sqrt(n)
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    else:  # one seed: no estimate of the spread, so no verdict
        half = math.inf
    low, high = mean - half, mean + half
    sign = 1.0 if higher_is_better else -1.0
    lo, hi = sorted((sign * low, sign * high))
    if lo > 0:
        outcome = HELD
    elif hi < 0:
        outcome = NOT_HELD
    else:
        outcome = INCONCLUSIVE
    return PairedResult(outcome, mean, low, high, n, dropped)


def combine(primary: PairedResult, guards: Sequence[PairedResult]) -> str:
    """One outcome from a primary comparison and guard comparisons that must not fail.

    Used for sensitivity claims: "less sensitive" (the primary, a smaller spread over the
    grid) only *holds* when the method is not significantly worse in its worst and mean
    value over the grid (the guards); a significantly worse guard makes it *did not hold*,
    so a uniformly bad method cannot win as "less sensitive".
    """
    if any(g.outcome == NOT_HELD for g in guards) or primary.outcome == NOT_HELD:
        return NOT_HELD
    return primary.outcome

"""Construction-time argument checks shared by every optlab transform.

Structural integers (periods, levels, worker counts) must be Python ints known when the
transform is built. Float knobs (rates, rho, alpha) may also be traced values or schedules
so that ``optax.inject_hyperparams`` works without ``static_args``: those are range-checked
only when they are concrete numbers.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np

__all__ = ["check_float_in_range", "check_injectable_int", "check_int_in_range"]


def check_int_in_range(
    name: str,
    value: Any,
    *,
    min_value: int | None = None,
    max_value: int | None = None,
    note: str = "",
) -> int:
    """Returns ``value`` as an int, or raises ``ValueError`` naming ``name`` and the range.

    Booleans, floats (even integral ones such as ``5.0``), arrays and tracers are rejected:
    a structural integer must be a plain Python/NumPy integer. ``note`` says where a bound
    comes from, e.g. ``" (the number of examples)"``.
    """
    allowed = f"{name} must be an integer{_range_text(min_value, max_value)}{note}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{allowed}, got {value!r} of type {type(value).__name__}.")
    value = int(value)
    if (min_value is not None and value < min_value) or (
        max_value is not None and value > max_value
    ):
        raise ValueError(f"{allowed}, got {value}.")
    return value


def check_injectable_int(
    name: str,
    value: Any,
    *,
    min_value: int | None = None,
    max_value: int | None = None,
) -> Any:
    """Like :func:`check_int_in_range`, but also lets integer JAX values through.

    ``optax.inject_hyperparams`` hands every numeric argument, integers included, to the
    factory as a JAX array (a concrete one in ``init``, a tracer in ``update``). An integer
    knob that only enters arithmetic (a period used in ``count % period``) can accept that:
    concrete 0-d integer arrays are checked and returned as ``int``; tracers pass unchecked
    (they were checked when concrete). Floats, booleans and non-scalar arrays are rejected.
    """
    if isinstance(value, jax.core.Tracer):
        if value.ndim == 0 and np.issubdtype(value.dtype, np.integer):
            return value
        raise ValueError(
            f"{name} must be an integer scalar, got a traced {value.dtype}{value.shape}."
        )
    is_array = isinstance(value, jax.Array | np.ndarray)
    if is_array and value.ndim == 0 and np.issubdtype(value.dtype, np.integer):
        value = int(value)
    return check_int_in_range(name, value, min_value=min_value, max_value=max_value)


def check_float_in_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> Any:
    """Range-checks a float knob when it is concrete; returns it unchanged.

    Callables (optax schedules) and JAX tracers pass through unchecked: they are only known
    inside ``update``. Non-finite concrete values are always rejected.
    """
    if callable(value) or isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, str | bytes):  # float("0.1") would pass: a typo'd config value
        raise ValueError(f"{name} must be a real number or a schedule, got {value!r}.")
    try:
        as_float = float(np.asarray(value))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a real number or a schedule, got {value!r}.") from error
    lo_ok = low is None or (as_float >= low if low_inclusive else as_float > low)
    hi_ok = high is None or (as_float <= high if high_inclusive else as_float < high)
    if not (np.isfinite(as_float) and lo_ok and hi_ok):
        lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{name} must lie in {lo}, {hi}, got {value!r}.")
    return value


def _range_text(min_value: int | None, max_value: int | None) -> str:
    if min_value is not None and max_value is not None:
        return f" in [{min_value}, {max_value}]"
    if min_value is not None:
        return f" >= {min_value}"
    if max_value is not None:
        return f" <= {max_value}"
    return ""

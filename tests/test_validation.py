"""optlab.validation: construction-time checks name the parameter and the allowed range."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optlab.validation import check_float_in_range, check_int_in_range


@pytest.mark.parametrize("value", [1, 5, np.int32(3), np.int64(7)])
def test_int_accepts_integers(value):
    out = check_int_in_range("k", value, min_value=1, max_value=10)
    assert out == int(value)
    assert type(out) is int


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (0, {"min_value": 1}, "k must be an integer >= 1, got 0."),
        (11, {"min_value": 1, "max_value": 10}, "k must be an integer in [1, 10], got 11."),
        (11, {"max_value": 10}, "k must be an integer <= 10, got 11."),
        (5.0, {"min_value": 1}, "k must be an integer >= 1, got 5.0 of type float."),
        (True, {"min_value": 1}, "k must be an integer >= 1, got True of type bool."),
        ("5", {}, "k must be an integer, got '5' of type str."),
        (
            9,
            {"max_value": 8, "note": " (the number of examples)"},
            "k must be an integer <= 8 (the number of examples), got 9.",
        ),
    ],
)
def test_int_errors_name_parameter_and_range(value, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        check_int_in_range("k", value, **kwargs)
    assert str(info.value) == message


def test_int_rejects_arrays_and_tracers():
    with pytest.raises(ValueError, match="of type ArrayImpl"):
        check_int_in_range("k", jnp.asarray(3))
    with pytest.raises(ValueError, match="must be an integer"):
        jax.jit(lambda k: check_int_in_range("k", k))(3)


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0, np.float32(0.25), jnp.asarray(0.5)])
def test_float_accepts_values_in_range(value):
    assert check_float_in_range("alpha", value, low=0.0, high=1.0) is value


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (1.5, {"low": 0.0, "high": 1.0}, "alpha must lie in [0, 1], got 1.5."),
        (0.0, {"low": 0.0, "low_inclusive": False}, "alpha must lie in (0, inf), got 0.0."),
        (1.0, {"high": 1.0, "high_inclusive": False}, "alpha must lie in (-inf, 1), got 1.0."),
        (float("nan"), {}, "alpha must lie in (-inf, inf), got nan."),
    ],
)
def test_float_errors_name_parameter_and_range(value, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        check_float_in_range("alpha", value, **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("value", ["big", "0.1", b"0.1"])
def test_float_rejects_non_numbers(value):
    with pytest.raises(ValueError, match="alpha must be a real number or a schedule"):
        check_float_in_range("alpha", value)


def test_float_passes_schedules_and_tracers_through():
    schedule = optax.linear_schedule(0.0, 5.0, 10)  # out of range values, but only known later
    assert check_float_in_range("alpha", schedule, high=1.0) is schedule
    out = jax.jit(lambda a: check_float_in_range("alpha", a, low=0.0, high=1.0) * 2)(3.0)
    assert float(out) == 6.0


def test_check_injectable_int_accepts_concrete_and_traced_integers():
    import jax
    import jax.numpy as jnp

    from optlab.validation import check_injectable_int

    assert check_injectable_int("k", 5, min_value=1) == 5
    assert check_injectable_int("k", jnp.asarray(5), min_value=1) == 5  # inject_hyperparams init
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got 0"):
        check_injectable_int("k", jnp.asarray(0), min_value=1)
    with pytest.raises(ValueError, match="k must be an integer"):
        check_injectable_int("k", jnp.asarray(5.0), min_value=1)
    with pytest.raises(ValueError, match="k must be an integer"):
        check_injectable_int("k", 5.0, min_value=1)
    seen = []
    jax.jit(lambda k: seen.append(check_injectable_int("k", k, min_value=1)) or k)(3)
    assert len(seen) == 1
    with pytest.raises(ValueError, match="integer scalar"):
        jax.jit(lambda k: check_injectable_int("k", k, min_value=1))(3.0)

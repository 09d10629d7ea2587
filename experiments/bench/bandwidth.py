"""The machine's memory bandwidth: the physical limit of an elementwise optimizer update.

The kernel is ``x + c`` on a large float32 array under ``jit``, with ``c`` a traced zero:
XLA folds a literal ``x + 0`` into a plain copy, while ``x + c`` is a real elementwise loop
that reads ``x`` and writes the result, the same kind of kernel as an optimizer update.

Two variants run interleaved:

- **in place** (the reported bandwidth): ``x`` is donated, so the result is written into
  ``x``'s buffer and fed to the next call, as the train step does with its state. This is
  the DRAM limit: every byte is read and written, nothing is allocated.
- **fresh output**: ``x`` is not donated and each call writes a newly allocated buffer. On
  CPU a buffer this large comes fresh from the OS, and the first write to each 4 KiB page
  faults (measured: one fault per page per call), so this measures the allocator and the
  kernel's page zeroing more than memory. It is recorded because it explains slow
  non-donated calls, but it is not the physical limit (optimizer updates on 10M parameters
  run faster than it on a 2-core CPU).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from experiments.bench.timing import interleaved_times, median

__all__ = ["BandwidthResult", "add_fresh", "add_in_place", "measure_bandwidth"]

_MIB = 2**20


@dataclasses.dataclass(frozen=True)
class BandwidthResult:
    """Result of :func:`measure_bandwidth`; GB/s are bytes read plus written / 1e9 / second.

    Attributes:
      gbs: in-place bandwidth (donated input): the physical limit used for fractions.
      fresh_output_gbs: bandwidth when every call writes a newly allocated output.
      array_bytes: size of the float32 array.
      median_s: median time of one in-place call.
      fresh_output_median_s: median time of one fresh-output call.
      times_s: every timed in-place repetition.
      fresh_output_times_s: every timed fresh-output repetition.
    """

    gbs: float
    fresh_output_gbs: float
    array_bytes: int
    median_s: float
    fresh_output_median_s: float
    times_s: list[float]
    fresh_output_times_s: list[float]


@partial(jax.jit, donate_argnums=0)
def add_in_place(x: jax.Array, c: jax.Array) -> jax.Array:
    """``x + c`` written into ``x``'s (donated) buffer."""
    return x + c


@jax.jit
def add_fresh(x: jax.Array, c: jax.Array) -> jax.Array:
    """``x + c`` written into a newly allocated buffer."""
    return x + c


def measure_bandwidth(mib: float, *, reps: int, warmup: int = 2) -> BandwidthResult:
    """Times ``x + c`` on a ``mib``-MiB float32 array, in place and into a fresh buffer.

    Bandwidth = (bytes read + bytes written) / median time. The two variants alternate
    round-robin so drift affects both alike.
    """
    n = max(1, int(mib * _MIB) // 4)
    c = jnp.zeros((), jnp.float32)
    held = {"x": jax.block_until_ready(jnp.ones((n,), jnp.float32))}
    source = jax.block_until_ready(jnp.ones((n,), jnp.float32))

    def in_place() -> None:
        held["x"] = jax.block_until_ready(add_in_place(held["x"], c))

    def fresh() -> None:
        jax.block_until_ready(add_fresh(source, c))

    times = interleaved_times(
        {"in_place": in_place, "fresh": fresh}, reps=reps, warmup=warmup, desc="bandwidth"
    )
    t_in, t_fresh = median(times["in_place"]), median(times["fresh"])
    nbytes = int(source.nbytes)
    return BandwidthResult(
        gbs=2 * nbytes / t_in / 1e9,
        fresh_output_gbs=2 * nbytes / t_fresh / 1e9,
        array_bytes=nbytes,
        median_s=t_in,
        fresh_output_median_s=t_fresh,
        times_s=times["in_place"],
        fresh_output_times_s=times["fresh"],
    )

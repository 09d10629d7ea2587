"""Multi-host helpers: who writes files, and reading replicated global arrays on a host.

After ``jax.distributed.initialize()`` every process runs the same program over one global
mesh. All processes train and take part in checkpoints (Orbax coordinates them); only
process 0 writes metrics, results and plots.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def is_main_process() -> bool:
    return jax.process_index() == 0


def local_replica(tree: Any) -> Any:
    """This process's copy of each (replicated) array: single-device arrays, usable by any jit.

    Works for plain arrays, arrays replicated over a mesh, and arrays of a multi-host mesh
    (which ``jax.device_get`` rejects because they are not fully addressable).
    """

    def one(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            if not x.is_fully_replicated:
                raise ValueError("local_replica needs replicated arrays, got a sharded one.")
            return x.addressable_data(0)
        return x

    return jax.tree.map(one, tree)


def to_host(tree: Any) -> Any:
    """NumPy values of a tree of replicated arrays (one device-to-host transfer per leaf)."""
    return jax.tree.map(np.asarray, jax.device_get(local_replica(tree)))


def barrier(name: str) -> None:
    """Waits for every process (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

"""Atomic, resumable checkpoints of a :class:`TrainState` with Orbax.

Orbax writes each step to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact; leftovers are cleaned up when the
manager opens. States are restored against an abstract target built from a freshly
initialised state, so NamedTuples come back as NamedTuples with their shardings.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for one run directory."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)  # Orbax wants absolute paths.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Starts an asynchronous save; the arrays are copied to host before it returns."""
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, like: Any, step: int | None = None) -> Any:
        """Restores ``step`` (default: latest) shaped, typed and sharded like ``like``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

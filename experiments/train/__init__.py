"""Training harness: the jitted step, the loop, checkpoints and metrics."""

from experiments.train.checkpoint import Checkpointer
from experiments.train.loop import NonFiniteLossError, RunResult, train
from experiments.train.losses import classification_loss, make_evaluator
from experiments.train.metrics import MetricsWriter, read_metrics
from experiments.train.step import (
    DATA_AXIS,
    CompiledStep,
    TrainState,
    init_train_state,
    make_mesh,
    make_step_fn,
    make_train_step,
)

__all__ = [
    "DATA_AXIS",
    "Checkpointer",
    "CompiledStep",
    "MetricsWriter",
    "NonFiniteLossError",
    "RunResult",
    "TrainState",
    "classification_loss",
    "init_train_state",
    "make_evaluator",
    "make_mesh",
    "make_step_fn",
    "make_train_step",
    "read_metrics",
    "train",
]

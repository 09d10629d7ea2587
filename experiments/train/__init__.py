"""Training harness: vectorized groups of runs, batch plans, the step, checkpoints, metrics."""

from experiments.train.checkpoint import Checkpointer
from experiments.train.losses import classification_loss, make_evaluator
from experiments.train.metrics import MetricsWriter, read_metrics
from experiments.train.plans import (
    BatchPlan,
    ClientSamplingPlan,
    EpochPlan,
    GrowingBatchPlan,
    TaskStreamPlan,
    WorkerPlan,
)
from experiments.train.step import (
    DATA_AXIS,
    CompiledStep,
    TrainState,
    init_train_state,
    make_mesh,
    make_step_fn,
    make_train_step,
)
from experiments.train.vectorized import WORKER_AXIS, GroupResult, train_group

__all__ = [
    "DATA_AXIS",
    "WORKER_AXIS",
    "BatchPlan",
    "Checkpointer",
    "ClientSamplingPlan",
    "CompiledStep",
    "EpochPlan",
    "GroupResult",
    "GrowingBatchPlan",
    "MetricsWriter",
    "TaskStreamPlan",
    "TrainState",
    "WorkerPlan",
    "classification_loss",
    "init_train_state",
    "make_evaluator",
    "make_mesh",
    "make_step_fn",
    "make_train_step",
    "read_metrics",
    "train_group",
]

"""optlab: optimizers of the Lookahead / SAM / extrapolation / local-SGD line as optax transforms.

Every public optimizer is a pure ``optax.GradientTransformation`` (or
``GradientTransformationExtraArgs`` when it needs a ``grad_fn``), so it drops into any
``optax.chain`` and behind ``flax.nnx.Optimizer``. Multi-worker methods take an
``axis_name`` and run unchanged under ``jax.vmap``, ``jax.shard_map`` and multi-host JAX.
"""

from optlab import parallel, perturbation
from optlab.average_direction_sam import AverageDirectionSAMState, average_direction_sam
from optlab.diloco import DiLoCoState, diloco, diloco_outer_params
from optlab.dpf import DPFState, Sparsity, default_prunable, dpf, masked_params, sparsity
from optlab.dsgd import DSGDState, consensus_distance, dsgd, mixing_matrix
from optlab.extrapolation import (
    ExtrapolationState,
    extrap_sgd,
    extrapolation,
    extrapolation_eval_params,
)
from optlab.gradalign import GradAlignState, gradalign
from optlab.local_sgd import LocalSGDState, local_sgd
from optlab.lookahead import LookaheadState, lookahead, multilayer_lookahead, slow_params
from optlab.mean_gradients import mean_gradients
from optlab.palsgd import PALSGDState, palsgd, palsgd_is_pseudo_sync, palsgd_outer_params
from optlab.parallel import data_parallel_value_and_grad, pvary
from optlab.perturbation import grad_at_point, safe_global_norm
from optlab.sa_sam import SASAMState, sa_sam
from optlab.sam import SAMState, asam_scale, asam_weight_mask, sam
from optlab.sharpness import hessian_top_eigenvalue, hessian_trace

__version__ = "0.1.0"

__all__ = [
    "AverageDirectionSAMState",
    "DPFState",
    "DSGDState",
    "DiLoCoState",
    "ExtrapolationState",
    "GradAlignState",
    "LocalSGDState",
    "LookaheadState",
    "PALSGDState",
    "SAMState",
    "SASAMState",
    "Sparsity",
    "__version__",
    "asam_scale",
    "asam_weight_mask",
    "average_direction_sam",
    "consensus_distance",
    "data_parallel_value_and_grad",
    "default_prunable",
    "diloco",
    "diloco_outer_params",
    "dpf",
    "dsgd",
    "extrap_sgd",
    "extrapolation",
    "extrapolation_eval_params",
    "grad_at_point",
    "gradalign",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "local_sgd",
    "lookahead",
    "masked_params",
    "mean_gradients",
    "mixing_matrix",
    "multilayer_lookahead",
    "palsgd",
    "palsgd_is_pseudo_sync",
    "palsgd_outer_params",
    "parallel",
    "perturbation",
    "pvary",
    "sa_sam",
    "safe_global_norm",
    "sam",
    "slow_params",
    "sparsity",
]

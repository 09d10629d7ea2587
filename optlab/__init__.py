"""optlab: optimizers of the Lookahead / SAM / extrapolation / local-SGD line as optax transforms.

Every public optimizer is a pure ``optax.GradientTransformation`` (or
``GradientTransformationExtraArgs`` when it needs a ``grad_fn``), so it drops into any
``optax.chain`` and behind ``flax.nnx.Optimizer``. Multi-worker methods take an
``axis_name`` and run unchanged under ``jax.vmap``, ``jax.shard_map`` and multi-host JAX.
"""

from optlab import parallel, perturbation
from optlab.average_direction_sam import AverageDirectionSAMState, average_direction_sam
from optlab.diloco import DiLoCoState, diloco, diloco_outer_params
from optlab.divebatch import (
    LR_SCALINGS,
    DiveBatch,
    DiveBatchState,
    adabatch_batch_size,
    divebatch,
    lr_scale,
    scale_by_batch_size,
)
from optlab.dpf import DPFState, Sparsity, default_prunable, dpf, masked_params, sparsity
from optlab.dsgd import DSGDState, consensus_distance, dsgd, mixing_matrix
from optlab.extrapolation import (
    ExtrapolationState,
    extrap_sgd,
    extrapolation,
    extrapolation_eval_params,
)
from optlab.fedavg import FedAvgState, fedavg, federated_server_params
from optlab.fedaware import FedAWAREState, fedaware, min_norm_weights
from optlab.fedga import FedGAState, fedga
from optlab.gradalign import GradAlignState, gradalign
from optlab.gradient_diversity import (
    GradientDiversityState,
    gradient_diversity,
    gradient_diversity_init,
    gradient_diversity_result,
    gradient_diversity_update,
    gradient_diversity_update_from_loss,
    per_example_grads,
)
from optlab.local_sgd import LocalSGDState, local_sgd
from optlab.lookahead import LookaheadState, lookahead, multilayer_lookahead, slow_params
from optlab.mean_gradients import mean_gradients
from optlab.palsgd import PALSGDState, palsgd, palsgd_is_pseudo_sync, palsgd_outer_params
from optlab.parallel import data_parallel_value_and_grad, pvary
from optlab.path_geometry import PathGeometry, path_geometry
from optlab.perturbation import grad_at_point, safe_global_norm
from optlab.sa_sam import SASAMState, sa_sam
from optlab.sam import SAMState, asam_scale, asam_weight_mask, sam
from optlab.sharpness import hessian_top_eigenvalue, hessian_trace
from optlab.spectral_regularization import (
    SpectralRegularizationState,
    spectral_norms,
    spectral_regularization,
)
from optlab.wasserstein_regularization import (
    L2InitRegularizationState,
    WassersteinRegularizationState,
    l2_init_regularization,
    wasserstein_regularization,
)

__version__ = "0.1.0"

__all__ = [
    "LR_SCALINGS",
    "AverageDirectionSAMState",
    "DPFState",
    "DSGDState",
    "DiLoCoState",
    "DiveBatch",
    "DiveBatchState",
    "ExtrapolationState",
    "FedAWAREState",
    "FedAvgState",
    "FedGAState",
    "GradAlignState",
    "GradientDiversityState",
    "L2InitRegularizationState",
    "LocalSGDState",
    "LookaheadState",
    "PALSGDState",
    "PathGeometry",
    "SAMState",
    "SASAMState",
    "Sparsity",
    "SpectralRegularizationState",
    "WassersteinRegularizationState",
    "__version__",
    "adabatch_batch_size",
    "asam_scale",
    "asam_weight_mask",
    "average_direction_sam",
    "consensus_distance",
    "data_parallel_value_and_grad",
    "default_prunable",
    "diloco",
    "diloco_outer_params",
    "divebatch",
    "dpf",
    "dsgd",
    "extrap_sgd",
    "extrapolation",
    "extrapolation_eval_params",
    "fedavg",
    "fedaware",
    "federated_server_params",
    "fedga",
    "grad_at_point",
    "gradalign",
    "gradient_diversity",
    "gradient_diversity_init",
    "gradient_diversity_result",
    "gradient_diversity_update",
    "gradient_diversity_update_from_loss",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "l2_init_regularization",
    "local_sgd",
    "lookahead",
    "lr_scale",
    "masked_params",
    "mean_gradients",
    "min_norm_weights",
    "mixing_matrix",
    "multilayer_lookahead",
    "palsgd",
    "palsgd_is_pseudo_sync",
    "palsgd_outer_params",
    "parallel",
    "path_geometry",
    "per_example_grads",
    "perturbation",
    "pvary",
    "sa_sam",
    "safe_global_norm",
    "sam",
    "scale_by_batch_size",
    "slow_params",
    "sparsity",
    "spectral_norms",
    "spectral_regularization",
    "wasserstein_regularization",
]

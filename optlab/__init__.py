"""optlab: optimizers of the Lookahead / SAM / extrapolation / local-SGD line as optax transforms.

Every public optimizer is a pure ``optax.GradientTransformation`` (or
``GradientTransformationExtraArgs`` when it needs a ``grad_fn``), so it drops into any
``optax.chain`` and behind ``flax.nnx.Optimizer``. Multi-worker methods take an
``axis_name`` and run unchanged under ``jax.vmap``, ``jax.shard_map`` and multi-host JAX.
"""

from optlab import parallel
from optlab.lookahead import LookaheadState, lookahead, multilayer_lookahead, slow_params
from optlab.parallel import data_parallel_value_and_grad, pvary

__version__ = "0.1.0"

__all__ = [
    "LookaheadState",
    "__version__",
    "data_parallel_value_and_grad",
    "lookahead",
    "multilayer_lookahead",
    "parallel",
    "pvary",
    "slow_params",
]

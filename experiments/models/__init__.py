"""Flax (linen) classifiers and a language model behind a framework-neutral, pure-function wrapper.

The training step never touches Flax: it calls ``model.init(rng, x) -> (params, state)``
and ``model.apply(params, state, x, train=..., rng=...) -> (logits, new_state)``, where
``state`` holds the non-trainable collections (``{'batch_stats': ...}`` for BatchNorm
models, ``{}`` otherwise). Both are pure and jit-friendly.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = make_model("cnn", num_classes=10)
  >>> x = jnp.zeros((4, 8, 8, 1))
  >>> params, state = model.init(jax.random.key(0), x)
  >>> logits, state = model.apply(params, state, x, train=True)
  >>> logits.shape
  (4, 10)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.models.cnn import SmallCNN
from experiments.models.mlp import MLP
from experiments.models.resnet import CifarResNet, ResNet, ResNet20
from experiments.models.transformer import TransformerLM

__all__ = [
    "LANGUAGE_MODELS",
    "MLP",
    "CifarResNet",
    "Model",
    "ModelState",
    "Params",
    "ResNet",
    "ResNet20",
    "SmallCNN",
    "TransformerLM",
    "is_model_name",
    "make_model",
    "model_names",
    "param_count",
]

Params = Any
"""A pytree of trainable arrays (the ``'params'`` collection)."""

ModelState = dict[str, Any]
"""Non-trainable variable collections, e.g. ``{'batch_stats': ...}``; ``{}`` when none."""


@dataclasses.dataclass(frozen=True)
class Model:
    """A Flax module seen through pure ``init``/``apply`` functions.

    Attributes:
      module: the ``flax.linen`` module; its ``__call__`` takes ``(x, train: bool)``.
      name: the registry name (or any label).
    """

    module: nn.Module
    name: str

    def init(self, rng: jax.Array, x: jax.Array) -> tuple[Params, ModelState]:
        """Initialise variables from the shape and dtype of one example of ``x``.

        Runs the module in eval mode (``train=False``) on a zero batch shaped like ``x[:1]``,
        so the result does not depend on the batch size or the values of ``x``.

        Args:
          rng: a PRNG key; used for the ``'params'`` (and ``'dropout'``) streams.
          x: a batch (or anything with ``.shape`` and ``.dtype``) of shape ``(N, ...)``.

        Returns:
          ``(variables['params'], every other collection)``, e.g.
          ``(params, {'batch_stats': ...})`` or ``(params, {})``.
        """
        sample = jnp.zeros((1, *x.shape[1:]), dtype=x.dtype)
        params_rng, dropout_rng = jax.random.split(rng)
        variables = dict(
            self.module.init({"params": params_rng, "dropout": dropout_rng}, sample, train=False)
        )
        params = variables.pop("params", {})
        return params, variables

    def apply(
        self,
        params: Params,
        state: ModelState,
        x: jax.Array,
        *,
        train: bool,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, ModelState]:
        """Compute logits; in train mode also return the updated mutable state.

        Args:
          params: the trainable parameters from :meth:`init`.
          state: the other collections from :meth:`init` (or a previous ``apply``).
          x: a batch of inputs, shape ``(N, ...)``.
          train: train mode (BatchNorm uses and updates batch statistics, dropout active)
            or eval mode (running statistics, deterministic). A Python bool.
          rng: optional PRNG key, passed as the ``'dropout'`` rng.

        Returns:
          ``(logits, new_state)``; in eval mode ``new_state is state``.
        """
        variables = {"params": params, **state}
        rngs = {"dropout": rng} if rng is not None else None
        if train and state:
            logits, updates = self.module.apply(
                variables, x, train=True, rngs=rngs, mutable=list(state)
            )
            return cast(jax.Array, logits), {**state, **dict(updates)}
        logits = cast(jax.Array, self.module.apply(variables, x, train=train, rngs=rngs))
        return logits, state


def param_count(params: Params) -> int:
    """Total number of scalar entries in a parameter pytree."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


_REGISTRY: Mapping[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "mlp_small": lambda **kw: MLP(**{"hidden": (32,), **kw}),  # many-client simulations
    "cnn": SmallCNN,
    "resnet20": ResNet20,
    "resnet32": lambda **kw: ResNet(32, **kw),
    "resnet44": lambda **kw: ResNet(44, **kw),
    "resnet56": lambda **kw: ResNet(56, **kw),
    "resnet110": lambda **kw: ResNet(110, **kw),
    "transformer_lm": TransformerLM,  # d_model 64, 4 heads, 2 layers
    "transformer_lm_tiny": lambda **kw: TransformerLM(
        **{"d_model": 16, "num_heads": 2, "num_layers": 1, **kw}
    ),
}


LANGUAGE_MODELS: tuple[str, ...] = ("transformer_lm", "transformer_lm_tiny")
"""The registered models that map tokens ``(N, T)`` to logits ``(N, T, classes)``."""
# "mlp_<width>x<depth>": an MLP of ``depth`` hidden layers of ``width`` units (width sweeps).
_MLP_SHAPE = re.compile(r"mlp_([1-9][0-9]*)x([1-9][0-9]*)$")


def model_names() -> tuple[str, ...]:
    """The registered names :func:`make_model` accepts (plus ``mlp_<width>x<depth>``)."""
    return tuple(_REGISTRY)


def is_model_name(name: str) -> bool:
    """Whether :func:`make_model` knows ``name``: registered, or ``mlp_<width>x<depth>``."""
    return name in _REGISTRY or bool(_MLP_SHAPE.match(str(name)))


def make_model(name: str, num_classes: int, **kwargs: Any) -> Model:
    """Build a registered model by name.

    Args:
      name: one of :func:`model_names` (``"mlp"``, ``"mlp_small"`` (one hidden layer of
        32), ``"cnn"``, ``"resnet20"``, the deeper CIFAR ResNets ``"resnet32"``,
        ``"resnet44"``, ``"resnet56"``, ``"resnet110"``, and the decoder-only
        :class:`TransformerLM` ``"transformer_lm"`` (d_model 64, 4 heads, 2 layers) and
        ``"transformer_lm_tiny"`` (d_model 16, 2 heads, 1 layer), whose inputs are tokens
        ``(N, T)`` and logits ``(N, T, num_classes)``), or ``"mlp_<width>x<depth>"`` for an
        MLP of ``depth`` hidden layers of ``width`` units.
      num_classes: number of output logits (the vocabulary size for the language models).
      **kwargs: module attributes (e.g. ``hidden=(64,)`` for the MLP, ``width=32`` for a
        ResNet, ``dtype=jnp.bfloat16``).

    Returns:
      A :class:`Model`.

    Raises:
      ValueError: if ``name`` is unknown (the message lists the known names).
    """
    shape = _MLP_SHAPE.match(str(name))
    if shape:
        width, depth = int(shape.group(1)), int(shape.group(2))
        return Model(
            module=MLP(num_classes=num_classes, hidden=(width,) * depth, **kwargs), name=name
        )
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model name {name!r}; known names: {', '.join(model_names())}"
        ) from None
    return Model(module=factory(num_classes=num_classes, **kwargs), name=name)

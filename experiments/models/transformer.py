"""A small decoder-only transformer language model (byte-level by default).

Tokens ``(N, T)`` (int) -> logits ``(N, T, num_classes)`` over the next token at every
position. The GPT-2 layout (Radford et al., 2019): token embedding plus position embedding,
``num_layers`` pre-LayerNorm residual blocks of causal multi-head self-attention and a GELU
MLP (Vaswani et al., 2017), a final LayerNorm and an output projection, tied to the token
embedding by default (Press & Wolf, 2017).

References:
  A. Vaswani et al., "Attention is all you need", NeurIPS 2017, arXiv:1706.03762.
  A. Radford et al., "Language models are unsupervised multitask learners", OpenAI, 2019.
  O. Press, L. Wolf, "Using the output embedding to improve language models", EACL 2017,
  arXiv:1608.05859.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CausalSelfAttention", "TransformerLM", "sinusoidal_positions"]

POSITIONS = ("learned", "sinusoidal")
_EMBED_INIT = nn.initializers.normal(stddev=0.02)  # GPT-2's embedding initialisation


def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
    """The fixed position encoding of Vaswani et al. (2017), float32 ``(length, d_model)``.

    Column ``2i`` is ``sin(t / 10000^(2i/d))`` and column ``2i + 1`` is ``cos`` of the same
    angle (an odd ``d_model`` drops the last cosine).
    """
    t = np.arange(length, dtype=np.float64)[:, None]
    rates = 10000.0 ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    angles = t * rates
    table = np.zeros((length, d_model), np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)[:, : d_model // 2]
    return table.astype(np.float32)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``t`` attends to positions ``<= t``.

    Attributes:
      num_heads: attention heads; they split ``x``'s last dimension evenly.
      dropout_rate: dropout on the attention weights in train mode.
      dtype, param_dtype: computation and parameter dtypes (softmax in float32).
    """

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``(N, T, D) -> (N, T, D)``."""
        *batch, length, d_model = x.shape
        head_dim = d_model // self.num_heads
        # Plain Dense layers (rank-2 kernels, rank-1 biases), so rank-based L2 terms and
        # weight-decay masks treat them like every other layer.
        dense = lambda name: nn.Dense(
            d_model, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        heads = lambda h: h.reshape(*batch, length, self.num_heads, head_dim)
        q, k, v = (heads(dense(name)(x)) for name in ("query", "key", "value"))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        if self.dropout_rate > 0.0:
            weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
        out = jnp.einsum("nhqk,nkhd->nqhd", weights, v)
        return dense("out")(out.reshape(*batch, length, d_model))


class _Block(nn.Module):
    """Pre-LayerNorm residual block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        drop = lambda h: (
            nn.Dropout(self.dropout_rate, deterministic=not train)(h)
            if self.dropout_rate > 0.0
            else h
        )
        h = nn.LayerNorm(name="ln_attention", **kw)(x)
        h = CausalSelfAttention(self.num_heads, self.dropout_rate, name="attention", **kw)(h, train)
        x = x + drop(h)
        h = nn.LayerNorm(name="ln_mlp", **kw)(x)
        h = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in", **kw)(h))
        return x + drop(nn.Dense(x.shape[-1], name="mlp_out", **kw)(h))


class TransformerLM(nn.Module):
    """Decoder-only transformer: next-token logits at every position of a token sequence.

    Attributes:
      num_classes: vocabulary size, of the input tokens and of the output logits (256 for
        bytes).
      d_model: width of the residual stream; a multiple of ``num_heads``.
      num_heads: attention heads per layer.
      num_layers: residual blocks.
      mlp_dim: hidden width of each block's MLP (``0``: ``4 * d_model``).
      context: the longest sequence; ``0`` means the length of the sequences the model is
        initialised with (every later call then needs sequences of at most that length).
      positions: ``"learned"`` (a trained ``(context, d_model)`` table, GPT-2) or
        ``"sinusoidal"`` (fixed, Vaswani et al.).
      tie_embeddings: the output projection is the transposed token embedding (no separate
        head); ``False`` adds a bias-free ``d_model x num_classes`` head.
      dropout_rate: dropout on embeddings, attention weights and residual branches in train
        mode (needs a ``'dropout'`` rng when positive); 0 disables it.
      dtype: computation dtype (``None``: float32 from the parameters).
      param_dtype: parameter dtype (float32 by default).

    Example (``jax.eval_shape`` gives the shapes of ``model.init(key, tokens)`` and
    ``model.apply(variables, tokens)`` without computing them):
      >>> import jax, jax.numpy as jnp
      >>> model = TransformerLM(num_classes=256, d_model=16, num_heads=2, num_layers=1)
      >>> tokens = jnp.zeros((2, 8), jnp.int32)
      >>> variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
      >>> variables["params"]["position_embedding"].shape  # context: the init's length
      (8, 16)
      >>> jax.eval_shape(model.apply, variables, tokens).shape
      (2, 8, 256)
    """

    num_classes: int
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    mlp_dim: int = 0
    context: int = 0
    positions: str = "learned"
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        for name in ("num_classes", "d_model", "num_heads", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})."
            )
        for name in ("mlp_dim", "context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: the default), got {value!r}.")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, T, num_classes)`` for integer tokens ``(N, T)``; ``T <= context``."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (N, T), got {tokens.shape}.")
        length = tokens.shape[1]
        context = self.context or length
        if length > context:
            raise ValueError(f"sequences of length {length} exceed context={context}.")
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        embed = nn.Embed(
            self.num_classes, self.d_model, embedding_init=_EMBED_INIT, name="embed", **kw
        )
        x = embed(tokens.astype(jnp.int32))
        if self.positions == "learned":
            table = self.param(
                "position_embedding", _EMBED_INIT, (context, self.d_model), self.param_dtype
            )
        else:
            table = jnp.asarray(sinusoidal_positions(context, self.d_model))
        x = x + table[:length].astype(x.dtype)
        if self.dropout_rate > 0.0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        for i in range(self.num_layers):
            x = _Block(
                self.num_heads,
                self.mlp_dim or 4 * self.d_model,
                self.dropout_rate,
                self.dtype,
                self.param_dtype,
                name=f"block_{i}",
            )(x, train)
        x = nn.LayerNorm(name="ln_final", **kw)(x)
        if self.tie_embeddings:
            return embed.attend(x)
        return nn.Dense(self.num_classes, use_bias=False, name="head", **kw)(x)

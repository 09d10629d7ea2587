"""Tests for experiments.models.transformer and the sequence evaluators (perplexity).

The model is checked against an independent float64 NumPy restatement of its equations
(loops over positions for the causal attention), for causality, its options and bad
arguments; the evaluators against hand-computed cross-entropies of fixed distributions.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import LANGUAGE_MODELS, TransformerLM, make_model, param_count
from experiments.models.transformer import sinusoidal_positions
from experiments.train.losses import make_evaluator, make_stacked_evaluator

CONTEXT = 16


def _tiny():
    """The tiny registered model with random parameters of the init's shapes.

    Random LayerNorm scales and biases (not init's ones and zeros) make the reference
    check cover every parameter; ``eval_shape`` avoids compiling the initialiser.
    """
    model = make_model("transformer_lm_tiny", num_classes=256, context=CONTEXT)
    tokens = jax.ShapeDtypeStruct((1, CONTEXT), jnp.int32)
    shapes, state = jax.eval_shape(model.init, jax.random.key(0), tokens)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    return model, params, state


def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _gelu(x):  # flax's default, the tanh approximation
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _reference_logits(params, tokens, num_heads):
    """The GPT-2 forward pass in float64, attention written as a loop over positions."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    embedding = p["embed"]["embedding"]
    x = embedding[tokens] + p["position_embedding"][: tokens.shape[1]]
    for i in range(sum(k.startswith("block_") for k in p)):
        b = p[f"block_{i}"]
        h = _layer_norm(x, b["ln_attention"])
        q, k, v = (_dense(h, b["attention"][n]) for n in ("query", "key", "value"))
        n, length, d = q.shape
        hd = d // num_heads
        out = np.zeros_like(q)
        for e in range(n):
            for head in range(num_heads):
                cols = slice(head * hd, (head + 1) * hd)
                for t in range(length):
                    scores = k[e, : t + 1, cols] @ q[e, t, cols] / math.sqrt(hd)
                    w = np.exp(scores - scores.max())
                    out[e, t, cols] = (w / w.sum()) @ v[e, : t + 1, cols]
        x = x + _dense(out, b["attention"]["out"])
        h = _gelu(_dense(_layer_norm(x, b["ln_mlp"]), b["mlp_in"]))
        x = x + _dense(h, b["mlp_out"])
    return _layer_norm(x, p["ln_final"]) @ embedding.T  # tied output embedding


def test_forward_matches_float64_reference_and_is_causal():
    model, params, state = _tiny()
    assert isinstance(model.module, TransformerLM)
    assert model.name in LANGUAGE_MODELS
    embeddings = 256 * 16 + CONTEXT * 16  # tokens (also the output), positions
    block = 4 * (16 * 16 + 16) + (16 * 64 + 64) + (64 * 16 + 16) + 2 * (2 * 16)
    assert param_count(params) == embeddings + block + 2 * 16  # and the final LayerNorm
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, CONTEXT)).astype(np.int32)
    changed = tokens.copy()
    t = 9
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 256  # every later token differs
    apply = jax.jit(lambda p, x: model.apply(p, state, x, train=False)[0])
    logits, logits_changed = np.asarray(apply(params, np.concatenate([tokens, changed])))[
        np.array([[0, 1], [2, 3]])
    ]
    assert logits.shape == (2, CONTEXT, 256)
    np.testing.assert_allclose(
        logits, _reference_logits(params, tokens, num_heads=2), rtol=2e-4, atol=2e-5
    )
    # Causal: the logits at positions <= t ignore the tokens after t; later ones do not.
    np.testing.assert_allclose(logits_changed[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
    assert np.abs(logits_changed[:, t + 1 :] - logits[:, t + 1 :]).max(axis=-1).min() > 1e-3


def test_options_positions_head_and_bad_arguments():
    t = np.arange(5, dtype=np.float64)[:, None]
    table = sinusoidal_positions(5, 6)
    for i in range(3):
        angle = t[:, 0] / 10000 ** (2 * i / 6)
        np.testing.assert_allclose(table[:, 2 * i], np.sin(angle), atol=1e-6)
        np.testing.assert_allclose(table[:, 2 * i + 1], np.cos(angle), atol=1e-6)

    key = jax.random.key(0)
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    untied = TransformerLM(
        num_classes=11,
        d_model=8,
        num_heads=2,
        num_layers=3,
        positions="sinusoidal",
        tie_embeddings=False,
    )
    shapes = jax.eval_shape(untied.init, key, tokens)["params"]
    assert "position_embedding" not in shapes
    assert shapes["head"]["kernel"].shape == (8, 11)
    assert sum(k.startswith("block_") for k in shapes) == 3
    assert jax.eval_shape(untied.apply, {"params": shapes}, tokens).shape == (2, 8, 11)
    dropout = make_model("transformer_lm_tiny", num_classes=256, dropout_rate=0.1)
    params, state = jax.eval_shape(dropout.init, key, tokens)
    train = functools.partial(dropout.apply, train=True, rng=key)  # dropout needs the rng
    assert jax.eval_shape(train, params, state, tokens)[0].shape == (2, 8, 256)

    with pytest.raises(ValueError, match="multiple of num_heads"):
        TransformerLM(num_classes=256, d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="positions must be one of"):
        TransformerLM(num_classes=256, positions="rotary")
    with pytest.raises(ValueError, match="num_layers must be an integer >= 1"):
        TransformerLM(num_classes=256, num_layers=0)
    with pytest.raises(ValueError, match="dropout_rate"):
        TransformerLM(num_classes=256, dropout_rate=1.0)
    with pytest.raises(ValueError, match="exceed context=4"):
        jax.eval_shape(TransformerLM(num_classes=256, context=4).init, key, tokens)


class _FixedDistribution:
    """A stand-in model: the same next-token distribution at every position."""

    probs = np.array([0.5, 0.25, 0.125, 0.125])

    def apply(self, params, state, x, *, train):
        del params, train
        logits = jnp.log(jnp.asarray(self.probs, jnp.float32))
        return jnp.broadcast_to(logits, (*x.shape, 4)), state


def test_sequence_evaluators_report_perplexity_and_bits():
    # 3 sequences of 2 tokens: labels 0, 1, 2 and 3 cost 1, 2, 3 and 3 bits.
    y = np.array([[0, 1], [0, 0], [3, 2]], np.int32)
    x = np.zeros_like(y)
    bits = np.mean([1, 2, 1, 1, 3, 3])  # 11 / 6
    expected = {
        "loss": bits * math.log(2),
        "accuracy": 3 / 6,  # argmax is token 0
        "perplexity": 2.0**bits,
        "bits_per_token": bits,
    }
    model = _FixedDistribution()
    # Batches of 2 sequences: the last batch is padded and must be masked out.
    plain = make_evaluator(model, x, y, batch_size=2)(None, {})
    stacked = make_stacked_evaluator(model, x, y, batch_size=2)(jnp.zeros((1,)), {})
    assert plain == pytest.approx(expected, rel=1e-6)
    assert {k: float(v[0]) for k, v in stacked.items()} == pytest.approx(expected, rel=1e-6)
    # Classification labels keep their two metrics.
    assert set(make_evaluator(model, x[:, 0], y[:, 0], batch_size=2)(None, {})) == {
        "loss",
        "accuracy",
    }

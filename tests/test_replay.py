"""experiments.train.replay: the replay equals the first pass bitwise, and its measurements
equal path geometry recomputed by a plain loop over the same steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.train.plans import EpochPlan, WorkerPlan
from experiments.train.replay import train_and_replay
from experiments.train.vectorized import train_group

SEEDS = (0, 3)
LRS = (0.5, 0.2)
STEPS = 10  # three epochs of three batches, and one step more


def _loss_fn(params, model_state, batch, rng):
    del rng
    logits = batch["x"] @ params["w"] + params["b"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, (model_state, {})


def _init_fn(key):
    return {"w": 0.5 * jax.random.normal(key, (5, 3)), "b": jnp.zeros(3)}, {}


def _make_tx(hp, axis_name):
    del axis_name
    return optax.sgd(hp["learning_rate"], momentum=0.9)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)
    return x, y


def _geometry(g, w, w_star):
    """The paper's quantities on flat float64 vectors."""
    d = w - w_star
    inner, gn, dn = g @ d, np.linalg.norm(g), np.linalg.norm(d)
    return {
        "rsi": inner / dn**2,
        "eb": gn / dn,
        "cosine": inner / (gn * dn),
        "optimal_lr": inner / gn**2,
    }


def _flat(tree):
    return np.concatenate(
        [np.asarray(tree["b"], np.float64), np.asarray(tree["w"], np.float64).ravel()]
    )


def test_replay_is_bitwise_and_measures_the_trained_path():
    x, y = _data()
    plan = EpochPlan(len(x), 16)
    measure = (x[:8], y[:8])
    out = train_and_replay(
        loss_fn=_loss_fn,
        make_tx=_make_tx,
        init_fn=_init_fn,
        x=x,
        y=y,
        plan=plan,
        seeds=SEEDS,
        steps=STEPS,
        hparams={"learning_rate": LRS},
        measure_batch=measure,
    )
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(out.replay_params), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert out.gradient["cosine"].shape == (len(SEEDS), STEPS)

    # An independent loop: plain optax, one run at a time, the plan's batches.
    grad = jax.grad(lambda p, b: _loss_fn(p, {}, b, None)[0])

    @jax.jit
    def reference_step(params, opt_state, batch, lr):
        g = grad(params, batch)
        u, opt_state = optax.sgd(lr, momentum=0.9).update(g, opt_state, params)
        g_m = grad(params, {"x": measure[0], "y": measure[1]})
        return optax.apply_updates(params, u), opt_state, g, u, g_m

    for r, (seed, lr) in enumerate(zip(SEEDS, LRS, strict=True)):
        params, _ = _init_fn(jax.random.key(seed))
        opt_state = optax.sgd(lr, momentum=0.9).init(params)
        path = []
        for t in range(STEPS):
            i = plan.indices(seed, [t])["idx"][0, 0]
            new, opt_state, g, u, g_m = reference_step(
                params, opt_state, {"x": x[i], "y": y[i]}, lr
            )
            path.append((_flat(params), _flat(g), -_flat(u), _flat(g_m)))
            params = new
        w_star = _flat(params)
        np.testing.assert_allclose(
            _flat(jax.tree.map(lambda a, r=r: a[r], out.params)), w_star, rtol=1e-5, atol=1e-6
        )
        for t, (w, g, minus_u, g_m) in enumerate(path):
            for measured, direction in (
                (out.gradient, g),
                (out.update, minus_u),
                (out.measure, g_m),
            ):
                expected = _geometry(direction, w, w_star)
                got = [measured[k][r, t] for k in expected]
                np.testing.assert_allclose(got, list(expected.values()), rtol=2e-4, atol=1e-6)
        # SGD with momentum: the update is not the gradient direction.
        assert not np.allclose(out.update["cosine"][r], out.gradient["cosine"][r])
        # The measurements are taken before each step: at t = 0, w_0 is the init.
        np.testing.assert_allclose(
            out.gradient["distance"][r, 0], np.linalg.norm(path[0][0] - w_star), rtol=1e-5
        )

    # The replayed runs are the study runner's runs (its chunked program: same seeds,
    # batches and keys; equal up to rounding, as a different compilation).
    group = train_group(
        loss_fn=_loss_fn,
        make_tx=_make_tx,
        init_fn=_init_fn,
        x=x,
        y=y,
        plan=plan,
        seeds=SEEDS,
        hparams={"learning_rate": LRS},
        steps=STEPS,
        run_dir=None,
        log_every=5,
    )
    for a, b in zip(jax.tree.leaves(group.state.params), jax.tree.leaves(out.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise():
    x, y = _data()
    common = {"loss_fn": _loss_fn, "make_tx": _make_tx, "init_fn": _init_fn, "x": x, "y": y}
    with pytest.raises(ValueError, match="seeds must name at least one run"):
        train_and_replay(**common, plan=EpochPlan(48, 16), seeds=(), steps=2)
    plan = WorkerPlan([np.arange(24), np.arange(24, 48)], 8)
    with pytest.raises(ValueError, match="plan without workers"):
        train_and_replay(**common, plan=plan, seeds=(0,), steps=2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_and_replay(**common, plan=EpochPlan(48, 16), seeds=(0,), steps=0)
    with pytest.raises(ValueError, match="has 1 values for 2 runs"):
        train_and_replay(
            **common,
            plan=EpochPlan(48, 16),
            seeds=(0, 1),
            steps=2,
            hparams={"learning_rate": [0.1]},
        )

"""The `dsgd` and `gradalign` runners: their wiring against plain loops, their probes
against direct computations, and their bad arguments. (The smoke variants run end to end
in ``tests/test_experiments.py``.)"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optlab
from experiments import study as st
from experiments.configs import dsgd as dsgd_config
from experiments.configs import gradalign as gradalign_config
from experiments.runners import dsgd, gradalign
from experiments.train.plans import WorkerPlan
from experiments.train.vectorized import train_group

N, D, C, W, B = 64, 5, 3, 4, 4


def _problem():
    rs = np.random.default_rng(0)
    x = rs.normal(size=(N, D)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    parts = np.array_split(rs.permutation(N), W)
    return x, y, parts


def _ce(params, xb, yb):  # softmax regression
    logits = xb @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()


def _init(key):
    return {"w": 0.3 * jax.random.normal(key, (D, C)), "b": jnp.zeros((C,))}, {}


def _loss(params, model_state, batch, rng):
    del rng
    return _ce(params, batch["x"], batch["y"]), (model_state, {})


def _runner_tx(spec, task, hparams, axis_name):
    del hparams
    return dsgd.make_tx(spec, st.TxContext(task, task.steps, axis_name, C, B))


def test_dsgd_runner_trains_as_the_paper_loop_and_probes_every_worker():
    """The runner's D-SGD (ring) and C-SGD, trained by the harness in worker mode, against
    a float64 loop of x_i <- sum_j W_ij x_j - lr_t g_i(x_i) with the hand-computed
    schedule (linear scaling, warm-up, x0.1 step); the consensus probe sees every worker's
    params and equals the RMS distance from their mean computed here."""
    x, y, parts = _problem()
    steps, lr = 4, 0.05
    spec = {
        "learning_rate": lr,
        "base_batch_size": 8,
        "warmup_fraction": 0.5,  # 2 warm-up steps
        "decay_fractions": (0.75,),  # x0.1 from step 3
    }
    task = st.Task("t", "digits", "mlp", batch_size=B, steps=steps, workers=W)
    plan = WorkerPlan(parts, B)
    probe = dsgd.consensus_probe(None, None)["consensus"]  # type: ignore[arg-type]
    peak = lr * W * B / 8
    rates = [0.0, peak / 2, peak, peak / 10]
    idx = plan.indices(0, range(steps))["idx"][:, :, 0]  # [steps, W, B]
    mixing = {
        "centralized": np.full((W, W), 1.0 / W),
        "decentralized": np.asarray(optlab.mixing_matrix("ring", W)),
    }
    init, grad = (
        jax.jit(_init),
        jax.jit(jax.grad(_ce)),
    )  # one compile each (eager ops compile per op)
    for communication in ("centralized", "decentralized"):
        method = {**spec, "communication": communication, "topology": "ring"}
        result = train_group(
            loss_fn=_loss,
            make_tx=functools.partial(_runner_tx, method, task),
            init_fn=init,
            x=x,
            y=y,
            plan=plan,
            seeds=[0],
            steps=steps,
            run_dir=None,
            evaluate=lambda p, s: {},
            evaluate_workers=lambda p, s: {"consensus_distance": probe(p, s)["distance"]},
            log_every=2,
        )
        # The reference: plain float64 loop over the workers.
        p0 = {k: np.asarray(v, np.float64) for k, v in init(jax.random.key(0))[0].items()}
        xs = [dict(p0) for _ in range(W)]
        for t in range(steps):
            g = [
                {
                    k: np.asarray(v, np.float64)
                    for k, v in grad(xs[i], x[idx[t, i]], y[idx[t, i]]).items()
                }
                for i in range(W)
            ]
            if communication == "centralized":  # C-SGD: everyone applies the mean gradient
                g = [{k: np.mean([gi[k] for gi in g], axis=0) for k in p0}] * W
            xs = [
                {
                    k: sum(mixing[communication][i, j] * xs[j][k] for j in range(W))
                    - rates[t] * g[i][k]
                    for k in p0
                }
                for i in range(W)
            ]
        got = jax.tree.map(lambda a: np.asarray(a[0], np.float64), result.state.params)
        for k in p0:
            np.testing.assert_allclose(got[k], np.stack([xi[k] for xi in xs]), atol=2e-5)
        mean = {k: np.mean([xi[k] for xi in xs], 0) for k in p0}
        distance = np.sqrt(np.mean([sum(np.sum((xi[k] - mean[k]) ** 2) for k in p0) for xi in xs]))
        assert result.final["consensus_distance"][0] == pytest.approx(distance, rel=1e-3, abs=1e-6)
        assert (distance > 1e-3) == (communication == "decentralized")


def test_gradient_variance_probe_matches_a_loop_over_workers_and_batches():
    """grad_variance_normalized = sum_k mean_i ||g_ik - gbar_k||^2 / sum_k ||gbar_k||^2."""
    from experiments.models import make_model

    x, y, parts = _problem()
    model = make_model("mlp", num_classes=C, hidden=(4,))
    params, state = jax.jit(model.init)(jax.random.key(1), x[:1])
    xb = np.stack([x[p[:6]].reshape(2, 3, D) for p in parts])  # [W, K=2, 3, D]
    yb = np.stack([y[p[:6]].reshape(2, 3) for p in parts])
    stack = lambda tree: jax.tree.map(lambda a: np.asarray(a)[None], tree)  # one run
    out = jax.jit(gradalign.gradient_variance_fn(model, xb, yb))(stack(params), stack(state))

    @jax.jit
    def grad(xk, yk):  # one worker's gradient on one batch, one call at a time
        def loss(p):
            logits, _ = model.apply(p, state, xk, train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yk).mean()

        return jax.grad(loss)(params)

    def flat_grad(xk, yk):
        g = grad(xk, yk)
        return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(g)])

    dev, norm = [], []
    for k in range(2):
        g = np.stack([flat_grad(xb[i, k], yb[i, k]) for i in range(W)])
        gbar = g.mean(0)
        dev.append(np.mean(np.sum((g - gbar) ** 2, axis=1)))
        norm.append(np.sum(gbar**2))
    assert float(out["variance"][0]) == pytest.approx(np.mean(dev), rel=1e-4)
    assert float(out["variance_normalized"][0]) == pytest.approx(sum(dev) / sum(norm), rel=1e-4)


def _raises(message):
    return pytest.raises(ValueError, match=re.escape(message))


def test_bad_arguments_name_the_field():
    config = dsgd_config.get_config("smoke")
    config.tasks.b256.workers = 0
    with _raises("tasks.b256.workers must be >= 2"):
        dsgd.validate(config)
    config = dsgd_config.get_config("smoke")
    config.methods.dsgd_ring.topology = "star"
    with _raises("methods.dsgd_ring.topology must be one of"):
        dsgd.validate(config)
    config = dsgd_config.get_config("smoke")
    config.tasks.b256.workers = 2  # a ring needs 3 workers
    with _raises("methods.dsgd_ring on tasks.b256"):
        dsgd.validate(config)
    task = st.Task("t", "digits", "mlp", batch_size=B, steps=10, workers=W)
    spec = dict(dsgd_config.get_config("smoke").methods.dsgd_ring)
    with _raises("D-SGD gossips over one named worker axis"):
        dsgd.make_tx(spec, st.TxContext(task, 10, ("workers", "local"), C, B))
    config = gradalign_config.get_config("smoke")
    config.methods.gradalign.axes.beta = (-0.1,)
    with _raises("methods.gradalign.beta must be a float >= 0"):
        gradalign.validate(config)
    config = gradalign_config.get_config("smoke")
    config.gradient_variance.num_batches = 0
    with _raises("gradient_variance.num_batches must be >= 1"):
        gradalign.validate(config)
    x, y, parts = _problem()
    data = st.TaskData(task, None, x[:1], y[:1], tuple(parts), 10, B)  # type: ignore[arg-type]
    config.gradient_variance.num_batches = 5
    evaluators = gradalign.variance_evaluator(config)
    with _raises("exceeds worker 0's partition"):
        evaluators(data, None)

"""Vectorized runs: a group equals its runs trained alone; worker mode; plans; resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optlab
from experiments.train import init_train_state, make_train_step
from experiments.train.losses import make_stacked_evaluator
from experiments.train.plans import (
    ClientSamplingPlan,
    EpochBatchPlan,
    EpochPlan,
    GrowingBatchPlan,
    TaskStreamPlan,
    WorkerPlan,
)
from experiments.train.vectorized import WORKER_AXIS, train_group

N, D, C = 96, 6, 3


def _data():
    rs = np.random.default_rng(0)
    x = rs.normal(size=(N, D)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)
    return x, y


def _init(key):
    k1, k2 = jax.random.split(key)
    params = {
        "w1": 0.5 * jax.random.normal(k1, (D, 8)),
        "b1": jnp.zeros((8,)),
        "w2": 0.5 * jax.random.normal(k2, (8, C)),
    }
    return params, {"mean_x": jnp.zeros((D,))}


def _loss(params, model_state, batch, rng):
    del rng
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    logits = h @ params["w2"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    new_state = {"mean_x": 0.9 * model_state["mean_x"] + 0.1 * batch["x"].mean(0)}
    return loss, (new_state, {"accuracy": acc})


def _sgd(hp, axis_name):
    del axis_name
    return optax.sgd(hp["lr"], momentum=0.9)


def _group(seeds, lrs, *, steps=12, plan=None, make_tx=_sgd, devices=1, **kw):
    x, y = _data()
    return train_group(
        loss_fn=_loss,
        make_tx=make_tx,
        init_fn=_init,
        x=x,
        y=y,
        plan=plan or EpochPlan(N, 16),
        seeds=seeds,
        hparams={"lr": lrs},
        steps=steps,
        run_dir=kw.pop("run_dir", None),
        log_every=kw.pop("log_every", 4),
        devices=devices,
        **kw,
    )


def _run(result, r):
    return jax.tree.map(lambda a: np.asarray(a[r]), result.state.params)


def test_group_equals_each_run_alone():
    together = _group([0, 1, 2], [0.1, 0.05, 0.2])
    for r, (seed, lr) in enumerate([(0, 0.1), (1, 0.05), (2, 0.2)]):
        alone = _group([seed], [lr])
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            _run(together, r),
            _run(alone, 0),
        )


def test_group_equals_the_classic_single_run_step():
    """Same batches and arithmetic as ``make_train_step`` fed by ``BatchIterator``."""
    from experiments.data import BatchIterator

    x, y = _data()
    result = _group([3], [0.1], steps=10)
    tx = optax.sgd(0.1, momentum=0.9)
    params, model_state = _init(jax.random.key(3))
    compiled = make_train_step(_loss, tx)
    state = compiled.put_state(init_train_state(params, model_state, tx, jax.random.key(3)))
    it = BatchIterator(x, y, 16, seed=3)
    for t in range(10):
        state, _ = compiled.step(state, compiled.put_batch(it.batch_at(t)))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        _run(result, 0),
        jax.tree.map(np.asarray, state.params),
    )


def test_divergence_is_tracked_per_run():
    result = _group([0, 1], [0.1, float("inf")], steps=8)  # run 1 blows up
    assert result.diverged_at[0] == -1
    assert 0 <= result.diverged_at[1] < 8
    assert np.all(np.isfinite(_run(result, 0)["w1"]))


def test_resume_is_bitwise(tmp_path):
    full = _group([0, 1], [0.1, 0.05], steps=12, run_dir=str(tmp_path / "a"))
    _group([0, 1], [0.1, 0.05], steps=8, run_dir=str(tmp_path / "b"))  # "interrupted" at 8
    resumed = _group([0, 1], [0.1, 0.05], steps=12, run_dir=str(tmp_path / "b"))
    assert resumed.start_step == 8
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        full.state,
        resumed.state,
    )


def test_stacked_evaluator_and_final_metrics():
    x, y = _data()

    class Model:
        @staticmethod
        def apply(params, model_state, xb, train):
            del model_state, train
            return jnp.tanh(xb @ params["w1"] + params["b1"]) @ params["w2"], {}

    stacked = make_stacked_evaluator(Model(), x, y, batch_size=40)  # 3 batches, one padded
    evaluate = jax.jit(lambda p, s: {f"train_{k}": v for k, v in stacked(p, s).items()})
    result = _group([0, 1], [0.1, 0.05], evaluate=evaluate)
    for r in range(2):
        logits = np.tanh(x @ _run(result, r)["w1"] + _run(result, r)["b1"]) @ _run(result, r)["w2"]
        acc = np.mean(logits.argmax(-1) == y)
        np.testing.assert_allclose(result.final["train_accuracy"][r], acc)
    assert result.final["train_loss"].shape == (2,)


# --- worker-local training ---------------------------------------------------------------


def _worker_plan(workers=4, batch=8):
    parts = np.array_split(np.random.default_rng(1).permutation(N), workers)
    return WorkerPlan(parts, batch)


def _mean_sgd(hp, axis_name):
    return optax.chain(optlab.mean_gradients(axis_name), optax.sgd(hp["lr"], momentum=0.9))


def test_worker_mode_with_mean_gradients_equals_data_parallel():
    """W workers of batch b averaging gradients == one model on their concatenated batch."""
    plan = _worker_plan(4, 8)
    workers = _group([0], [0.1], plan=plan, make_tx=_mean_sgd, steps=6)

    class Concatenated:  # the same examples as one batch of 32 per step
        workers, max_micro, micro_batch = 0, 1, 32

        def indices(self, seed, steps):
            idx = plan.indices(seed, steps)["idx"]  # [S, W, 1, b]
            return {"idx": idx.reshape(len(steps), 1, -1), "n_micro": np.ones(len(steps), np.int32)}

    replicated = _group([0], [0.1], plan=Concatenated(), steps=6)
    per_worker = jax.tree.map(lambda a: np.asarray(a[0]), workers.state.params)
    for w in range(4):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a[w], b, rtol=1e-5, atol=1e-6),
            per_worker,
            _run(replicated, 0),
        )


def test_worker_mode_without_averaging_diverges_between_workers():
    result = _group([0], [0.1], plan=_worker_plan(), steps=6)
    w1 = np.asarray(result.state.params["w1"][0])
    assert not np.allclose(w1[0], w1[1])


def test_sam_in_worker_mode_perturbs_per_worker():
    """optlab.sam(axis_name=workers): each worker's ascent point uses its own gradient."""

    def make(hp, axis_name):
        return optlab.sam(optax.sgd(hp["lr"]), rho=0.05, axis_name=axis_name)

    plan = _worker_plan(4, 8)
    result = _group([0], [0.1], plan=plan, make_tx=make, steps=3, log_every=1)
    # Reference: by hand, per-worker ascent then the mean of the perturbed gradients.
    x, y = _data()
    params, model_state = _init(jax.random.key(0))
    grad = jax.grad(lambda p, b: _loss(p, model_state, b, None)[0])
    for t in range(3):
        idx = plan.indices(0, [t])["idx"][0, :, 0]
        gs = []
        for w in range(4):
            b = {"x": x[idx[w]], "y": y[idx[w]]}
            g = grad(params, b)
            norm = optax.global_norm(g)
            point = jax.tree.map(lambda p, gi: p + 0.05 * gi / norm, params, g)
            gs.append(grad(point, b))
        mean = jax.tree.map(lambda *a: sum(a) / 4, *gs)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, mean)
    got = jax.tree.map(lambda a: np.asarray(a[0, 0]), result.state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, params)


@pytest.mark.parametrize(("workers", "devices"), [(8, 8), (8, 4)])
def test_worker_vmap_equals_shard_map(workers, devices):
    plan = _worker_plan(workers, 8)
    sim = _group([0, 1], [0.1, 0.05], plan=plan, make_tx=_mean_sgd, steps=4)
    dev = _group([0, 1], [0.1, 0.05], plan=plan, make_tx=_mean_sgd, steps=4, devices=devices)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
        sim.state.params,
        dev.state.params,
    )


def test_replicated_data_parallel_over_devices_equals_one_device():
    one = _group([0, 1], [0.1, 0.05], steps=6)
    four = _group([0, 1], [0.1, 0.05], steps=6, devices=4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
        one.state.params,
        four.state.params,
    )


# --- the trainer hook: batch plans ---------------------------------------------------------


def test_growing_batch_accumulates_micro_batches_without_recompiling():
    """Step t averages n(t) micro-batch gradients; sizes change, the program does not."""
    schedule = lambda t: 1 + (t // 3)  # 1, 1, 1, 2, 2, 2, 3
    plan = GrowingBatchPlan(N, 8, 3, schedule)
    result = _group(
        [0], [0.1], plan=plan, make_tx=lambda hp, a: optax.sgd(hp["lr"]), steps=7, log_every=7
    )
    x, y = _data()
    params, model_state = _init(jax.random.key(0))
    grad = jax.grad(lambda p, b: _loss(p, model_state, b, None)[0])
    for t in range(7):
        out = plan.indices(0, [t])
        n = int(out["n_micro"][0])
        gs = [grad(params, {"x": x[i], "y": y[i]}) for i in out["idx"][0, :n]]
        params = jax.tree.map(lambda p, *g: p - 0.1 * sum(g) / n, params, *gs)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        _run(result, 0),
        params,
    )


def test_task_stream_trains_each_task_on_its_own_block():
    blocks = [np.arange(0, 48), np.arange(48, 96)]
    plan = TaskStreamPlan(blocks, steps_per_task=5, batch_size=8)
    idx = plan.indices(0, range(10))["idx"][:, 0]
    assert np.all(idx[:5] < 48)
    assert np.all(idx[5:] >= 48)
    assert plan.task_at(12) == 1
    _group([0], [0.1], plan=plan, steps=10, log_every=5)  # runs through the trainer


def test_client_sampling_reaches_the_optimizer():
    """The plan's per-round client mask arrives as the extra argument ``active``."""
    plan = ClientSamplingPlan(_worker_plan(4, 8), per_round=2, round_steps=2)

    def recorder(hp, axis_name):
        del hp, axis_name

        def init(params):
            return {"seen": jnp.zeros((6, 4), jnp.int32), "t": jnp.zeros((), jnp.int32)}

        def update(updates, state, params=None, *, active=None, **extra):
            del params, extra
            assert active is not None
            seen = state["seen"].at[state["t"]].set(active.astype(jnp.int32))
            return jax.tree.map(jnp.zeros_like, updates), {"seen": seen, "t": state["t"] + 1}

        return optax.GradientTransformationExtraArgs(init, update)

    result = _group([5], [0.1], plan=plan, make_tx=recorder, steps=6, log_every=3)
    seen = np.asarray(result.state.opt_state["seen"][0, 0])
    expected = np.stack([plan.active(5, t) for t in range(6)]).astype(np.int32)
    np.testing.assert_array_equal(seen, expected)
    assert (seen.sum(1) == 2).all()
    assert WORKER_AXIS == "workers"


# --- skipping the gradient (PALSGD's pseudo-sync steps) ----------------------------------------


def _palsgd(shared_coin):
    def make(hp, axis_name):
        return optlab.palsgd(
            optax.trace(0.9),
            optax.sgd(0.5, momentum=0.9, nesterov=True),
            sync_period=4,
            axis_name=axis_name,
            learning_rate=hp["lr"],
            prob=0.4,
            warmup_steps=2,
            shared_coin=shared_coin,
        )

    return make


def _dot_cond_depths(jaxpr, depth=0):
    """The number of enclosing ``cond``s of every ``dot_general`` in a jaxpr, recursively."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(depth)
        inner = depth + (eqn.primitive.name == "cond")
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    out += _dot_cond_depths(sub.jaxpr, inner)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    out += _dot_cond_depths(sub, inner)
    return out


def _never(opt_state):
    """Never skips, through the same program as skipping (a constant would be folded)."""
    return optax.tree.get(opt_state, "count") < 0


def test_grad_skip_is_bitwise_and_really_skips(tmp_path):
    """Skipping the forward/backward on pseudo-sync steps (shared coins, one device: every
    run and worker agrees) gives bitwise the params and optimizer state of taking it and
    discarding it; the counters follow an independent replay of the coins; in the traced
    chunk every ``dot_general`` sits under one more ``cond`` than without skipping (a real
    branch, not a select), also for per-worker coins under ``shard_map`` with one worker
    per device (each device's own predicate)."""
    from experiments.train.metrics import MetricsWriter, read_metrics
    from experiments.train.vectorized import _layout, init_group_state

    plan = _worker_plan(4, 8)
    steps, seeds, lrs = 8, [0, 1], [0.1, 0.05]
    kw = {"plan": plan, "make_tx": _palsgd(True), "steps": steps, "log_every": 1}
    path = tmp_path / "m.jsonl"
    writers = [MetricsWriter(path, run=r) for r in range(2)]
    skipping = _group(seeds, lrs, grad_skip=optlab.palsgd_is_pseudo_sync, metrics=writers, **kw)
    taken = _group(seeds, lrs, grad_skip=_never, **kw)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        (taken.state.params, taken.state.opt_state),
        (skipping.state.params, skipping.state.opt_state),
    )
    # Independent replay: step t pseudo-syncs when t > W and uniform(fold_in(key(0), t)) < p.
    key = jax.random.key(0)
    coins = np.array(
        [t > 2 and float(jax.random.uniform(jax.random.fold_in(key, t))) < 0.4 for t in range(8)]
    )
    assert 2 <= coins.sum() < 5
    for r in range(2):
        rows = [x for x in read_metrics(path, run=r) if not x.get("final")]
        ran = np.array([x["train_grad_evals_run"] for x in rows])
        np.testing.assert_array_equal(ran, 1.0 - coins)
        np.testing.assert_array_equal([x["train_grad_evals"] for x in rows], 1.0 - coins)
        # A window without a gradient logs no loss; the others the loss they computed.
        assert [("train_loss" in x) for x in rows] == list(ran > 0)
        assert all(x["train_loss"] > 0 for x in rows if "train_loss" in x)
    # The traced chunk: the forward/backward lives in the skip branch.
    x, y = _data()
    hp = {"lr": jnp.asarray(lrs, jnp.float32)}
    chunk = plan.indices(0, [0])
    for make, devices in ((_palsgd(True), 1), (_palsgd(False), 4)):
        depths = []
        for skip in (None, optlab.palsgd_is_pseudo_sync):
            layout = _layout(_loss, make, plan, devices, False, skip)
            state = init_group_state(
                _init, make, seeds, hp, workers=4, worker_axis=layout.worker_axis
            )
            args = (
                layout.put_state(state),
                x,
                y,
                np.stack([chunk["idx"]] * 2, 1),
                np.stack([chunk["n_micro"]] * 2, 1),
                np.zeros((1, 2, 0), bool),
                np.ones(1, bool),
                hp,
            )
            depths.append(_dot_cond_depths(jax.make_jaxpr(layout.chunk)(*args).jaxpr))
        assert depths[0]
        assert len(depths[0]) == len(depths[1])
        assert min(depths[1]) == min(depths[0]) + 1, devices


def test_epoch_batch_plan_driven_by_the_state_trains_like_a_loop_without_recompiling():
    """Batch sizes decided at epoch ends from the state; finished runs freeze; one compile."""
    traces = []

    def counting_loss(params, model_state, batch, rng):
        traces.append(1)  # runs once per trace, never when the compiled step runs
        return _loss(params, model_state, batch, rng)

    seen_steps, compiles = [], []

    def decide(ended, state, step):
        compiles.append(len(traces))
        steps_done = np.asarray(state.step)
        seen_steps.extend(int(steps_done[r]) for r, _ in ended)
        # Run 0 doubles its batch every epoch, run 1 only after its second epoch.
        return [2 ** (e + 1) if r == 0 else (1 if e == 0 else 2) for r, e in ended]

    plan = EpochBatchPlan(N, 8, 4, 3, decide=decide)
    make_tx = lambda hp, a: optax.chain(optax.sgd(hp["lr"]), optlab.scale_by_batch_size(8))
    x, y = _data()
    result = train_group(
        loss_fn=counting_loss, make_tx=make_tx, init_fn=_init, x=x, y=y, plan=plan,
        seeds=[0, 1], hparams={"lr": [0.05, 0.05]}, steps=36, run_dir=None, log_every=5,
    )  # fmt: skip
    # Run 0: 12 steps of 8, 6 of 16, 3 of 32; run 1: 12 of 8, 12 of 8, 6 of 16.
    assert [[(s, k) for _, s, k in h] for h in plan.history] == [
        [(0, 1), (12, 2), (18, 4)],
        [(0, 1), (12, 1), (24, 2)],
    ]
    assert sorted(seen_steps) == [12, 12, 18, 21, 24, 30]  # each run's own step count
    assert len(set(compiles)) == 1  # no trace after the first chunk, whatever the sizes
    grad = jax.jit(jax.grad(lambda p, ms, b: _loss(p, ms, b, None)[0]))
    for r, seed in enumerate([0, 1]):
        params, model_state = _init(jax.random.key(seed))
        for epoch, _start, k in plan.history[r]:
            order = np.random.default_rng([seed, epoch]).permutation(N)
            for slot in range(N // (8 * k)):
                chosen = order[slot * 8 * k : (slot + 1) * 8 * k].reshape(k, 8)
                gs = [grad(params, model_state, {"x": x[i], "y": y[i]}) for i in chosen]
                lr = 0.05 * k  # linear scaling against the base batch of 8
                params = jax.tree.map(lambda p, *g, lr=lr: p - lr * sum(g) / len(g), params, *gs)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
            _run(result, r),
            params,
        )
    with pytest.raises(ValueError, match="checkpoint_every"):
        _group([0], [0.1], plan=EpochBatchPlan(N, 8, 2, 1), checkpoint_every=4)

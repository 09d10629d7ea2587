"""optlab.dpf / masked_params / sparsity against a loop written from the paper's equations.

The problem: every leaf has the loss 0.5 |m * w - c_t|^2, so the gradient at the pruned
weights is ``m * w - c_t`` (all coordinates: straight-through). The targets ``c_t`` switch
half-way to a new draw whose magnitude ranking differs, so weights pruned early must grow
back (with feedback) to fit the second half.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optlab
from experiments.train.checkpoint import Checkpointer

LR, BETA = 0.2, 0.5
SHAPES = {"b": (3,), "k1": (4, 3), "k2": (3, 2)}  # jax.tree order: b, k1, k2 (sorted keys)
STEPS = 16


def _problem(rng: np.random.Generator):
    w0 = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    first = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    second = {k: 2.0 * rng.normal(size=s) for k, s in SHAPES.items()}
    targets = [first if t < STEPS // 2 else second for t in range(STEPS)]
    return w0, targets


# ----------------------------------------------------------------------------------------
# The reference: a plain loop from ALGORITHMS.md 3.2-3.3 (NumPy, float64), SGD momentum.


def _sparsity_at(k, target, begin, end, schedule):
    if k < begin:
        return 0.0
    if schedule == "constant":
        return target
    frac = (min(max(k, begin), end) - begin) / (end - begin)
    return target * (1.0 - (1.0 - frac) ** 3)


def _top_mask(w, prunable, n, structured):
    """Keep all but the n smallest units over the prunable leaves (one global ranking)."""
    keys = [k for k in sorted(w) if k in prunable]
    if structured:
        scores = [np.sqrt((w[k] ** 2).sum(axis=tuple(range(w[k].ndim - 1)))) for k in keys]
    else:
        scores = [np.abs(w[k]).ravel() for k in keys]
    flat = np.concatenate(scores)
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:n]] = False
    out, offset = {}, 0
    for k, s in zip(keys, scores, strict=True):
        shape = (1,) * (w[k].ndim - 1) + s.shape if structured else w[k].shape
        out[k] = keep[offset : offset + s.size].reshape(shape)
        offset += s.size
    return out, flat.size


def reference_dpf(w0, targets, *, target, begin, end, every, schedule, structured, feedback):
    prunable = ("k1", "k2")
    w = {k: v.copy() for k, v in w0.items()}
    buf = {k: np.zeros_like(v) for k, v in w.items()}
    _, units = _top_mask(w, prunable, 0, structured)

    def mask_at(k):
        s_k = _sparsity_at(k, target, begin, end, schedule)
        n = round(target * units) if k >= end else np.round(s_k * units)
        return _top_mask(w, prunable, int(n), structured)[0]

    mask = mask_at(0) if begin == 0 else {k: np.ones(1, bool) for k in prunable}
    masks, params = [], []
    for t in range(STEPS):
        m = {k: mask.get(k, True) for k in w}
        pruned = {k: m[k] * w[k] for k in w}
        g = {k: pruned[k] - targets[t][k] for k in w}  # at the pruned weights, unmasked
        if not feedback:
            g = {k: m[k] * g[k] for k in w}
        for k in w:
            buf[k] = g[k] + BETA * buf[k]
            w[k] = w[k] - LR * buf[k]
        step = t + 1
        if begin <= step <= end and ((step - begin) % every == 0 or step == end):
            mask = mask_at(step)
        if not feedback:
            w = {k: mask.get(k, True) * w[k] for k in w}
        masks.append({k: np.broadcast_to(mask[k], w[k].shape).copy() for k in prunable})
        params.append({k: v.copy() for k, v in w.items()})
    return masks, params


# ----------------------------------------------------------------------------------------
# optlab, jitted with params and state donated; the gradient of the loss at masked params.


def _loss(params, c):
    return sum(0.5 * jnp.sum((params[k] - c[k]) ** 2) for k in params)


def make_step(tx):
    traces = []

    def step(params, state, c):
        traces.append(1)
        grads = jax.grad(_loss)(optlab.masked_params(state, params), c)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1)), traces


def _dpf_state(state):
    nodes = jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optlab.DPFState))
    return next(s for s in nodes if isinstance(s, optlab.DPFState))


def run_optlab(tx, w0, targets, *, dtype=None):
    step, traces = make_step(tx)
    params = {k: jnp.asarray(v, dtype) for k, v in w0.items()}
    state = jax.jit(tx.init)(params)
    masks, out = [], []
    for t in range(len(targets)):
        c = {k: jnp.asarray(v, dtype) for k, v in targets[t].items()}
        params, state = step(params, state, c)
        mask = _dpf_state(state).mask
        masks.append({k: np.broadcast_to(mask[k], SHAPES[k]) for k in ("k1", "k2")})
        out.append(jax.tree.map(np.asarray, params))
    assert len(traces) == 1  # no recompilation across refresh and frozen steps
    return masks, out, (params, state)


CONFIGS = {
    # end 10 is off the period-3 grid: the last refresh, at step 10, reaches the target.
    "cubic": dict(target=0.75, begin=0, end=10, every=3, schedule="cubic", structured=False),
    # Output channels by L2 norm, pruning from step 2 on at the full target.
    "structured_constant": dict(
        target=0.6, begin=2, end=9, every=4, schedule="constant", structured=True
    ),
}
FEEDBACK = {"cubic": (True, False), "structured_constant": (True,)}
KEYS = ("target", "begin", "end", "every", "schedule", "structured")


def _tx(cfg, feedback=True, inner=None):
    return optlab.dpf(
        inner or optax.sgd(LR, momentum=BETA),
        cfg["target"],
        begin_step=cfg["begin"],
        end_step=cfg["end"],
        mask_every=cfg["every"],
        schedule=cfg["schedule"],
        structured=cfg["structured"],
        feedback=feedback,
    )


def _assert_trajectories(got, ref, rtol=1e-12):
    for (gm, gp), (rm, rp) in zip(zip(*got[:2], strict=True), zip(*ref, strict=True), strict=True):
        for k in rm:
            np.testing.assert_array_equal(gm[k], rm[k])
        for k in rp:
            np.testing.assert_allclose(gp[k], rp[k], rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference_loop_with_and_without_feedback(name, rng, x64):
    cfg = CONFIGS[name]
    w0, targets = _problem(rng)
    kwargs = {k: cfg[k] for k in KEYS}
    for feedback in FEEDBACK[name]:
        ref = reference_dpf(w0, targets, **kwargs, feedback=feedback)
        got = run_optlab(_tx(cfg, feedback), w0, targets)
        _assert_trajectories(got, ref)
        masks = np.array([np.concatenate([m["k1"].ravel(), m["k2"].ravel()]) for m in got[0]])
        # The mask changes only on refresh steps, and is frozen after end_step.
        refresh = [
            cfg["begin"] <= s <= cfg["end"]
            and ((s - cfg["begin"]) % cfg["every"] == 0 or s == cfg["end"])
            for s in range(2, STEPS + 1)
        ]
        changed = np.any(masks[1:] != masks[:-1], axis=1)
        assert not np.any(changed & ~np.array(refresh)), name
        assert not np.any(changed[cfg["end"] - 1 :])
        # A weight pruned at one refresh and kept at a later one: re-activation happens
        # with feedback only (the second half's targets reorder the magnitudes).
        revived = np.any(~masks[:-1] & masks[1:])
        assert revived == feedback, (name, feedback)
        if not cfg["structured"]:  # exactly round(s_f * N) of the 18 kernel weights
            pruned = optlab.sparsity(optlab.masked_params(got[2][1], got[2][0])).prunable
            assert pruned == np.float32(round(cfg["target"] * 18) / 18)
            assert np.sum(~masks[-1]) == round(cfg["target"] * 18)
        else:  # 60% of the 5 output channels
            assert np.sum(~got[0][-1]["k1"][0]) + np.sum(~got[0][-1]["k2"][0]) == 3
        # Straight-through: the dense copies of pruned weights kept moving with feedback
        # (the reference agrees); without, they are zero and stay pruned.
        for k in ("k1", "k2"):
            dense_pruned = got[1][-1][k][~got[0][-1][k]]
            assert np.all(dense_pruned != 0) if feedback else np.all(dense_pruned == 0)


# ----------------------------------------------------------------------------------------
# Composition.


def test_inject_hyperparams_and_multisteps_around_a_chain(rng, x64):
    cfg = CONFIGS["cubic"]
    w0, targets = _problem(rng)
    kwargs = {k: cfg[k] for k in KEYS}
    ref = reference_dpf(w0, targets, **kwargs, feedback=True)

    # inject_hyperparams: a traced target (and traced integers), the same trajectory.
    injected = optax.inject_hyperparams(optlab.dpf)(
        optax.sgd(LR, momentum=BETA),
        target_sparsity=cfg["target"],
        end_step=cfg["end"],
        mask_every=cfg["every"],
    )
    got = run_optlab(injected, w0, targets)
    assert set(got[2][1].hyperparams) == {"target_sparsity", "begin_step", "end_step", "mask_every"}
    _assert_trajectories(got, ref)

    # MultiSteps(every 2) around chain(scale(0.5), dpf(sgd(2 lr))): params and mask stay
    # put within a pair, the two micro-batches' targets are c_t + d and c_t - d, so the
    # accumulated gradient is the one at c_t; halving it and doubling lr is exact.
    offset = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    micro = [
        {k: targets[j // 2][k] + (1 if j % 2 else -1) * offset[k] for k in SHAPES}
        for j in range(2 * STEPS)
    ]
    masks, params, _ = run_optlab(
        optax.MultiSteps(
            optax.chain(optax.scale(0.5), _tx(cfg, inner=optax.sgd(2 * LR, momentum=BETA))),
            every_k_schedule=2,
            accumulator_dtype=jnp.float64,
        ),
        w0,
        micro,
    )
    _assert_trajectories((masks[1::2], params[1::2]), ref, rtol=1e-10)


def test_through_flax_nnx_optimizer():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.linear(x)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
    y = jnp.ones((8, 3))

    def loss(model):
        return jnp.mean((model(x) - y) ** 2)

    model = Model(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(jnp.copy, nnx.as_pure(params))
    tx = optlab.dpf(optax.sgd(0.1, momentum=0.9), 0.5, end_step=4, mask_every=2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        gdef, p = nnx.split(model, nnx.Param)
        pruned = optlab.masked_params(optimizer.opt_state, p)
        grads = jax.grad(lambda q: loss(nnx.merge(gdef, q)))(pruned)
        optimizer.update(model, grads)

    for _ in range(6):
        step(model, optimizer)

    @jax.jit
    def functional(params):
        state = tx.init(params)
        for _ in range(6):
            grads = jax.grad(lambda q: loss(nnx.merge(graphdef, q)))(
                optlab.masked_params(state, params)
            )
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params

    params = functional(params)
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), got, params)
    pruned = nnx.as_pure(optlab.masked_params(optimizer.opt_state, nnx.state(model, nnx.Param)))
    assert float(optlab.sparsity(pruned).prunable) == 0.5


def test_orbax_round_trip_between_refreshes_resumes_bitwise(tmp_path, rng):
    w0, targets = _problem(rng)
    tx = optlab.dpf(optax.adam(0.05), 0.7, end_step=12, mask_every=4, feedback=True)
    step, _ = make_step(tx)

    def run(params, state, start, stop):
        for t in range(start, stop):
            params, state = step(params, state, jax.tree.map(jnp.float32, targets[t]))
        return params, state

    init = jax.jit(tx.init)

    def fresh():
        params = jax.tree.map(jnp.float32, w0)
        return params, init(params)

    full = run(*fresh(), 0, STEPS)
    half = run(*fresh(), 0, 6)  # 6 % 4 != 0: between refreshes
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(6, half)
        ckpt.wait()
        restored = ckpt.restore(like=jax.eval_shape(lambda: half), step=6)
    assert isinstance(restored[1], optlab.DPFState)
    jax.tree.map(np.testing.assert_array_equal, restored, half)
    jax.tree.map(np.testing.assert_array_equal, run(*restored, 6, STEPS), full)


def _refresh_outside_branches(hlo: str) -> bool:
    """Whether the refresh's work (its bit-pattern bisection, ``bitcast-convert``) is
    reachable from the entry without entering a conditional branch; asserts it exists."""
    bodies = {c.split(" ", 1)[0]: c for c in re.split(r"\n(?=%|ENTRY)", hlo)}
    calls = r"(?:calls|to_apply|body|condition)=(%[\w.\-]+)"

    def reach(roots):
        seen, todo = set(), list(roots)
        while todo:
            name = todo.pop()
            if name not in seen and name in bodies:
                seen.add(name)
                todo += re.findall(calls, bodies[name])
        return seen

    branches = [
        b.strip() for m in re.findall(r"branch_computations=\{([^}]*)\}", hlo) for b in m.split(",")
    ]
    refresh = lambda names: any("bitcast-convert(" in bodies[n] for n in names)
    assert refresh(reach(branches)), "no refresh compiled in a branch"
    return refresh(reach(["ENTRY"]))


def test_refresh_is_a_branch_alone_and_under_vmap_with_runs_out_of_step(rng):
    """The refresh sits in a conditional branch, also for runs stacked under vmap (a plain
    lax.cond would become a select there); stacked runs whose counts differ (one refreshes
    at each step, the other not) equal the runs done one by one."""
    tx = optlab.dpf(optax.sgd(0.5), 0.5, end_step=6, mask_every=2)
    params = {"k": jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32), "b": jnp.ones((2, 4))}
    one = jax.tree.map(lambda v: v[0], params)
    state = tx.init(one)
    # Compiled once each (ahead of time) and used for the runs below.
    single = jax.jit(tx.update).lower(one, state, one).compile()
    both_state = jax.tree.map(lambda v: jnp.stack([v, v]), state)
    stacked = jax.jit(jax.vmap(tx.update)).lower(params, both_state, params).compile()
    for compiled in (single, stacked):
        assert not _refresh_outside_branches(compiled.as_text())
    runs = [jax.tree.map(lambda v, r=r: v[r], params) for r in range(2)]
    states = [tx.init(runs[0]), tx.init(runs[1])]
    grads = [jax.tree.map(lambda v: jnp.sin(3 * v), p) for p in runs]
    updates, states[1] = single(grads[1], states[1], runs[1])  # run 1 is one step ahead
    runs[1] = optax.apply_updates(runs[1], updates)
    both = jax.tree.map(lambda *v: jnp.stack(v), *runs)
    both_state = jax.tree.map(lambda *v: jnp.stack(v), *states)
    for _ in range(5):
        g = jax.tree.map(lambda v: jnp.sin(3 * v), both)
        u, both_state = stacked(g, both_state, both)
        both = optax.apply_updates(both, u)
        for r in range(2):
            g = jax.tree.map(lambda v: jnp.sin(3 * v), runs[r])
            u, states[r] = single(g, states[r], runs[r])
            runs[r] = optax.apply_updates(runs[r], u)
    for r in range(2):
        got = jax.tree.map(lambda v, r=r: v[r], (both, both_state.mask))
        jax.tree.map(np.testing.assert_array_equal, got, (runs[r], states[r].mask))
    assert not np.all(states[1].mask["k"])  # pruned: the comparison saw refreshes


# ----------------------------------------------------------------------------------------
# Edge cases, helpers, validation.


def test_zero_matrix_and_all_pruned_tensor_stay_finite():
    """An all-zero tensor below every other magnitude is pruned entirely (4 of 16 weights;
    2 of 8 channels, structured) and zero gradients through Adam keep everything finite."""
    params = {"k_small": jnp.zeros((2, 2)), "k_big": jnp.full((2, 6), 5.0), "b": jnp.zeros(2)}
    txs = [
        optlab.dpf(optax.adam(0.1), 0.25, end_step=2, schedule="constant", structured=s)
        for s in (False, True)
    ]

    @jax.jit
    def run(params):
        out = []
        for tx in txs:
            p, state = params, tx.init(params)
            for _ in range(3):
                updates, state = tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
                p = optax.apply_updates(p, updates)
            out.append((p, state, optlab.sparsity(optlab.masked_params(state, p))))
        equal = optlab.dpf(optax.sgd(0.1), 0.25, end_step=1, schedule="constant")
        ties = equal.init({"k": jnp.ones((2, 4))}).mask["k"]
        return out, optlab.sparsity({"k": jnp.zeros((3, 3)), "b": jnp.ones(3)}), ties

    out, zeros, ties = run(params)
    # Equal magnitudes: exactly 2 of the 8 go, the first ones by position.
    np.testing.assert_array_equal(ties, [[False, False, True, True], [True, True, True, True]])
    for p, state, _ in out:
        assert not np.any(state.mask["k_small"])
        assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves((p, state)))
    assert float(out[0][2].prunable) == 0.25  # the zero tensor only
    assert float(zeros.prunable) == 1.0
    assert float(zeros.overall) == 0.75


def test_prunable_predicate_and_tree_and_sparsity_report():
    params = {
        "head": {"kernel": jnp.ones((3, 2))},
        "body": {"kernel": jnp.arange(1.0, 7.0).reshape(2, 3)},
    }
    keep_head = lambda path, leaf: leaf.ndim >= 2 and "head" not in jax.tree_util.keystr(path)
    as_tree = {"head": {"kernel": False}, "body": {"kernel": True}}

    @jax.jit
    def pruned_and_reports(params):
        out = []
        for prunable in (keep_head, as_tree):
            tx = optlab.dpf(optax.sgd(0.1), 0.5, end_step=1, schedule="constant", prunable=prunable)
            pruned = optlab.masked_params(tx.init(params), params)
            out.append((pruned, optlab.sparsity(pruned, prunable=prunable)))
        return out, optlab.sparsity(out[0][0])  # the default counts the head as prunable

    out, default = pruned_and_reports(params)
    for pruned, report in out:
        np.testing.assert_array_equal(pruned["body"]["kernel"], [[0, 0, 0], [4, 5, 6]])
        np.testing.assert_array_equal(pruned["head"]["kernel"], params["head"]["kernel"])
        assert float(report.prunable) == 0.5
        assert float(report.overall) == 0.25
    assert float(default.prunable) == 0.25


def test_masked_params_errors_and_needs_params():
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="no DPFState"):
        optlab.masked_params(jax.eval_shape(optax.sgd(0.1).init, params), params)
    tx = optlab.dpf(optax.sgd(0.1), 0.5, end_step=3)
    state = jax.eval_shape(tx.init, params)
    with pytest.raises(ValueError, match="2 DPF states"):
        optlab.masked_params((state, state), params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="structure differs"):
        optlab.dpf(optax.sgd(0.1), 0.5, end_step=3, prunable={"v": True}).init(params)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_sparsity": 1.0}, r"target_sparsity must lie in \[0, 1\)"),
        ({"target_sparsity": -0.1}, r"target_sparsity must lie in \[0, 1\)"),
        ({"target_sparsity": "0.5"}, "target_sparsity must be a real number"),
        ({"target_sparsity": lambda c: 0.5}, "got a callable"),
        ({"mask_every": 0}, "mask_every must be an integer in"),
        ({"mask_every": 2.0}, "mask_every must be an integer"),
        ({"end_step": 0}, "end_step must be an integer in"),
        ({"begin_step": 5, "end_step": 5}, "end_step must be > begin_step"),
        ({"begin_step": -1}, "begin_step must be an integer in"),
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"structured": 1}, "structured must be a bool"),
        ({"feedback": "no"}, "feedback must be a bool"),
        ({"prunable": 3}, "prunable must be a predicate"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"target_sparsity": 0.5, "end_step": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        optlab.dpf(optax.sgd(0.1), **args)

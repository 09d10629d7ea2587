"""optlab.sam (SAM, ASAM, m-sharpness, per-worker perturbations) against reference loops,
optax.contrib.sam, and the transform contract of DESIGN.md section 2."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from sam_family_checks import (
    assert_trees_close,
    assert_trees_equal,
    check_donating_step,
    check_dtype_is_kept,
    check_nnx_optimizer,
    check_no_retrace,
    check_orbax_resume,
    enable_x64,
    flat,
    flat_grad_fn,
    make_step,
    mlp_data,
    mlp_grad,
    mlp_loss,
    mlp_params,
    reference_heavy_ball,
    run,
    trace_counter,
    worker_step,
)

import optlab
from optlab.perturbation import group_grad_fn, microbatched_grad_fn

LR, MOMENTUM, STEPS = 0.1, 0.9, 5


def _no_bias(params):
    return {k: not k.startswith("b") for k in params}


def _reference_sam(params0, xs, ys, rho, *, adaptive=None, groups=1):
    """Plain float64 loop from the SAM/ASAM equations with heavy-ball SGD on top.

    ``adaptive``: None (SAM) or (eta, mask tree of bools) for ASAM's T = |w| + eta.
    """
    grad = flat_grad_fn(params0)
    w, m = flat(params0), 0.0
    for t in range(len(xs)):
        rho_t = rho(t) if callable(rho) else rho
        h = 0.0
        for k in range(groups):
            n = xs[t].shape[0] // groups
            xk, yk = xs[t][k * n : (k + 1) * n], ys[t][k * n : (k + 1) * n]
            g = grad(w, xk, yk)
            if adaptive is None:
                t_w = np.ones_like(w)
            else:
                eta, mask = adaptive
                use = flat(jax.tree.map(lambda p, u: jnp.full(p.shape, float(u)), params0, mask))
                t_w = np.where(use > 0, np.abs(w) + eta, 1.0)
            eps = rho_t * t_w**2 * g / np.linalg.norm(t_w * g)
            h = h + grad(w + eps, xk, yk) / groups
        m = MOMENTUM * m + h
        w = w - LR * m
    return w


@pytest.mark.parametrize(
    ("kwargs", "ref_kwargs"),
    [
        ({"rho": 0.05}, {"rho": 0.05}),
        ({"rho": 0.5, "adaptive": True, "adaptive_mask": True}, {"rho": 0.5, "adaptive": "all"}),
        (
            # davda54/sam's adaptive=True: T = |w| on every tensor, no eta.
            {"rho": 0.5, "adaptive": True, "adaptive_mask": True, "adaptive_eps": 0.0},
            {"rho": 0.5, "adaptive": "davda54"},
        ),
        (
            {"rho": 0.5, "adaptive": True, "adaptive_eps": 0.1, "adaptive_mask": _no_bias},
            {"rho": 0.5, "adaptive": "no_bias"},
        ),
        (
            # Halvings are exact in float32: the same values inside and outside jit.
            {"rho": optax.piecewise_constant_schedule(0.2, {1: 0.5, 3: 0.5})},
            {"rho": lambda t: 0.2 * 0.5 ** ((t >= 1) + (t >= 3))},
        ),
    ],
    ids=["sam", "asam_all_leaves", "asam_davda54", "asam_weights_only", "rho_schedule"],
)
def test_matches_reference_loop(kwargs, ref_kwargs):
    with enable_x64():
        params = mlp_params(jnp.float64)
        xs, ys = mlp_data(STEPS, dtype=jnp.float64)
        tx = optlab.sam(optax.sgd(LR, momentum=MOMENTUM), **kwargs)
        got, _, _ = run(tx, params, xs, ys)
        adaptive = ref_kwargs.get("adaptive")
        if adaptive == "all":
            adaptive = (0.01, jax.tree.map(lambda _: True, params))
        elif adaptive == "davda54":
            adaptive = (0.0, jax.tree.map(lambda _: True, params))
        elif adaptive == "no_bias":
            adaptive = (0.1, _no_bias(params))
        expected = _reference_sam(params, xs, ys, ref_kwargs["rho"], adaptive=adaptive)
        np.testing.assert_allclose(flat(got), expected, rtol=1e-11, atol=1e-13)
        # The perturbation is not negligible here: plain momentum SGD ends elsewhere.
        plain = reference_heavy_ball(params, xs, ys, LR, MOMENTUM)
        assert np.max(np.abs(plain - expected)) > 1e-3


# A flax-style model: names as flax linen/nnx give them. Which leaves the official ASAM code
# normalises is written out by hand (PyTorch: every parameter named *weight*, i.e. kernels and
# the LayerNorm scale; biases not).
_NAMED_USES_T = {
    ("Dense_0", "kernel"): True,
    ("Dense_0", "bias"): False,
    ("LayerNorm_0", "scale"): True,
    ("Dense_1", "kernel"): True,
    ("Dense_1", "bias"): False,
}


def _named_params(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(3), 3)
    return {
        "Dense_0": {
            "kernel": (0.8 * jax.random.normal(k[0], (3, 4))).astype(dtype),
            "bias": jnp.zeros((4,), dtype),  # zero-initialised, as flax does
        },
        "LayerNorm_0": {"scale": (1.0 + 0.1 * jax.random.normal(k[1], (4,))).astype(dtype)},
        "Dense_1": {
            "kernel": (0.8 * jax.random.normal(k[2], (4, 2))).astype(dtype),
            "bias": jnp.zeros((2,), dtype),
        },
    }


def _named_loss(p, x, y):
    hidden = jnp.tanh(
        p["LayerNorm_0"]["scale"] * (x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    )
    return jnp.mean((hidden @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - y) ** 2)


def _reference_asam_by_name(params0, xs, ys, rho, eta, uses_t):
    """Float64 ASAM loop; ``uses_t[(module, name)]`` says where T = |w| + eta applies."""
    names = [(m, n) for m in sorted(params0) for n in sorted(params0[m])]  # flatten order
    sizes = [params0[m][n].size for m, n in names]
    shapes = [params0[m][n].shape for m, n in names]

    def unflatten(w):
        out, start = {}, 0
        for (m, n), size, shape in zip(names, sizes, shapes, strict=True):
            out.setdefault(m, {})[n] = jnp.asarray(w[start : start + size].reshape(shape))
            start += size
        return out

    def grad(w, x, y):
        g = jax.grad(_named_loss)(unflatten(w), x, y)
        return np.concatenate([np.ravel(g[m][n]) for m, n in names])

    w = np.concatenate([np.ravel(np.asarray(params0[m][n], np.float64)) for m, n in names])
    use = np.concatenate(
        [np.full(size, uses_t[key]) for key, size in zip(names, sizes, strict=True)]
    )
    mom = 0.0
    for x, y in zip(xs, ys, strict=True):
        g = grad(w, x, y)
        t_w = np.where(use, np.abs(w) + eta, 1.0)
        h = grad(w + rho * t_w**2 * g / np.linalg.norm(t_w * g), x, y)
        mom = MOMENTUM * mom + h
        w = w - LR * mom
    return w


def test_asam_default_is_the_official_code_weights_only_by_name():
    with enable_x64():
        params = _named_params(jnp.float64)
        xs, ys = mlp_data(STEPS, dtype=jnp.float64)
        tx = optlab.sam(optax.sgd(LR, momentum=MOMENTUM), 0.5, adaptive=True)

        @jax.jit
        def step(p, s, x, y):
            grad_fn = lambda q: jax.grad(_named_loss)(q, x, y)
            updates, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
            return optax.apply_updates(p, updates), s

        got, state = params, tx.init(params)
        for t in range(STEPS):
            got, state = step(got, state, xs[t], ys[t])
        got = np.concatenate([np.ravel(got[m][n]) for m in sorted(got) for n in sorted(got[m])])
        want = _reference_asam_by_name(params, xs, ys, 0.5, 0.01, _NAMED_USES_T)
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)
        # The old default (T on every leaf, biases too) is a different method here.
        every_leaf = _reference_asam_by_name(
            params, xs, ys, 0.5, 0.01, dict.fromkeys(_NAMED_USES_T, True)
        )
        assert np.max(np.abs(every_leaf - want)) > 1e-4


def test_asam_weight_mask_names_and_unnamed_leaves():
    class Linear(NamedTuple):  # attribute names, as equinox modules flatten
        weight: jax.Array
        bias: jax.Array

    w2, w1 = jnp.ones((2, 2)), jnp.ones(2)
    cases = [
        ({"Dense_0": {"kernel": w2, "bias": w1}}, {"Dense_0": {"kernel": True, "bias": False}}),
        ({"bn": {"scale": w1, "bias": w1}}, {"bn": {"scale": True, "bias": False}}),
        (Linear(w2, w1), Linear(True, False)),
        (
            {"fc.weight": w2, "fc.bias": w1, "ln/bias": w1},
            {"fc.weight": True, "fc.bias": False, "ln/bias": False},
        ),
        ({"w": w1, "b": w1}, {"w": True, "b": True}),  # named, none "bias": all weights
        ([w2, w1, [w2, w1]], [True, False, [True, False]]),  # unnamed: ndim >= 2
        (w1, False),
        (w2, True),
    ]
    for params, want in cases:
        assert optlab.asam_weight_mask(params) == want
    # nnx.Optimizer.init sees Variables: the trailing ".value" does not hide the name.
    from flax import nnx

    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    mask = optlab.asam_weight_mask(nnx.state(model, nnx.Param))
    assert jax.tree.leaves(mask) == [False, True]  # bias, kernel


@pytest.mark.parametrize("vectorize", [False, True])
def test_m_sharpness_groups_match_reference_loop(vectorize):
    with enable_x64():
        params = mlp_params(jnp.float64)
        xs, ys = mlp_data(STEPS, dtype=jnp.float64)
        tx = optlab.sam(optax.sgd(LR, momentum=MOMENTUM), 0.1, groups=4, vectorize_groups=vectorize)

        @jax.jit
        def step(params, state, x, y):
            grad_fn = group_grad_fn(lambda p, b: mlp_grad(p, *b), (x, y), 4)
            updates, state = tx.update(mlp_grad(params, x, y), state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), state

        state, got = tx.init(params), params
        for t in range(STEPS):
            got, state = step(got, state, xs[t], ys[t])
        expected = _reference_sam(params, xs, ys, 0.1, groups=4)
        np.testing.assert_allclose(flat(got), expected, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("adaptive", [False, True])
def test_equals_optax_contrib_sam_opaque_mode(adaptive):
    with enable_x64():
        params = mlp_params(jnp.float64)
        xs, ys = mlp_data(STEPS, dtype=jnp.float64)
        rho = 0.07
        base = optax.adam(0.01)
        ours = optlab.sam(base, rho, adaptive=adaptive, adaptive_eps=0.0)
        if adaptive:
            # ASAM as an adversarial optimizer: T^2 g / |T g| with T = |w| (adaptive_eps=0).
            def scale_update(updates, state, params):
                tg = jax.tree.map(lambda g, p: g * jnp.abs(p), updates, params)
                norm = optax.tree.norm(tg)
                return jax.tree.map(lambda v, p: v * jnp.abs(p) / norm, tg, params), state

            normalize = optax.GradientTransformation(lambda p: optax.EmptyState(), scale_update)
        else:
            normalize = optax.contrib.normalize()
        theirs = optax.contrib.sam(
            base, optax.chain(normalize, optax.sgd(rho)), sync_period=2, opaque_mode=True
        )
        got, _, _ = run(ours, params, xs, ys)

        @jax.jit
        def step(params, state, x, y):
            grad_fn = lambda p, _: mlp_grad(p, x, y)
            updates, state = theirs.update(mlp_grad(params, x, y), state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), state

        state, expected = theirs.init(params), params
        for t in range(STEPS):
            expected, state = step(expected, state, xs[t], ys[t])
        assert_trees_close(got, expected, rtol=1e-12, atol=1e-14)


def test_rho_zero_is_the_base_optimizer_exactly():
    params = mlp_params()
    xs, ys = mlp_data(STEPS)
    base = optax.sgd(LR, momentum=MOMENTUM)
    got, _, _ = run(optlab.sam(base, 0.0), params, xs, ys)
    expected, _, _ = run(base, params, xs, ys, with_grad_fn=False)
    assert_trees_equal(got, expected)


def test_zero_gradient_gives_finite_updates_where_optax_contrib_gives_nan():
    target = {"w": jnp.arange(3.0)}
    grad_fn = jax.grad(lambda p: jnp.sum((p["w"] - target["w"]) ** 2))
    zero = grad_fn(target)
    assert not np.any(np.asarray(zero["w"]))
    for adaptive in (False, True):
        tx = optlab.sam(optax.sgd(0.1), 0.05, adaptive=adaptive)
        updates, _ = tx.update(zero, tx.init(target), target, grad_fn=grad_fn)
        np.testing.assert_array_equal(updates["w"], 0.0)
    theirs = optax.contrib.sam(
        optax.sgd(0.1),
        optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
        opaque_mode=True,
    )
    updates, _ = theirs.update(zero, theirs.init(target), target, grad_fn=lambda p, _: grad_fn(p))
    assert np.isnan(np.asarray(updates["w"])).all()


def test_one_grad_fn_call_per_update_at_the_perturbed_point():
    params = mlp_params()
    xs, ys = mlp_data(3)
    seen = []
    tx = optlab.sam(optax.sgd(LR), 0.05)

    @jax.jit
    def step(params, state, x, y):
        def grad_fn(p):
            jax.debug.callback(lambda w: seen.append(np.asarray(w)), p["b2"])
            return mlp_grad(p, x, y)

        updates, state = tx.update(mlp_grad(params, x, y), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for t in range(3):
        g = mlp_grad(params, xs[t], ys[t])
        new_params, state = step(params, state, xs[t], ys[t])
        jax.effects_barrier()
        assert len(seen) == t + 1
        eps = 0.05 * g["b2"] / optax.tree.norm(g)
        np.testing.assert_allclose(seen[-1], params["b2"] + eps, rtol=1e-5, atol=1e-7)
        params = new_params


def test_shard_map_equals_vmap_simulation_and_per_worker_reference():
    steps, workers = 3, 8
    params = mlp_params()
    xs, ys = mlp_data(steps)
    tx = optlab.sam(optax.sgd(LR, momentum=MOMENTUM), 0.1, axis_name="data")
    step = worker_step(tx)
    mesh = jax.make_mesh((workers,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
        )
    )
    simulated = jax.jit(jax.vmap(step, in_axes=(None, None, 0, 0), axis_name="data"))
    p_shard, s_shard = params, tx.init(params)
    p_sim, s_sim = params, tx.init(params)
    for t in range(steps):
        p_shard, s_shard = sharded(p_shard, s_shard, xs[t], ys[t])
        p_sim, s_sim = simulated(p_sim, s_sim, xs[t].reshape(8, 2, 3), ys[t].reshape(8, 2, 2))
        # Every simulated worker holds the same params; take worker 0 as the next input.
        assert_trees_close(jax.tree.map(lambda v: v[7], p_sim), jax.tree.map(lambda v: v[0], p_sim))
        p_sim, s_sim = jax.tree.map(lambda v: v[0], (p_sim, s_sim))
        assert_trees_close(p_shard, p_sim, rtol=1e-5, atol=1e-7)
    # Reference: each worker perturbs from its own 2-example gradient (sync_perturbations=False).
    with enable_x64():
        grad = flat_grad_fn(params)
        w, m = flat(params), 0.0
        for t in range(steps):
            x64, y64 = np.asarray(xs[t], np.float64), np.asarray(ys[t], np.float64)
            h = 0.0
            for i in range(workers):
                xi, yi = x64[2 * i : 2 * i + 2], y64[2 * i : 2 * i + 2]
                g = grad(w, xi, yi)
                h = h + grad(w + 0.1 * g / np.linalg.norm(g), xi, yi) / workers
            m = MOMENTUM * m + h
            w = w - LR * m
    np.testing.assert_allclose(flat(p_shard), w, rtol=1e-4, atol=1e-5)
    # It is not the synchronised-perturbation (whole-batch) SAM.
    with enable_x64():
        whole = _reference_sam(
            mlp_params(jnp.float64), np.asarray(xs, np.float64), np.asarray(ys, np.float64), 0.1
        )
    assert np.max(np.abs(whole - w)) > 1e-3


def test_groups_within_each_device_under_shard_map():
    # 8 devices x 2 groups of one example: 16 perturbations, one per example.
    params = mlp_params()
    xs, ys = mlp_data(1)
    tx = optlab.sam(optax.sgd(LR), 0.1, groups=2, axis_name="data")
    local = optlab.data_parallel_value_and_grad(mlp_loss, "data", average=False)

    def step(params, state, x, y):
        grad_fn = group_grad_fn(lambda p, b: local(p, *b)[1], (x, y), 2)
        updates, state = tx.update(None, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    got, _ = jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
        )
    )(params, tx.init(params), xs[0], ys[0])
    with enable_x64():
        grad = flat_grad_fn(params)
        w = flat(params)
        h = 0.0
        for i in range(16):
            xi, yi = xs[0][i : i + 1], ys[0][i : i + 1]
            g = grad(w, xi, yi)
            h = h + grad(w + 0.1 * g / np.linalg.norm(g), xi, yi) / 16
    np.testing.assert_allclose(flat(got), w - LR * h, rtol=1e-5, atol=1e-6)


def test_clip_before_sam_is_a_noop_and_clip_in_base_clips_the_sam_gradient():
    params = mlp_params()
    xs, ys = mlp_data(STEPS)
    base = optax.sgd(LR, momentum=MOMENTUM)
    plain, _, _ = run(optlab.sam(base, 0.1), params, xs, ys)
    before, _, _ = run(
        optax.chain(optax.clip_by_global_norm(1e-3), optlab.sam(base, 0.1)), params, xs, ys
    )
    assert_trees_close(before, plain, rtol=1e-6, atol=1e-7)
    # Clipping inside base acts on the SAM gradient: each step moves by lr * (at most) 1e-3.
    _inside, _, path = run(
        optlab.sam(optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(LR)), 0.1),
        params,
        xs,
        ys,
    )
    moves = [flat(b) - flat(a) for a, b in zip([params, *path[:-1]], path, strict=True)]
    np.testing.assert_allclose([np.linalg.norm(d) for d in moves], LR * 1e-3, rtol=1e-3)


@pytest.mark.parametrize("adaptive", [False, True])
def test_multi_steps_around_sam_is_refused_naming_the_fixes(adaptive):
    # MultiSteps forwards the last micro-batch's grad_fn only: refused, not silently wrong.
    params = mlp_params()
    xs, ys = mlp_data(2)
    tx = optlab.sam(optax.sgd(LR), 0.1, adaptive=adaptive)
    for wrapped in (
        optax.MultiSteps(tx, every_k_schedule=2),
        optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), tx), 2),
        optax.MultiSteps(optax.inject_hyperparams(optlab.sam)(optax.sgd(LR), rho=0.1), 2),
    ):
        with pytest.raises(ValueError, match=r"MultiSteps.*microbatched_grad_fn.*MultiSteps\(base"):
            run(wrapped, params, xs, ys)


def _reference_sam_per_micro_batch(params0, xs, ys, rho, k):
    """Float64 loop: every k micro-batches one heavy-ball step on the mean of the k SAM
    gradients, each micro-batch perturbed from its own gradient at the fixed params."""
    grad = flat_grad_fn(params0)
    w, m = flat(params0), 0.0
    for start in range(0, len(xs), k):
        h = 0.0
        for i in range(start, start + k):
            g = grad(w, xs[i], ys[i])
            h = h + grad(w + rho * g / np.linalg.norm(g), xs[i], ys[i]) / k
        m = MOMENTUM * m + h
        w = w - LR * m
    return w


@pytest.mark.parametrize("rho", [0.0, 0.1])
def test_multi_steps_inside_sam_matches_an_independent_accumulation_loop(rho):
    params = mlp_params()
    xs, ys = mlp_data(6)
    tx = optlab.sam(optax.MultiSteps(optax.sgd(LR, momentum=MOMENTUM), every_k_schedule=2), rho)
    got, state, path = run(tx, params, xs, ys)
    assert int(state.count) == 6  # one SAM gradient per micro-batch
    assert_trees_equal(path[0], params)  # nothing moves before the k-th micro-batch
    with enable_x64():
        want = _reference_sam_per_micro_batch(params, xs, ys, rho, 2)
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)
    if rho == 0.0:  # rho = 0 SAM is the base optimizer: plain gradient accumulation
        plain, _, _ = run(optax.MultiSteps(optax.sgd(LR, momentum=MOMENTUM), 2), params, xs, ys)
        assert_trees_close(got, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("adaptive", [False, True])
def test_microbatched_grad_fn_gives_sam_on_the_whole_batch(adaptive):
    # One update per batch of 16 examples, each gradient computed over 4 micro-batches of 4:
    # exactly SAM/ASAM on the whole batch (the reference differentiates the whole batch).
    params = mlp_params()
    xs, ys = mlp_data(STEPS)
    tx = optlab.sam(optax.sgd(LR, momentum=MOMENTUM), 0.3, adaptive=adaptive)

    @jax.jit
    def step(params, state, x, y):
        gfn = microbatched_grad_fn(lambda p, b: mlp_grad(p, *b), (x, y), 4)
        updates, state = tx.update(gfn(params), state, params, grad_fn=gfn)
        return optax.apply_updates(params, updates), state

    got, state = params, tx.init(params)
    for t in range(STEPS):
        got, state = step(got, state, xs[t], ys[t])
    with enable_x64():
        mask = jax.tree.map(lambda _: True, params)
        want = _reference_sam(params, xs, ys, 0.3, adaptive=(0.01, mask) if adaptive else None)
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_traced_rho_without_static_args():
    params = mlp_params()
    xs, ys = mlp_data(4)
    base = optax.sgd(LR, momentum=MOMENTUM)
    tx = optax.inject_hyperparams(optlab.sam)(base, rho=0.05, adaptive=True, adaptive_eps=0.02)
    step, traces = trace_counter(make_step(tx))
    state, got = tx.init(params), params
    for t in range(4):
        if t == 2:
            state.hyperparams["rho"] = jnp.asarray(0.2, jnp.float32)
        got, state = step(got, state, xs[t], ys[t])
    assert len(traces) == 1
    # The same as rho = 0.05 for two steps, then rho = 0.2.
    p, s, _ = run(optlab.sam(base, 0.05, adaptive=True, adaptive_eps=0.02), params, xs[:2], ys[:2])
    inner = optlab.sam(base, 0.2, adaptive=True, adaptive_eps=0.02)
    expected, _, _ = run(inner, p, xs, ys, state=s, start=2)
    assert_trees_close(got, expected, rtol=1e-6, atol=1e-7)


def test_no_recompilation_on_the_second_update():
    check_no_retrace(
        optlab.sam(optax.adam(1e-2), optax.cosine_decay_schedule(0.1, 10), adaptive=True)
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: optlab.sam(optax.sgd(LR, momentum=MOMENTUM), 0.1),
        lambda: optlab.sam(optax.adam(1e-2), 0.5, adaptive=True),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optlab.sam(optax.sgd(LR), 0.1)),
        lambda: optax.inject_hyperparams(optlab.sam)(optax.sgd(LR), rho=0.1, adaptive=True),
        lambda: optlab.sam(optax.MultiSteps(optax.sgd(LR, momentum=MOMENTUM), 2), 0.1),
    ],
    ids=["sam", "asam", "chain", "inject", "multi_steps_inside"],
)
def test_jitted_step_donating_params_and_state(make):
    check_donating_step(make(), steps=4)


def test_through_flax_nnx_optimizer():
    tx = optlab.sam(optax.sgd(LR, momentum=MOMENTUM), 0.1, adaptive=True)
    opt_state = check_nnx_optimizer(tx, steps=4)
    assert int(opt_state.count) == 4


@pytest.mark.parametrize(
    ("dtype", "adaptive"), [(jnp.bfloat16, False), (jnp.bfloat16, True), (jnp.float32, True)]
)
def test_dtype_is_kept(dtype, adaptive):
    tx = optlab.sam(optax.sgd(LR, momentum=MOMENTUM), 0.05, adaptive=adaptive)
    state = check_dtype_is_kept(tx, dtype)
    assert all(s.dtype == dtype for s in jax.tree.leaves(state.base_state) if s.ndim)


def test_orbax_round_trip_resumes_identically(tmp_path):
    tx = optlab.sam(optax.adam(1e-2), optax.linear_schedule(0.1, 0.01, 6), adaptive=True)
    restored = check_orbax_resume(tx, tmp_path / "ckpt")
    assert isinstance(restored, optlab.SAMState)
    assert int(restored.count) == 3


def test_extra_args_are_forwarded_to_base():
    seen = {}

    def spy_update(updates, state, params=None, **extra):
        seen.update(extra)
        return updates, state

    spy = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), spy_update)
    tx = optlab.sam(spy, 0.05)
    params = {"w": jnp.ones(2)}
    grad_fn = lambda p: p
    tx.update(params, tx.init(params), params, grad_fn=grad_fn, value=1.0)
    assert seen == {"grad_fn": grad_fn, "value": 1.0}


def test_needs_params_and_grad_fn():
    tx = optlab.sam(optax.sgd(0.1))
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params), grad_fn=lambda p: p)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rho": -0.1}, "rho"),
        ({"rho": float("nan")}, "rho"),
        ({"adaptive_eps": -1.0, "adaptive": True}, "adaptive_eps"),
        ({"groups": 0}, "groups"),
        ({"groups": 2.0}, "groups"),
        ({"groups": True}, "groups"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_invalid_arguments_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        optlab.sam(optax.sgd(0.1), **kwargs)


def test_converges_on_a_small_regression_problem():
    params = mlp_params()
    xs, ys = mlp_data(1, seed=3)
    x, y = xs[0], ys[0]
    for tx in (
        optlab.sam(optax.sgd(0.1, momentum=0.9), 0.05),
        optlab.sam(optax.sgd(0.1, momentum=0.9), 0.5, adaptive=True),
    ):
        state, p = tx.init(params), params
        step = make_step(tx)
        for _ in range(300):
            p, state = step(p, state, x, y)
        initial, final = float(mlp_loss(params, x, y)), float(mlp_loss(p, x, y))
        assert final < 0.1 * initial, (initial, final)
        assert float(optax.tree.norm(mlp_grad(p, x, y))) < 0.05

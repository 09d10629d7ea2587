"""optlab.sa_sam: both forms against a loop written from the equations, and the contract."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from sam_family_checks import (
    assert_trees_close,
    assert_trees_equal,
    check_donating_step,
    flat,
    flat_grad_fn,
    make_step,
    mlp_data,
    mlp_grad,
    mlp_loss,
    mlp_params,
    orbax_round_trip,
    run,
    trace_counter,
    worker_step,
)

import optlab
from optlab.perturbation import microbatched_grad_fn

PRESETS = {"paper": (1.0, 2.0, 0.0), "practical": (0.02, 1.0, 1e-8)}


def reference(
    form,
    base_lr,
    w0,
    grad,
    batches,
    *,
    amplifier=None,
    damping=None,
    lr_eps=None,
    cap=10.0,
    rho_scale=1.0,
):
    """SA-SAM from the equations on flat float64 vectors; returns per-step records."""
    gamma, d, eps = PRESETS[form]
    gamma = gamma if amplifier is None else amplifier
    d = d if damping is None else damping
    eps = eps if lr_eps is None else lr_eps
    paper = form == "paper"
    w, w_prev, lr_prev = w0.copy(), w0.copy(), base_lr
    theta = math.inf if paper else 1.0
    records = []
    for t, (x, y) in enumerate(batches):
        g, g_prev = grad(w, x, y), grad(w_prev, x, y)  # the same batch at both points
        dx, dg = np.linalg.norm(w - w_prev), np.linalg.norm(g - g_prev)
        growth = math.inf if math.isinf(theta) else lr_prev * math.sqrt(1 + gamma * theta)
        smooth_active = dx > 0 and dg > 0
        lr = min(growth, dx / (d * dg)) + eps if smooth_active else growth
        if paper and t == 0:
            lr = base_lr
        capped = lr >= cap * base_lr
        lr = min(lr, cap * base_lr)
        theta = math.inf if paper and t == 0 else lr / lr_prev
        rho = rho_scale * math.sqrt(lr if paper else lr_prev)
        h = grad(w + rho * g / np.linalg.norm(g), x, y)
        w_prev, w, lr_prev = w, w - lr * h, lr
        records.append(
            {
                "w": w,
                "lr": lr,
                "theta": theta,
                "rho": rho,
                "smooth": smooth_active,
                "binding": smooth_active and dx / (d * dg) < growth,
                "capped": capped,
            }
        )
    return records


def _compare_with_reference(form, base_lr, steps=8, **knobs):
    params = mlp_params(jnp.float64)
    xs, ys = mlp_data(steps, dtype=jnp.float64)
    records = reference(
        form,
        base_lr,
        flat(params),
        flat_grad_fn(params),
        list(zip(xs, ys, strict=True)),
        **knobs,
    )
    cap = knobs.pop("cap", 10.0)
    tx = optlab.sa_sam(base_lr, form=form, max_lr_factor=cap, **knobs)
    step = make_step(tx)
    state = tx.init(params)
    assert state.lr.dtype == jnp.float64
    for t, record in enumerate(records):
        params, state = step(params, state, xs[t], ys[t])
        np.testing.assert_allclose(flat(params), record["w"], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(state.lr, record["lr"], rtol=1e-10)
        np.testing.assert_allclose(state.rho, record["rho"], rtol=1e-10)
        np.testing.assert_allclose(state.theta, record["theta"], rtol=1e-10)
        assert int(state.count) == t + 1
    return records


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("form", ["paper", "practical"])
def test_matches_the_equations_step_by_step(form):
    records = _compare_with_reference(form, 1.0, steps=10)
    # The run exercises the smoothness estimate, the growth term, and not just the cap.
    assert any(r["binding"] for r in records[1:])
    assert any(not r["binding"] for r in records)
    assert not all(r["capped"] for r in records[1:])


@pytest.mark.usefixtures("x64")
def test_explicit_knobs_override_the_preset():
    records = _compare_with_reference(
        "paper", 0.3, steps=6, amplifier=0.5, damping=3.0, lr_eps=1e-4, cap=4.0, rho_scale=0.5
    )
    assert any(r["binding"] for r in records[1:])


@pytest.mark.usefixtures("x64")
def test_the_cap_binds_on_a_nearly_flat_loss():
    """Curvature 1e-6: the smoothness estimate is ~1e6, so only the cap bounds η."""
    grad = jax.grad(lambda w: 0.5e-6 * jnp.sum(w**2))

    def lrs_of(tx, steps):
        def step(carry, _):
            w, state = carry
            updates, state = tx.update(grad(w), state, w, grad_fn=grad)
            return (optax.apply_updates(w, updates), state), state.lr

        w = jnp.array([1.0, -2.0])
        return list(np.asarray(jax.lax.scan(step, (w, tx.init(w)), length=steps)[1]))

    lrs = lrs_of(optlab.sa_sam(0.1, form="paper", max_lr_factor=10.0), 5)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[1:] == pytest.approx([1.0] * 4, rel=1e-12)

    lrs = lrs_of(optlab.sa_sam(0.1, form="practical", max_lr_factor=1.5), 100)
    # Growth by √(1 + 0.02 θ) per step, until the cap holds it at 0.15.
    assert lrs[0] == pytest.approx(0.1 * math.sqrt(1.02), rel=1e-12)
    assert max(lrs) <= 0.15 * (1 + 1e-12)
    assert lrs[-1] == pytest.approx(0.15, rel=1e-12)


@pytest.mark.parametrize("form", ["paper", "practical"])
@pytest.mark.parametrize("amplifier", [None, 0.0])
def test_zero_gradient_and_zero_displacement_stay_finite(form, amplifier):
    tx = optlab.sa_sam(0.1, form=form, amplifier=amplifier)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    zero_grad = lambda p: jax.tree.map(jnp.zeros_like, p)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=zero_grad))
    state = tx.init(params)
    for _ in range(4):
        updates, state = update(zero_grad(params), state, params)
        params = optax.apply_updates(params, updates)
        for leaf in [*jax.tree.leaves(updates), state.lr, state.rho, *jax.tree.leaves(params)]:
            assert np.all(np.isfinite(leaf))
        assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
        assert 0.0 < float(state.lr) <= 1.0 * (1 + 1e-6)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("form", ["paper", "practical"])
def test_constant_gradient_uses_the_growth_term_only(form):
    """A linear loss: Δx ≠ 0 but Δg = 0, so the smoothness term is skipped, not inf/NaN."""
    slope = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.25)}
    grad_fn = lambda p: slope
    tx = optlab.sa_sam(0.1, form=form, max_lr_factor=100.0)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
    params = jax.tree.map(jnp.zeros_like, slope)
    state = tx.init(params)
    lrs = []
    for _ in range(4):
        updates, state = update(slope, state, params)
        params = optax.apply_updates(params, updates)
        lrs.append(float(state.lr))
    if form == "paper":  # θ_0 = +inf: unlimited growth, held by the cap
        assert lrs == pytest.approx([0.1, 10.0, 10.0, 10.0], rel=1e-12)
    else:  # η_t = η_{t-1} √(1 + 0.02 θ_{t-1}), θ_t = η_t / η_{t-1}
        lr, theta, want = 0.1, 1.0, []
        for _ in range(4):
            new = lr * math.sqrt(1 + 0.02 * theta)
            lr, theta = new, new / lr
            want.append(lr)
        assert lrs == pytest.approx(want, rel=1e-12)
    assert_trees_close(params, jax.tree.map(lambda g: -sum(lrs) * g, slope), rtol=1e-12)


def test_jit_does_not_recompile_on_the_second_update():
    params = mlp_params()
    xs, ys = mlp_data(3)
    tx = optlab.sa_sam(0.1)

    def step(params, state, x, y):
        grads = mlp_grad(params, x, y)
        updates, state = tx.update(grads, state, params, grad_fn=lambda p: mlp_grad(p, x, y))
        return optax.apply_updates(params, updates), state

    jitted, traces = trace_counter(step)
    state = tx.init(params)
    for t in range(3):
        params, state = jitted(params, state, xs[t], ys[t])
    assert len(traces) == 1


def test_inject_hyperparams_with_a_traced_base_lr():
    params = mlp_params()
    xs, ys = mlp_data(4)
    tx = optax.inject_hyperparams(optlab.sa_sam)(base_lr=0.2, form="practical")
    got, state, _ = run(tx, params, xs, ys)
    want, plain_state, _ = run(optlab.sa_sam(0.2, form="practical"), params, xs, ys)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.inner_state.lr, plain_state.lr, rtol=1e-6)
    # A new value enters the jitted step as data: the cap follows it.
    state.hyperparams["base_lr"] = jnp.asarray(0.01, jnp.float32)
    _, state, _ = run(tx, got, xs, ys, state=state)
    assert float(state.inner_state.lr) <= 0.1 * (1 + 1e-6)


def test_in_optax_chain_and_state_lookup():
    params = mlp_params()
    xs, ys = mlp_data(4)
    chained = optax.chain(optlab.sa_sam(0.2), optax.scale(1.0))
    got, state, _ = run(chained, params, xs, ys)
    want, plain_state, _ = run(optlab.sa_sam(0.2), params, xs, ys)
    assert_trees_close(got, want, rtol=1e-6)
    np.testing.assert_allclose(optax.tree.get(state, "lr"), plain_state.lr, rtol=1e-6)


def test_multi_steps_around_sa_sam_is_refused_naming_the_fix():
    # MultiSteps would mix the mean of k gradients with one micro-batch's g'_t and SAM gradient.
    params = mlp_params()
    xs, ys = mlp_data(2)
    for wrapped in (
        optax.MultiSteps(optlab.sa_sam(0.3), every_k_schedule=2),
        optax.MultiSteps(optax.chain(optlab.sa_sam(0.3), optax.scale(1.0)), 2),
    ):
        with pytest.raises(
            ValueError, match=r"sa_sam inside optax\.MultiSteps.*microbatched_grad_fn"
        ):
            run(wrapped, params, xs, ys)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("form", ["paper", "practical"])
def test_microbatched_grad_fn_gives_sa_sam_on_the_whole_batch(form):
    """All three gradients computed over 4 micro-batches of 4 examples: the whole-batch rule."""
    params = mlp_params(jnp.float64)
    xs, ys = mlp_data(6, dtype=jnp.float64)
    batches = list(zip(xs, ys, strict=True))
    records = reference(form, 0.5, flat(params), flat_grad_fn(params), batches)
    tx = optlab.sa_sam(0.5, form=form)

    @jax.jit
    def step(p, s, x, y):
        gfn = microbatched_grad_fn(lambda q, b: mlp_grad(q, *b), (x, y), 4)
        updates, s = tx.update(gfn(p), s, p, grad_fn=gfn)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    for t, record in enumerate(records):
        params, state = step(params, state, xs[t], ys[t])
        np.testing.assert_allclose(flat(params), record["w"], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(state.lr, record["lr"], rtol=1e-10)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optlab.sa_sam(0.3),
        lambda: optlab.sa_sam(0.3, form="practical"),
        lambda: optax.chain(optlab.sa_sam(0.3), optax.scale(1.0)),
        lambda: optax.inject_hyperparams(optlab.sa_sam)(0.3, rho_scale=0.5),
    ],
    ids=["paper", "practical", "chain", "inject"],
)
def test_jitted_step_donating_params_and_state(make):
    # init used to store the params themselves as prev_params: "donate the same buffer twice".
    state = check_donating_step(make(), steps=4)
    assert np.isfinite(float(optax.tree.get(state, "lr")))


def test_through_flax_nnx_optimizer():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return jnp.tanh(self.linear(x))

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    model = Model(nnx.Rngs(0))
    graphdef = nnx.graphdef(model)
    params = jax.tree.map(jnp.copy, nnx.as_pure(nnx.state(model, nnx.Param)))  # a snapshot

    def pure_loss(p):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    tx = optlab.sa_sam(0.2, form="practical")
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads, grad_fn=jax.grad(pure_loss))

    for _ in range(5):
        step(model, optimizer)

    @jax.jit
    def functional_step(params, state):
        grads = jax.grad(pure_loss)(params)
        updates, state = tx.update(grads, state, params, grad_fn=jax.grad(pure_loss))
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(5):
        params, state = functional_step(params, state)
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    assert_trees_close(got, params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(optimizer.opt_state.lr[...], state.lr, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_is_kept(dtype):
    params = mlp_params(dtype)
    xs, ys = mlp_data(3, dtype=dtype)
    tx = optlab.sa_sam(0.1)

    @jax.jit
    def step(params, state, x, y):
        grad_fn = lambda p: mlp_grad(p, x, y)
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state, updates

    state = tx.init(params)
    for t in range(3):
        params, state, updates = step(params, state, xs[t], ys[t])
        assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
        assert all(p.dtype == dtype for p in jax.tree.leaves(params))
        assert all(p.dtype == dtype for p in jax.tree.leaves(state.prev_params))
        assert state.lr.dtype == state.theta.dtype == state.rho.dtype == jnp.float32
        assert np.isfinite(float(state.lr))


@pytest.mark.parametrize("form", ["paper", "practical"])
def test_orbax_round_trip_resumes_the_same_trajectory(tmp_path, form):
    params = mlp_params()
    xs, ys = mlp_data(5)
    tx = optlab.sa_sam(0.2, form=form)
    want, want_state, _ = run(tx, params, xs, ys)
    # Saved after one step: in the paper form θ is +inf there, which must survive too.
    mid, mid_state, _ = run(tx, params, xs[:1], ys[:1])
    if form == "paper":
        assert math.isinf(float(mid_state.theta))
    restored_params, restored_state = orbax_round_trip(tmp_path / "ckpt", mid, mid_state, tx)
    assert isinstance(restored_state, optlab.SASAMState)
    assert_trees_equal(restored_state, mid_state)
    got, got_state, _ = run(tx, restored_params, xs, ys, state=restored_state, start=1)
    assert_trees_equal(got, want)
    assert_trees_equal(got_state, want_state)


def _mesh():
    return jax.make_mesh(
        (8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:8]
    )


@pytest.mark.parametrize("rho_scale", [1.0, 0.0])
def test_shard_map_equals_vmap_simulation(rho_scale):
    params = mlp_params()
    xs, ys = mlp_data(4)  # 16 examples per step: 2 per worker
    tx = optlab.sa_sam(0.2, form="practical", rho_scale=rho_scale, axis_name="data")
    step = worker_step(tx)
    sharded = jax.jit(
        jax.shard_map(
            step, mesh=_mesh(), in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
        )
    )
    simulated = jax.jit(jax.vmap(step, in_axes=(None, None, 0, 0), axis_name="data", out_axes=0))
    p_shard, s_shard = params, tx.init(params)
    p_sim, s_sim = params, tx.init(params)
    for t in range(4):
        p_shard, s_shard = sharded(p_shard, s_shard, xs[t], ys[t])
        p_all, s_all = simulated(p_sim, s_sim, xs[t].reshape(8, 2, 3), ys[t].reshape(8, 2, 2))
        # Every simulated worker ends the step with the same params and the same η.
        for leaf in jax.tree.leaves((p_all, s_all)):
            np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[0], leaf.shape))
        p_sim, s_sim = jax.tree.map(lambda a: a[0], (p_all, s_all))
        assert_trees_close(p_shard, p_sim, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s_shard.lr, s_sim.lr, rtol=1e-5)
    if rho_scale == 0.0:
        # Without perturbation the per-worker points coincide, so 8 workers with the pmean-ed
        # smoothness estimate and gradient equal one device on the whole batch.
        want, want_state, _ = run(
            optlab.sa_sam(0.2, form="practical", rho_scale=0.0), params, xs, ys
        )
        assert_trees_close(p_shard, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s_shard.lr, want_state.lr, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"base_lr": 0.0}, "base_lr"),
        ({"base_lr": -0.1}, "base_lr"),
        ({"base_lr": optax.constant_schedule(0.1)}, "base_lr"),
        ({"form": "pytorch"}, "form"),
        ({"amplifier": -1.0}, "amplifier"),
        ({"damping": 0.0}, "damping"),
        ({"lr_eps": -1e-8}, "lr_eps"),
        ({"max_lr_factor": 0.5}, "max_lr_factor"),
        ({"max_lr_factor": math.inf}, "max_lr_factor"),
        ({"rho_scale": -1.0}, "rho_scale"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"axis_name": 3}, "axis_name"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, name):
    kwargs = {"base_lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=name):
        optlab.sa_sam(**kwargs)


def test_update_without_grad_fn_or_params_raises():
    tx = optlab.sa_sam(0.1)
    params = jnp.zeros(2)
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params), grad_fn=lambda p: p)


@pytest.mark.parametrize("form", ["paper", "practical"])
def test_converges_on_a_small_regression(form):
    params = mlp_params()
    xs, ys = mlp_data(1)
    x, y = xs[0], ys[0]
    tx = optlab.sa_sam(0.05, form=form)
    step = make_step(tx)
    state = tx.init(params)
    start = float(mlp_loss(params, x, y))
    for _ in range(150):
        params, state = step(params, state, x, y)
    end = float(mlp_loss(params, x, y))
    assert np.isfinite(end)
    assert end < 0.2 * start
    # The adaptive rule moved η away from its initial value.
    assert float(state.lr) != pytest.approx(0.05)

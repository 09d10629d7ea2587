"""optlab.dsgd / mixing_matrix / consensus_distance against explicit mixing matrices."""

from __future__ import annotations

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

import optlab

AXIS = "workers"
LR = 0.1
BETA = 0.9

# ----------------------------------------------------------------------------------------
# The reference: mixing matrices written from ALGORITHMS.md 12.3 and a plain NumPy loop.


def reference_w(topology: str, n: int, t: int = 0, shape: tuple[int, int] | None = None):
    w = np.zeros((n, n))
    if n == 1:
        return np.ones((1, 1))
    if topology == "ring":
        for i in range(n):
            w[i, i] = w[i, (i + 1) % n] = w[i, (i - 1) % n] = 1 / 3
    elif topology == "torus":
        r, c = shape
        for a in range(r):
            for b in range(c):
                i = a * c + b
                for aa, bb in ((a, b), (a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    w[i, (aa % r) * c + bb % c] = 1 / 5
    elif topology == "exponential":
        weight = 1 / (1 + math.floor(math.log2(n - 1)) + 1)
        for i in range(n):
            for s in [0] + [2**k for k in range(n) if 2**k < n]:
                w[i, (i + s) % n] = weight
    elif topology == "one_peer_exponential":
        peer = 2 ** (t % math.ceil(math.log2(n)))
        for i in range(n):
            w[i, i] += 0.5
            w[i, (i + peer) % n] += 0.5
    elif topology == "complete":
        w[:] = 1 / n
    return w


def _problem(n: int, seed: int = 0):
    """Worker i's loss 0.5 x^T A_i x - b_i^T x on a 5-vector split as {"u": 3, "v": 2}."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, 5, 5))
    a = np.einsum("nij,nkj->nik", m, m) / 5 + np.eye(5)
    b = rng.normal(size=(n, 5))
    x0 = rng.normal(size=(n, 5))
    return a, b, x0


def _split(x):
    return {"u": x[..., :3], "v": x[..., 3:]}


def _join(tree):
    return np.concatenate([np.asarray(tree["u"]), np.asarray(tree["v"])], axis=-1)


def reference_dsgd(topology, n, order, momentum, steps, shape=None, seed=0):
    a, b, x = _problem(n, seed)
    m = np.zeros_like(x)
    xs = []
    for t in range(steps):
        g = np.einsum("nij,nj->ni", a, x) - b
        if momentum:
            m = g + BETA * m
            u = -LR * m
        else:
            u = -LR * g
        w = reference_w(topology, n, t, shape)
        x = w @ x + u if order == "dpsgd" else w @ (x + u)
        xs.append(x.copy())
    return xs


def _step_fn(tx, a, b):
    def step(params, state, a_i, b_i):
        x = jnp.concatenate([params["u"], params["v"]])
        grads = _split(a_i @ x - b_i)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    del a, b
    return step


def run_vmap(tx, n, steps, seed=0, axis=AXIS):
    a, b, x0 = _problem(n, seed)
    params = _split(jnp.asarray(x0))
    state = jax.vmap(tx.init)(params)
    step = jax.jit(jax.vmap(_step_fn(tx, a, b), axis_name=axis))
    out = []
    for _ in range(steps):
        params, state = step(params, state, jnp.asarray(a), jnp.asarray(b))
        out.append(_join(params))
    return out, state


CASES = [
    ("ring", 8, None),
    ("torus", 9, (3, 3)),
    ("torus", 12, (3, 4)),
    ("exponential", 8, None),
    ("exponential", 6, None),
    ("one_peer_exponential", 8, None),
    ("one_peer_exponential", 6, None),
    ("complete", 8, None),
]


@pytest.mark.parametrize("momentum", [False, True], ids=["sgd", "momentum"])
@pytest.mark.parametrize("order", ["dpsgd", "atc"])
@pytest.mark.parametrize(("topology", "n", "shape"), CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_matches_explicit_mixing_matrix(x64, topology, n, shape, order, momentum):
    steps = 7
    inner = optax.sgd(LR, momentum=BETA if momentum else None)
    tx = optlab.dsgd(inner, topology, AXIS, order=order)
    got, state = run_vmap(tx, n, steps)
    want = reference_dsgd(topology, n, order, momentum, steps, shape)
    for t in range(steps):
        np.testing.assert_allclose(got[t], want[t], rtol=1e-12, atol=1e-12, err_msg=f"t={t}")
    assert isinstance(state, optlab.DSGDState)
    np.testing.assert_array_equal(state.count, np.full(n, steps))


# ----------------------------------------------------------------------------------------
# The matrices the code implies.


def implied_w(topology, n, t, **kw):
    """Row i of W is worker i's params after one gossip of the identity (zero gradients)."""
    tx = optlab.dsgd(optax.sgd(LR), topology, AXIS, **kw)

    def step(x):
        state = tx.init(x)._replace(count=jnp.asarray(t, jnp.int32))
        updates, _ = tx.update(jnp.zeros_like(x), state, x)
        return x + updates

    return np.asarray(jax.vmap(step, axis_name=AXIS)(jnp.eye(n, dtype=jnp.float64)))


@pytest.mark.parametrize(
    ("topology", "n", "shape"), [*CASES, ("ring", 3, None), ("ring", 16, None)]
)
def test_mixing_matrices_are_doubly_stochastic_and_are_what_the_code_applies(
    x64, topology, n, shape
):
    kw = {"torus_shape": shape} if shape else {}
    for t in range(4):
        w = optlab.mixing_matrix(topology, n, step=t, **kw)
        assert (w >= 0).all()
        np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-15)
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-15)
        np.testing.assert_allclose(w, reference_w(topology, n, t, shape), atol=1e-15)
        np.testing.assert_allclose(implied_w(topology, n, t, **kw), w, atol=1e-15)
    if topology in ("ring", "torus", "complete"):
        np.testing.assert_allclose(w, w.T)


def test_ring16_spectral_gap_and_default_torus_shape():
    w = optlab.mixing_matrix("ring", 16)
    lam = np.sort(np.abs(np.linalg.eigvals(w)))[::-1]
    np.testing.assert_allclose(lam[1], 1 / 3 + 2 / 3 * np.cos(2 * np.pi / 16), rtol=1e-12)
    np.testing.assert_allclose(
        optlab.mixing_matrix("torus", 12), reference_w("torus", 12, 0, (3, 4))
    )
    np.testing.assert_allclose(
        optlab.mixing_matrix("torus", 16), reference_w("torus", 16, 0, (4, 4))
    )


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_one_peer_exponential_averages_exactly_in_log2_n_steps(n):
    prod = np.eye(n)
    for t in range(int(math.log2(n))):
        prod = optlab.mixing_matrix("one_peer_exponential", n, step=t) @ prod
    np.testing.assert_allclose(prod, np.full((n, n), 1 / n), atol=1e-15)


def test_exponential_is_not_symmetric_but_circulant():
    w = optlab.mixing_matrix("exponential", 16)
    np.testing.assert_allclose(w[0, [0, 1, 2, 4, 8]], 0.2)
    assert not np.allclose(w, w.T)
    np.testing.assert_allclose(np.roll(w[0], 3), w[3])


# ----------------------------------------------------------------------------------------
# Edge cases: complete = exact averaging, one worker = inner.


@pytest.mark.parametrize("order", ["dpsgd", "atc"])
def test_complete_is_exact_averaging(x64, order):
    n = 8
    a, b, x0 = _problem(n)
    tx = optlab.dsgd(optax.sgd(LR), "complete", AXIS, order=order)
    got, _ = run_vmap(tx, n, 1)
    g = np.einsum("nij,nj->ni", a, x0) - b
    if order == "dpsgd":
        want = x0.mean(0) - LR * g
    else:
        want = np.broadcast_to((x0 - LR * g).mean(0), (n, 5))
    np.testing.assert_allclose(got[0], want, rtol=1e-13, atol=1e-13)
    # Zero gradients: every worker holds the mean after one step.
    zero = jax.vmap(lambda x: x + tx.update(jnp.zeros_like(x), tx.init(x), x)[0], axis_name=AXIS)(
        jnp.asarray(x0)
    )
    np.testing.assert_allclose(zero, np.broadcast_to(x0.mean(0), (n, 5)), rtol=1e-13)


@pytest.mark.parametrize(
    "topology", ["ring", "torus", "exponential", "one_peer_exponential", "complete"]
)
@pytest.mark.parametrize("order", ["dpsgd", "atc"])
def test_one_worker_is_the_inner_optimizer(x64, topology, order):
    a, b, x0 = _problem(1)
    inner = optax.sgd(LR, momentum=BETA)
    got, _ = run_vmap(optlab.dsgd(inner, topology, AXIS, order=order), 1, 5)
    want, _ = run_vmap(optlab.dsgd(inner, "complete", AXIS), 1, 5)
    x, m = x0[0], np.zeros(5)
    for t in range(5):
        m = (a[0] @ x - b[0]) + BETA * m
        x = x - LR * m
        np.testing.assert_allclose(got[t][0], x, rtol=1e-13)
        np.testing.assert_allclose(want[t][0], x, rtol=1e-13)


# ----------------------------------------------------------------------------------------
# vmap simulation equals shard_map on 8 CPU devices.


@pytest.mark.parametrize("order", ["dpsgd", "atc"])
@pytest.mark.parametrize("topology", ["ring", "exponential", "one_peer_exponential", "complete"])
def test_vmap_equals_shard_map(topology, order):
    n, steps = 8, 5
    mesh = jax.make_mesh((n,), ("gossip",), axis_types=(jax.sharding.AxisType.Auto,))
    tx = optlab.dsgd(optax.sgd(LR, momentum=BETA), topology, "gossip", order=order, num_workers=n)
    want, _ = run_vmap(tx, n, steps, axis="gossip")

    a, b, x0 = _problem(n)
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    params = _split(jnp.asarray(x0, jnp.float32))
    state = jax.vmap(tx.init)(params)
    step = _step_fn(tx, a, b)

    def local(p, s, a_i, b_i):
        squeeze = lambda tree: jax.tree.map(lambda v: v[0], tree)
        p, s = step(*squeeze((p, s, a_i, b_i)))
        dist = optlab.consensus_distance(p, "gossip")
        return jax.tree.map(lambda v: v[None], (p, s)), dist

    spec = P("gossip")
    s_step = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(spec, spec, spec, spec), out_specs=((spec, spec), P())
        )
    )
    for t in range(steps):
        (params, state), dist = s_step(params, state, a, b)
        x = _join(params)
        np.testing.assert_allclose(x, want[t], rtol=2e-5, atol=2e-6)
        want_dist = np.sqrt(np.mean(np.sum((want[t] - want[t].mean(0)) ** 2, axis=1)))
        np.testing.assert_allclose(dist, want_dist, rtol=1e-4)


@pytest.mark.parametrize(
    ("topology", "permutes", "conditionals", "all_reduces"),
    [
        ("ring", 2, 0, 0),
        ("exponential", 3, 0, 0),
        ("one_peer_exponential", 3, 1, 0),
        ("complete", 0, 0, 1),
    ],
)
def test_compiled_gossip_messages(topology, permutes, conditionals, all_reduces):
    """One ppermute per neighbour offset; one-peer picks one of log2(8) shifts by lax.switch."""
    mesh = jax.make_mesh((8,), ("gossip",), axis_types=(jax.sharding.AxisType.Auto,))
    tx = optlab.dsgd(optax.sgd(LR), topology, "gossip")

    def local(p, s):
        p, s = p[0], jax.tree.map(lambda v: v[0], s)
        u, s = tx.update(p, s, p)
        return (p + u)[None], jax.tree.map(lambda v: v[None], s)

    x = jnp.ones((8, 4))
    spec = P("gossip")
    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec)))
    hlo = f.lower(x, jax.vmap(tx.init)(x)).compile().as_text()
    assert len(re.findall(r"= \S+ collective-permute(?:-start)?\(", hlo)) == permutes
    assert len(re.findall(r" conditional\(", hlo)) == conditionals
    assert len(re.findall(r"all-reduce(?:-start)?\(", hlo)) == all_reduces


# ----------------------------------------------------------------------------------------
# consensus_distance.


def test_consensus_distance_matches_numpy(x64, rng):
    n = 8
    tree = {"a": rng.normal(size=(n, 3, 2)), "b": rng.normal(size=(n, 4))}
    got = jax.vmap(lambda p: optlab.consensus_distance(p, AXIS), axis_name=AXIS)(
        jax.tree.map(jnp.asarray, tree)
    )
    flat = np.concatenate([tree["a"].reshape(n, -1), tree["b"]], axis=1)
    want = np.sqrt(np.mean(np.sum((flat - flat.mean(0)) ** 2, axis=1)))
    np.testing.assert_allclose(got, np.full(n, want), rtol=1e-13)
    # Identical workers: exactly zero (and finite).
    same = jax.vmap(lambda p: optlab.consensus_distance(p, AXIS), axis_name=AXIS)(
        {"a": jnp.ones((n, 3))}
    )
    np.testing.assert_array_equal(same, np.zeros(n))


def test_consensus_distance_shrinks_under_gossip(x64):
    n = 8
    tx = optlab.dsgd(optax.sgd(0.0), "ring", AXIS)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(n, 4)))
    state = jax.vmap(tx.init)(x)

    def step(x, s):
        u, s = tx.update(jnp.zeros_like(x), s, x)
        return x + u, s, optlab.consensus_distance(x, AXIS)

    step = jax.jit(jax.vmap(step, axis_name=AXIS))
    dists = []
    for _ in range(6):
        x, state, d = step(x, state)
        dists.append(float(d[0]))
    assert all(d1 < d0 for d0, d1 in itertools.pairwise(dists))


# ----------------------------------------------------------------------------------------
# Composition: chain, inject_hyperparams, donated jit, Orbax.


def _train(tx, steps, params=None, state=None, donate=False):
    n = 8
    a, b, x0 = _problem(n, seed=2)
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if params is None:
        params = _split(jnp.asarray(x0, jnp.float32))
        state = jax.vmap(tx.init)(params)
    step = jax.jit(
        jax.vmap(_step_fn(tx, a, b), axis_name=AXIS), donate_argnums=(0, 1) if donate else ()
    )
    for _ in range(steps):
        params, state = step(params, state, a, b)
    return params, state


def test_chain_and_inject_hyperparams_with_traced_inner_learning_rate():
    def make(learning_rate):
        return optlab.dsgd(optax.sgd(learning_rate, momentum=BETA), "one_peer_exponential", AXIS)

    plain = optax.chain(optax.clip_by_global_norm(1e6), make(LR))
    injected = optax.chain(
        optax.clip_by_global_norm(1e6), optax.inject_hyperparams(make)(learning_rate=LR)
    )
    want, _ = _train(plain, 6)
    got, state = _train(injected, 6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), got, want)
    # The knob is traced: changing it in the state changes the step.
    hp = state[1].hyperparams
    assert hp["learning_rate"].shape == (8,)
    slower = state[1]._replace(hyperparams={"learning_rate": jnp.full((8,), LR / 2)})
    moved, _ = _train(injected, 1, got, (state[0], slower))
    ref, _ = _train(injected, 1, got, state)
    assert not np.allclose(_join(moved), _join(ref))


def test_donated_jitted_step_and_orbax_round_trip_resume_bitwise(tmp_path):
    tx = optlab.dsgd(optax.adam(0.05), "one_peer_exponential", AXIS, order="atc")
    full = _train(tx, 9)
    donated = _train(tx, 9, donate=True)
    jax.tree.map(np.testing.assert_array_equal, donated, full)

    half = _train(tx, 4)
    path = (tmp_path / "ckpt").absolute()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, half)
        ckpt.wait_until_finished()
        like = jax.eval_shape(lambda: half)
        restored = ckpt.restore(path, like)
    assert isinstance(restored[1], optlab.DSGDState)
    resumed = _train(tx, 5, *restored, donate=True)
    jax.tree.map(np.testing.assert_array_equal, resumed, full)


# ----------------------------------------------------------------------------------------
# Validation.


def test_bad_arguments_raise():
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"topology must be one of .*'ring'.*'complete'"):
        optlab.dsgd(sgd, "star", AXIS)
    with pytest.raises(ValueError, match="order must be one of"):
        optlab.dsgd(sgd, "ring", AXIS, order="cta")
    with pytest.raises(ValueError, match="axis_name must be a string"):
        optlab.dsgd(sgd, "ring", 3)
    with pytest.raises(ValueError, match=r"num_workers must be an integer >= 1"):
        optlab.dsgd(sgd, "ring", AXIS, num_workers=0)
    with pytest.raises(ValueError, match=r"'torus' needs .*num_workers=8.*2 x 4"):
        optlab.dsgd(sgd, "torus", AXIS, num_workers=8)
    with pytest.raises(ValueError, match=r"'torus' needs .*torus_shape=\(3, 4\)"):
        optlab.dsgd(sgd, "torus", AXIS, num_workers=9, torus_shape=(3, 4))
    with pytest.raises(ValueError, match="torus_shape applies to topology 'torus' only"):
        optlab.dsgd(sgd, "ring", AXIS, torus_shape=(3, 3))
    with pytest.raises(ValueError, match="torus_shape must be a"):
        optlab.dsgd(sgd, "torus", AXIS, torus_shape=9)
    with pytest.raises(ValueError, match=r"'ring' needs num_workers == 1 or >= 3"):
        optlab.dsgd(sgd, "ring", AXIS, num_workers=2)
    with pytest.raises(ValueError, match="topology must be one of"):
        optlab.mixing_matrix("star", 4)


def test_trace_time_errors_name_the_worker_count():
    x = jnp.ones((8, 2))

    def run(tx):
        return jax.vmap(lambda p: tx.update(p, tx.init(p), p)[0], axis_name=AXIS)(x)

    with pytest.raises(ValueError, match=r"'torus' needs .*num_workers=8"):
        run(optlab.dsgd(optax.sgd(0.1), "torus", AXIS))
    with pytest.raises(ValueError, match=r"num_workers=4, but axis 'workers' has size 8"):
        run(optlab.dsgd(optax.sgd(0.1), "ring", AXIS, num_workers=4))
    tx = optlab.dsgd(optax.sgd(0.1), "ring", AXIS)
    with pytest.raises(ValueError, match="dsgd needs params"):
        jax.vmap(lambda p: tx.update(p, tx.init(p)), axis_name=AXIS)(x)


def test_unbound_axis_says_where_update_must_run():
    tx = optlab.dsgd(optax.sgd(0.1), "ring", AXIS)
    x = jnp.ones(3)
    with pytest.raises(ValueError, match=r"inside jax.vmap\(..., axis_name='workers'\)"):
        tx.update(x, tx.init(x), x)


@pytest.mark.parametrize("order", ["dpsgd", "atc"])
@pytest.mark.parametrize("topology", ["ring", "one_peer_exponential", "complete"])
def test_dtypes_are_preserved(topology, order):
    tx = optlab.dsgd(optax.sgd(0.5), topology, AXIS, order=order)
    rng = np.random.default_rng(4)
    params = {
        "half": jnp.asarray(rng.normal(size=(8, 3)), jnp.bfloat16),
        "single": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
    }

    def step(p):
        updates, _state = tx.update(p, tx.init(p), p)
        return updates, optax.apply_updates(p, updates)

    updates, new = jax.vmap(step, axis_name=AXIS)(params)
    for name, leaf in params.items():
        assert updates[name].dtype == leaf.dtype
        assert new[name].dtype == leaf.dtype
    w = optlab.mixing_matrix(topology, 8)
    half = np.asarray(params["half"], np.float64)
    want = w @ half - 0.5 * half if order == "dpsgd" else 0.5 * (w @ half)
    np.testing.assert_allclose(np.asarray(new["half"], np.float64), want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("topology", ["ring", "exponential", "one_peer_exponential"])
def test_converges_to_the_global_minimiser_with_a_decaying_rate(x64, topology):
    """Heterogeneous quadratics: every worker ends near argmin sum_i f_i, not its own."""
    n = 8
    a, b, x0 = _problem(n, seed=5)
    x_star = np.linalg.solve(a.sum(0), b.sum(0))
    tx = optlab.dsgd(optax.sgd(optax.polynomial_schedule(0.2, 0.0, 1, 400)), topology, AXIS)

    def run(x, a_i, b_i):
        def body(carry, _):
            x, s = carry
            u, s = tx.update(a_i @ x - b_i, s, x)
            return (x + u, s), None

        (x, _), _ = jax.lax.scan(body, (x, tx.init(x)), length=400)
        return x, optlab.consensus_distance(x, AXIS)

    x, dist = jax.jit(jax.vmap(run, axis_name=AXIS))(*map(jnp.asarray, (x0, a, b)))
    np.testing.assert_allclose(np.asarray(x).mean(0), x_star, atol=2e-2)
    assert float(dist[0]) < 2e-2
    assert np.linalg.norm(np.linalg.solve(a[0], b[0]) - x_star) > 0.1  # heterogeneous

"""Shared harness for the worker-axis optimizers (local_sgd, diloco): problems, float64 NumPy
references of the inner/outer optimizers, vmap and shard_map runners, and HLO checks.

Every worker i has its own quadratic, grad_i(x) = A x - d_i(t), with d_i(t) = b_i + noise,
fixed per step and worker, so the workers drift apart between syncs.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

AXIS = "workers"
DIM = 5


def worker_problem(rng: np.random.Generator, workers: int, steps: int):
    """(A, data[t, i], x0): grad_i(t, x) = A x - data[t, i]."""
    m = rng.normal(size=(DIM, DIM))
    a = m @ m.T / DIM + np.eye(DIM)
    b = 2.0 * rng.normal(size=(workers, DIM))
    data = b[None] + 0.3 * rng.normal(size=(steps, workers, DIM))
    return a, data, rng.normal(size=DIM)


# ----------------------------------------------------------------------------------------
# References written from the equations (NumPy, float64).


class NumpySGD:
    """optax.sgd(lr, momentum=beta, nesterov=...): m <- g + beta m; x <- x - lr m (or
    x <- x - lr (g + beta m) for Nesterov). ``lr`` may be a function of the step count."""

    def __init__(self, lr, beta: float = 0.0, nesterov: bool = False):
        self.lr, self.beta, self.nesterov = lr, beta, nesterov

    def init(self, x):
        return {"m": np.zeros_like(x), "t": 0}

    def step(self, x, g, s):
        m = g + self.beta * s["m"]
        lr = self.lr(s["t"]) if callable(self.lr) else self.lr
        direction = g + self.beta * m if self.nesterov else m
        return x - lr * direction, {"m": m, "t": s["t"] + 1}


class NumpyAdam:
    """optax.adam(lr): bias-corrected moments, eps outside the square root."""

    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps

    def init(self, x):
        return {"m": np.zeros_like(x), "v": np.zeros_like(x), "t": 0}

    def step(self, x, g, s):
        t = s["t"] + 1
        m = self.b1 * s["m"] + (1 - self.b1) * g
        v = self.b2 * s["v"] + (1 - self.b2) * g * g
        m_hat, v_hat = m / (1 - self.b1**t), v / (1 - self.b2**t)
        return x - self.lr * m_hat / (np.sqrt(v_hat) + self.eps), {"m": m, "v": v, "t": t}


def mean_states(states):
    """Averages the float arrays of the workers' NumPy states (counters are equal)."""
    out = {}
    for key in states[0]:
        vals = [s[key] for s in states]
        out[key] = np.mean(vals, axis=0) if isinstance(vals[0], np.ndarray) else vals[0]
    return [dict(out) for _ in states]


def clip(g, max_norm):
    """optax.clip_by_global_norm on one array."""
    norm = np.linalg.norm(g)
    return g * (max_norm / norm) if norm > max_norm else g


# ----------------------------------------------------------------------------------------
# Runners: the same per-worker step under vmap (one device) and shard_map (one per device).


def make_step(tx, a):
    """One worker's step: grads from its data, then ``tx`` (the step count is in the state)."""
    a = jnp.asarray(a)

    def step(params, state, data):
        grads = {"w": a @ params["w"] - data.astype(params["w"].dtype)}
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def replicate(tree, workers: int):
    return jax.tree.map(lambda v: jnp.broadcast_to(jnp.asarray(v), (workers, *jnp.shape(v))), tree)


def init_workers(tx, x0, workers: int, dtype=None):
    params = {"w": jnp.asarray(x0, dtype)}
    return replicate(params, workers), replicate(tx.init(params), workers)


def run_vmap(tx, a, data, x0, *, donate: bool = False):
    """Runs ``len(data)`` steps on ``data.shape[1]`` simulated workers; returns the params
    after every step, shape (steps, workers, DIM), and the final (params, state)."""
    workers = data.shape[1]
    params, state = init_workers(tx, x0, workers)
    step = jax.jit(
        jax.vmap(make_step(tx, a), axis_name=AXIS), donate_argnums=(0, 1) if donate else ()
    )
    xs = []
    for t in range(len(data)):
        params, state = step(params, state, jnp.asarray(data[t]))
        xs.append(np.asarray(params["w"]))
    return np.array(xs), (params, state)


def worker_mesh(workers: int) -> jax.sharding.Mesh:
    return jax.make_mesh(
        (workers,),
        (AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:workers],
    )


def shard_map_step(tx, a, workers: int):
    """The per-worker step under shard_map: one worker per device, leading axis sharded."""
    step = make_step(tx, a)

    def body(params, state, data):
        out = step(*jax.tree.map(lambda v: v[0], (params, state, data)))
        return jax.tree.map(lambda v: v[None], out)

    spec = P(AXIS)
    return jax.jit(
        jax.shard_map(body, mesh=worker_mesh(workers), in_specs=(spec,) * 3, out_specs=spec)
    )


def run_shard_map(tx, a, data, x0):
    workers = data.shape[1]
    params, state = init_workers(tx, x0, workers)
    step = shard_map_step(tx, a, workers)
    xs = []
    for t in range(len(data)):
        params, state = step(params, state, jnp.asarray(data[t]))
        xs.append(np.asarray(params["w"]))
    return np.array(xs), (params, state)


# ----------------------------------------------------------------------------------------
# Compiled-program checks.


_COLLECTIVE = re.compile(
    r"\b(all-reduce|all-reduce-start|all-gather|all-gather-start|collective-permute|"
    r"all-to-all)\("
)


def collectives_by_computation(hlo: str) -> dict[str, int]:
    """The number of all-reduce (and other cross-worker) ops per HLO computation."""
    out = {}
    for computation in re.split(r"\n(?=%|ENTRY)", hlo):
        name = computation.split(" ", 1)[0]
        n = len(_COLLECTIVE.findall(computation))
        if n:
            out[name] = n
    return out


def _calls(hlo: str) -> dict[str, tuple[list[str], list[list[str]], int]]:
    """Per computation: the computations it calls (not as a branch: fusions, reductions,
    while loops' bodies and conditions), its conditionals' branch lists, and its own number
    of collectives."""
    out = {}
    for comp in re.split(r"\n(?=%|ENTRY)", hlo):
        head = comp.split(" ", 2)
        name = head[1] if head[0] == "ENTRY" else head[0]
        callees = re.findall(r"(?:calls|to_apply|body|condition)=(%[\w.\-]+)", comp)
        branches = [
            [b.strip() for b in m.split(",")]
            for m in re.findall(r"branch_computations=\{([^}]*)\}", comp)
        ]
        out[name] = (callees, branches, len(_COLLECTIVE.findall(comp)))
    return out


def assert_collectives_only_in_silent_alternatives(hlo: str) -> int:
    """Checks a compiled module's text: there is a collective, none is reachable from ENTRY
    without passing a conditional (none runs on every step), and every top-level
    conditional that reaches a collective (directly in a branch, or through calls and while
    loops under it, as ``optlab._control.run_if`` compiles) has a branch that reaches none
    (the silent path). Returns the number of those guarded top-level conditionals."""
    graph = _calls(hlo)
    entry = re.search(r"ENTRY (%?[\w.\-]+)", hlo).group(1)

    def reaches(name, seen):
        if name in seen or name not in graph:
            return 0
        seen.add(name)
        callees, branches, n = graph[name]
        return n + sum(reaches(c, seen) for c in callees + [b for bs in branches for b in bs])

    def top_level(name, seen, conditionals):
        """Collectives run unconditionally from ``name``; collects its conditionals."""
        if name in seen or name not in graph:
            return 0
        seen.add(name)
        callees, branches, n = graph[name]
        conditionals.extend(branches)
        return n + sum(top_level(c, seen, conditionals) for c in callees)

    conditionals: list[list[str]] = []
    assert reaches(entry, set()) > 0, "no collective at all"
    assert top_level(entry, set(), conditionals) == 0, "a collective runs on every step"
    guarded = 0
    for branches in conditionals:
        counts = [reaches(b, set()) for b in branches]
        if any(counts):
            assert min(counts) == 0, f"no silent branch: {branches} {counts}"
            guarded += 1
    return guarded


def assert_collectives_only_in_sync_branch(
    tx, a, workers: int, dtype=jnp.float32, *, conditionals: int = 1
):
    """Compiles the shard_map step and checks (``assert_collectives_only_in_silent_
    alternatives``) that no collective runs on every step and that they all sit under
    ``conditionals`` top-level conditionals, each with a silent branch (the off-sync step).
    Returns the collectives per computation."""
    step = shard_map_step(tx, a, workers)
    params, state = init_workers(tx, np.zeros(DIM), workers, dtype)
    data = jnp.zeros((workers, DIM), dtype)
    hlo = step.lower(params, state, data).compile().as_text()
    found = collectives_by_computation(hlo)
    assert found, "no collective at all: the sync branch was compiled away"
    guarded = assert_collectives_only_in_silent_alternatives(hlo)
    assert guarded == conditionals, (guarded, conditionals, found)
    return found


def assert_orbax_resume_is_bitwise(tx, a, data, x0, workers, *, steps, split, state_type, path):
    """Train ``steps``; train ``split``, save with Orbax mid-period, restore, finish: equal bits.

    Also checks that the save falls between syncs (the workers' params differ there) and
    that the state comes back as ``state_type`` (a NamedTuple, not a dict).
    """
    import orbax.checkpoint as ocp

    step = jax.jit(jax.vmap(make_step(tx, a.astype(np.float32)), axis_name=AXIS))

    def run(params, state, start, stop):
        for t in range(start, stop):
            params, state = step(params, state, jnp.asarray(data[t]))
        return params, state

    start = init_workers(tx, x0.astype(np.float32), workers)
    full = run(*start, 0, steps)
    half = run(*start, 0, split)
    assert np.ptp(np.asarray(half[0]["w"]), axis=0).max() > 0  # saved between syncs
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, half)
        ckpt.wait_until_finished()
        restored = ckpt.restore(path, jax.eval_shape(lambda: half))
    assert isinstance(restored[1], state_type)
    jax.tree.map(np.testing.assert_array_equal, restored, half)
    resumed = run(*restored, split, steps)
    jax.tree.map(np.testing.assert_array_equal, resumed, full)

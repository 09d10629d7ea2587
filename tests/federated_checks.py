"""Shared harness for the federated transforms (fedavg, fedaware, fedga): a float64 NumPy
reference of a federated round written from the equations (ALGORITHMS.md 2.4, 8.2, 9.2),
the official min-norm Frank-Wolfe restated in NumPy, a wrapper feeding ``active`` (and a
``grad_fn``) to the worker-axis runners of ``worker_axis_checks``, and a runner that
applies its HLO check (every collective sits under a conditional with a silent branch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from worker_axis_checks import (
    assert_collectives_only_in_silent_alternatives,
    init_workers,
    shard_map_step,
)

# ----------------------------------------------------------------------------------------
# References (NumPy, float64).


def np_two_point(v1v1, v1v2, v2v2):
    """The official ``_min_norm_element_from2``: (gamma, cost) for gamma v1 + (1-gamma) v2."""
    if v1v2 >= v1v1:
        return 0.999, v1v1
    if v1v2 >= v2v2:
        return 0.001, v2v2
    gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def np_min_norm_fw(gram, max_iters=1000, tol=1e-5):
    """The official ``find_min_norm_element_FW`` on a Gram matrix, as plain loops."""
    n = len(gram)
    if n == 1:
        return np.ones(1)
    dmin, best = 1e8, None
    for i in range(n):
        for j in range(i + 1, n):
            c, d = np_two_point(gram[i, i], gram[i, j], gram[j, j])
            if d < dmin:
                dmin, best = d, (i, j, c)
    sol = np.zeros(n)
    sol[best[0]], sol[best[1]] = best[2], 1 - best[2]
    if n < 3:
        return sol
    for _ in range(max_iters):
        t = int(np.argmin(gram @ sol))
        nc, _ = np_two_point(sol @ gram @ sol, sol @ gram[:, t], gram[t, t])
        new = nc * sol
        new[t] += 1 - nc
        if np.sum(np.abs(new - sol)) < tol:
            return sol
        sol = new
    return sol


def reference_rounds(
    grad,
    x0,
    steps,
    workers,
    client,
    server,
    local_steps,
    *,
    masks=None,
    weights=None,
    reset=True,
    method="fedavg",
    beta=0.0,
    alpha=0.5,
    projection=False,
):
    """Federated rounds from the equations; ``grad(i, t, x)`` is client i's gradient at step t.

    Returns the clients' params after every step ``[steps, workers, DIM]`` and the final
    server model. ``masks[r]`` are round r's participants (None: everyone).
    """
    w = np.ones(workers) if weights is None else np.asarray(weights, float)
    x, s_state = x0.copy(), server.init(x0)
    xs = [x0.copy() for _ in range(workers)]
    c_states = [client.init(x0) for _ in range(workers)]
    momentum = [np.zeros_like(x0) for _ in range(workers)]
    seen = [False] * workers
    out = []
    for t in range(steps):
        part = [i for i in range(workers) if masks is None or masks[t // local_steps][i]]
        if method == "fedga" and t % local_steps == 0 and part:
            g = {i: grad(i, t, xs[i]) for i in part}
            g_bar = np.mean([g[i] for i in part], axis=0)
            for i in part:  # x_i = x - beta (g_bar - g_i)
                xs[i] = xs[i] - beta * (g_bar - g[i])
        for i in part:
            xs[i], c_states[i] = client.step(xs[i], grad(i, t, xs[i]), c_states[i])
        if (t + 1) % local_steps == 0:
            d = {i: x - xs[i] for i in part}
            direction = None
            if method == "fedaware":
                for i in part:
                    momentum[i] = (1 - alpha) * momentum[i] + alpha * d[i]
                    seen[i] = True
                if all(seen):
                    units = []
                    for m in momentum:
                        norm = np.linalg.norm(m)
                        units.append(m / (1.0 if norm == 0 else norm))
                    units = np.array(units)
                    lam = np_min_norm_fw(units @ units.T)
                    direction = lam @ units
                    if projection:
                        m_bar = np.sum([w[i] * momentum[i] for i in range(workers)], 0) / w.sum()
                        direction = (m_bar @ direction) / (direction @ direction) * direction
            if direction is None and part and sum(w[i] for i in part) > 0:
                direction = sum(w[i] * d[i] for i in part) / sum(w[i] for i in part)
            if direction is not None:
                x, s_state = server.step(x, direction, s_state)
            xs = [x.copy() for _ in range(workers)]
            if reset:
                c_states = [client.init(x) for _ in range(workers)]
        out.append(np.array(xs))
    return np.array(out), x


# ----------------------------------------------------------------------------------------
# Feeding the extra args through the worker-axis runners.


def federated_state(opt_state):
    is_fed = lambda n: hasattr(n, "anchor") and hasattr(n, "participating")
    (found,) = [n for n in jax.tree.leaves(opt_state, is_leaf=is_fed) if is_fed(n)]
    return found


def with_extras(tx, local_steps, masks=None, a=None):
    """``tx`` whose ``update`` also receives ``active = masks[round]`` (a ``[W]`` mask,
    indexed by the transform itself) and, with ``a``, ``grad_fn`` of the quadratic
    ``grads + a (p - params)``. The state is ``tx``'s own (same type, same checkpoints)."""
    masks = None if masks is None else jnp.asarray(masks)

    def update(updates, state, params=None, **extra):
        if masks is not None:
            count = federated_state(state).count
            extra["active"] = masks[jnp.minimum(count // local_steps, len(masks) - 1)]
        if a is not None:
            a_ = jnp.asarray(a, params["w"].dtype)
            extra["grad_fn"] = lambda p: {"w": updates["w"] + a_ @ (p["w"] - params["w"])}
        return tx.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def random_masks(rng, rounds, workers, per_round):
    masks = np.zeros((rounds, workers), bool)
    for r in range(rounds):
        masks[r, rng.choice(workers, per_round, replace=False)] = True
    return masks


# ----------------------------------------------------------------------------------------
# Compiled-program check.


def shard_map_run_and_check(tx, a, data, x0, *, conditionals: int):
    """Runs ``tx`` under shard_map (one client per device) through ONE compiled step and
    checks its HLO: no collective runs unconditionally, and every top-level conditional
    that reaches a collective has a branch that reaches none (the off-round path); there
    are ``conditionals`` of those.

    Returns the params after every step and the final state, like ``run_shard_map``.
    """
    workers = data.shape[1]
    params, state = init_workers(tx, x0, workers)
    step = shard_map_step(tx, a, workers).lower(params, state, jnp.asarray(data[0])).compile()
    assert assert_collectives_only_in_silent_alternatives(step.as_text()) == conditionals
    xs = []
    for t in range(len(data)):
        params, state = step(params, state, jnp.asarray(data[t]))
        xs.append(np.asarray(params["w"]))
    return np.array(xs), (params, state)

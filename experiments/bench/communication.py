"""Communication of the worker-axis methods (issue #10): bytes per step, step time, PALSGD.

Every method trains the MLP on digits with one worker per device under ``jax.shard_map``
(W CPU devices, a batch of ``batch_size`` per worker), the way a real cluster runs it:

(a) **bytes per step**, read from the compiled program (``.compile().as_text()``): the
    result bytes of every ``all-reduce``, ``all-gather``, ``reduce-scatter``,
    ``all-to-all`` and ``collective-permute`` a device runs (for all-reduce and
    collective-permute the payload it sends in, not the wire bytes of a particular
    all-reduce algorithm; XLA:CPU prints them synchronous, not as ``-start``/``-done``
    pairs), each weighted by how often it runs: an
    op inside a branch of a two-way ``conditional`` (the sync ``lax.cond`` of Local SGD,
    DiLoCo and PALSGD) counts ``1/H``, one inside a k-way ``conditional`` (a
    ``lax.switch`` over gossip rounds) ``1/k``, nested weights multiply. That is the mean
    over a period of H steps. Ratios are against synchronous DP (``optlab.mean_gradients``:
    one all-reduce of the gradient every step); the goal is ``<= 1/H`` for Local SGD and
    DiLoCo. Methods are built without warm-up / synchronous start (their steady state).
(b) **step time** of the same compiled steps, interleaved round-robin, relative to DP. On
    a CPU host the W "devices" share the host's cores and the "network" is memory, so
    this shows the compute and synchronisation overhead, not bandwidth savings.
(c) **PALSGD's skipped gradients**: the PALSGD step with the forward/backward under a
    ``lax.cond`` on ``optlab.palsgd_is_pseudo_sync`` (each device's own coin: a real
    branch), run for ``palsgd_steps`` steps; the gradient evaluations it performed and
    saved (expected: a fraction ``p``), and its step time against the same step always
    taking the gradient.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optlab
from experiments.bench.report import format_table
from experiments.bench.timing import interleaved_times, median

__all__ = [
    "COLLECTIVES",
    "bench_communication",
    "collective_bytes",
    "format_communication",
    "methods",
]

AXIS = "workers"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
}  # fmt: skip
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OPCODE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """``{name: instruction lines}`` and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and not line.startswith(" "):
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.startswith("}"):
            current = None
        else:
            comps[current].append(line)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def collective_bytes(hlo: str, sync_period: int = 1) -> dict[str, float]:
    """Result bytes of the collectives per step, by op kind, weighted by how often they run.

    ``hlo`` is a compiled module's text. An op in a branch of a two-way ``conditional``
    runs on ``1/sync_period`` of the steps, one in a k-way (k > 2) ``conditional`` on
    ``1/k``; weights multiply through nesting; every other call (fusions, loops' bodies,
    reductions) inherits its caller's weight. Returns ``{op: bytes, "total": bytes}``.
    """
    comps, entry = _computations(hlo)
    weight: dict[str, float] = {}

    def visit(name: str, w: float) -> None:
        weight[name] = weight.get(name, 0.0) + w
        for line in comps.get(name, ()):
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            pair = re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
            if branches or pair:
                names = (
                    [b.strip().lstrip("%") for b in branches.group(1).split(",")]
                    if branches
                    else pair
                )
                share = 1.0 / sync_period if len(names) == 2 else 1.0 / len(names)
                for b in names:
                    visit(b, w * share)
                continue
            for called in re.findall(
                r"(?:calls|to_apply|body|condition|called_computations)=\{?%?([\w.\-]+)", line
            ):
                if called in comps and called != name:
                    visit(called, w)

    visit(entry, 1.0)
    out = {op: 0.0 for op in COLLECTIVES}
    for name, lines in comps.items():
        for line in lines:
            if " = " not in line:
                continue
            rhs = line.split(" = ", 1)[1]
            m = _OPCODE.search(rhs)
            if m:  # the result's shape: the operands' for all-reduce and collective-permute
                out[m.group(1)] += weight.get(name, 0.0) * _shape_bytes(rhs[: m.start()])
    out["total"] = sum(out[op] for op in COLLECTIVES)
    return out


def methods(
    sync_period: int, lr: float = 0.05, *, prob: float = 0.2
) -> dict[str, tuple[Callable[[Any], optax.GradientTransformation], int]]:
    """``{name: (make(axis_name) -> transform, the period its conditionals use)}``."""
    h = sync_period

    def inner() -> optax.GradientTransformation:
        return optax.sgd(lr, momentum=0.9)

    return {
        "dp (mean_gradients)": (
            lambda a: optax.chain(optlab.mean_gradients(a), inner()),
            1,
        ),
        f"local_sgd(H={h})": (lambda a: optlab.local_sgd(inner(), h, a), h),
        f"diloco(H={h})": (lambda a: optlab.diloco(inner(), None, h, a), h),
        f"palsgd(H={h},p={prob:g})": (
            lambda a: optlab.palsgd(
                optax.trace(0.9), None, h, a, learning_rate=lr, prob=prob, seed=0
            ),
            h,
        ),
        "dsgd(ring)": (lambda a: optlab.dsgd(inner(), "ring", a), 1),
        "dsgd(one_peer_exponential)": (
            lambda a: optlab.dsgd(inner(), "one_peer_exponential", a),
            1,
        ),
        "gradalign(beta=0.1)": (lambda a: optlab.gradalign(inner(), 0.1, a), 1),
    }


def _problem(workers: int, batch_size: int):
    """The MLP on digits: init params, a loss, and one batch per worker (fixed)."""
    from experiments.data import load_dataset
    from experiments.models import make_model

    data = load_dataset("digits")
    model = make_model("mlp", num_classes=data.num_classes)
    params, model_state = model.init(jax.random.key(0), jnp.asarray(data.x_train[:1]))
    rng = np.random.default_rng(0)
    idx = rng.choice(len(data.x_train), (workers, batch_size), replace=False)
    batch = {"x": jnp.asarray(data.x_train[idx]), "y": jnp.asarray(data.y_train[idx])}

    def loss(p, b):
        logits, _ = model.apply(p, model_state, b["x"], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

    return params, loss, batch


def _step_fn(tx, loss, skip: bool | None):
    """One worker's step; ``skip``: the gradient under a cond on the PALSGD coin."""

    def step(params, state, batch):
        params, state, batch = jax.tree.map(lambda a: a[0], (params, state, batch))
        grad_fn = lambda p: jax.grad(loss)(p, batch)
        if skip is None:
            grads = grad_fn(params)
            evals = jnp.ones((), jnp.int32)
        else:
            pred = optlab.palsgd_is_pseudo_sync(state) & skip
            grads = jax.lax.cond(pred, lambda p: jax.tree.map(jnp.zeros_like, p), grad_fn, params)
            evals = (~pred).astype(jnp.int32)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        params = optax.apply_updates(params, updates)
        return jax.tree.map(lambda a: a[None], (params, state, evals))

    return step


def _compiled(make, loss, params, batch, workers: int, skip: bool | None = None):
    """The jitted shard_map step over ``workers`` devices, its inputs and its HLO text."""
    mesh = jax.make_mesh(
        (workers,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:workers],
    )  # fmt: skip
    tx = make(AXIS)
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (workers, *a.shape)), params)
    state = jax.vmap(tx.init)(stacked)
    spec = P(AXIS)
    sharded = NamedSharding(mesh, spec)
    put = lambda t: jax.device_put(jax.tree.map(jnp.copy, t), sharded)
    fn = jax.jit(
        jax.shard_map(
            _step_fn(tx, loss, skip),
            mesh=mesh,
            in_specs=(spec, spec, spec),
            out_specs=(spec, spec, spec),
            check_vma=False,
        ),
        donate_argnums=(0, 1),
    )
    args = (put(stacked), put(state), put(batch))
    hlo = fn.lower(*args).compile().as_text()
    return fn, args, hlo


def bench_communication(
    *,
    workers: int = 8,
    sync_period: int = 8,
    batch_size: int = 16,
    reps: int = 20,
    steps_per_rep: int = 8,
    palsgd_steps: int = 200,
    prob: float = 0.2,
) -> dict[str, Any]:
    """The three measurements above; ``workers`` devices must exist (CPU: set
    ``jax_num_cpu_devices`` before the first JAX operation)."""
    if jax.device_count() < workers:
        raise ValueError(
            f"the communication bench needs {workers} devices, JAX sees {jax.device_count()}; "
            "on CPU set jax.config.update('jax_num_cpu_devices', N) before any JAX operation."
        )
    params, loss, batch = _problem(workers, batch_size)
    table = methods(sync_period, prob=prob)
    rows: list[dict[str, Any]] = []
    runners = {}
    param_bytes = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(params))
    for name, (make, period) in table.items():
        fn, args, hlo = _compiled(make, loss, params, batch, workers)
        comm = collective_bytes(hlo, period)
        rows.append({"name": name, "sync_period": period, "bytes": comm})
        runners[name] = _runner(fn, args, steps_per_rep)
    palsgd_name = next(n for n in table if n.startswith("palsgd"))
    make = table[palsgd_name][0]
    skip_fn, skip_args, _ = _compiled(make, loss, params, batch, workers, skip=True)
    full_fn, full_args, _ = _compiled(make, loss, params, batch, workers, skip=False)
    runners[palsgd_name + " skipping"] = _runner(skip_fn, skip_args, steps_per_rep)
    runners[palsgd_name + " no skip"] = _runner(full_fn, full_args, steps_per_rep)
    times = interleaved_times(runners, reps=reps, desc="communication")
    dp = rows[0]
    dp_time = median(times[dp["name"]]) / steps_per_rep
    for r in rows:
        r["bytes_per_step"] = r["bytes"]["total"]
        r["bytes_ratio_to_dp"] = (
            r["bytes_per_step"] / dp["bytes"]["total"] if dp["bytes"]["total"] else None
        )
        r["step_time_s"] = median(times[r["name"]]) / steps_per_rep
        r["time_ratio_to_dp"] = r["step_time_s"] / dp_time
    # (c) gradient evaluations actually performed by the skipping step (fresh state).
    fn, args, _ = _compiled(make, loss, params, batch, workers, skip=True)
    p, s, b = args
    performed = np.zeros(workers, np.int64)
    for _ in range(palsgd_steps):
        p, s, evals = fn(p, s, b)
        performed += np.asarray(evals)
    skip_time = median(times[palsgd_name + " skipping"]) / steps_per_rep
    full_time = median(times[palsgd_name + " no skip"]) / steps_per_rep
    return {
        "workers": workers,
        "sync_period": sync_period,
        "batch_size": batch_size,
        "param_bytes": param_bytes,
        "methods": rows,
        "goal": {"max_ratio": 1.0 / sync_period, "applies_to": ["local_sgd", "diloco"]},
        "palsgd": {
            "name": palsgd_name,
            "prob": prob,
            "steps": palsgd_steps,
            "grad_evals_per_worker": performed.tolist(),
            "saved_fraction": float(1.0 - performed.mean() / palsgd_steps),
            "step_time_s": skip_time,
            "no_skip_step_time_s": full_time,
            "time_ratio": skip_time / full_time,
        },
    }


def _runner(fn, args, steps: int) -> Callable[[], object]:
    """Runs ``steps`` steps from (and back into) ``args``, blocking at the end."""
    holder = list(args)

    def run() -> object:
        p, s, b = holder
        for _ in range(steps):
            p, s, _ = fn(p, s, b)
        holder[0], holder[1] = p, s
        return jax.block_until_ready(p)

    return run


def format_communication(result: Mapping[str, Any]) -> str:
    """The communication tables of :func:`bench_communication`."""
    if "skipped" in result:
        return f"Communication: skipped, {result['skipped']}."
    h = result["sync_period"]
    rows: Sequence[Mapping[str, Any]] = result["methods"]
    goal = result["goal"]["max_ratio"]

    def mark(r) -> str:
        if not r["name"].startswith(("local_sgd", "diloco")):
            return ""
        return " met" if r["bytes_ratio_to_dp"] <= goal * (1 + 1e-9) else " MISSED"

    pal = result["palsgd"]
    return "\n".join(
        [
            f"Communication: {result['workers']} workers, one per device (shard_map), MLP on "
            f"digits, batch {result['batch_size']} per worker, params "
            f"{result['param_bytes'] / 1024:.1f} KiB. Bytes = result bytes of the compiled "
            f"collectives per step and device, sync branches weighted 1/H (H={h}); goal for "
            f"local_sgd and diloco: <= 1/H = {goal:.3f} of DP.",
            format_table(
                ["method", "bytes/step", "vs dp", "all-reduce", "permute", "step ms", "time vs dp"],
                [
                    [
                        r["name"],
                        f"{r['bytes_per_step']:.0f}",
                        f"{r['bytes_ratio_to_dp']:.3f}{mark(r)}",
                        f"{r['bytes']['all-reduce']:.0f}",
                        f"{r['bytes']['collective-permute']:.0f}",
                        f"{1e3 * r['step_time_s']:.3f}",
                        f"{r['time_ratio_to_dp']:.2f}x",
                    ]
                    for r in rows
                ],
            ),
            f"PALSGD ({pal['name']}): {pal['steps']} steps with the forward/backward under a "
            f"cond on each device's own coin: gradient evaluations per worker "
            f"{pal['grad_evals_per_worker']}, saved {100 * pal['saved_fraction']:.1f} % "
            f"(p = {pal['prob']:g}); step {1e3 * pal['step_time_s']:.3f} ms vs "
            f"{1e3 * pal['no_skip_step_time_s']:.3f} ms always taking it "
            f"({pal['time_ratio']:.2f}x).",
        ]
    )

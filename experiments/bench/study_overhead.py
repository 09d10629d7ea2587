"""A study's wall time against its training compute, for 1, 5 and 20 seeds.

The harness's goal: a study's wall time is at most 1.3x its training compute. Both are
measured here side by side, for the MLP on digits with momentum SGD:

- **compute**: the very program the study trains with (``log_every`` steps per jitted
  ``lax.scan`` chunk, the seeds vectorized), called back to back on device-resident
  indices after it has compiled: no data preparation, evaluation, checkpoint, metric or
  compile in the timing;
- **study (cold)**: ``run_study`` end to end in a fresh workdir: data loading, compiles,
  evaluation, checkpoints, metrics, results and plots;
- **study (warm)**: the same in another fresh workdir, its compiles served by JAX's
  persistent compilation cache (what a rerun, or the next seed count, sees).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["bench_study_overhead", "format_study_overhead"]

GOAL = 1.3


def _study(seeds: int, steps: int, batch_size: int, log_every: int):
    from experiments import study as st
    from experiments.optimizers import make_optimizer

    return st.Study(
        name="bench",
        claim="overhead",
        tasks=(
            st.Task(
                "digits", "digits", "mlp", batch_size=batch_size, steps=steps, log_every=log_every
            ),
        ),
        methods=(
            st.Method("sgd", {"optimizer": "momentum", "learning_rate": 0.05, "momentum": 0.9}),
        ),
        seeds=tuple(range(seeds)),
        make_tx=lambda spec, ctx: make_optimizer(spec, steps=ctx.steps),
    )


def _compute_time(study: Any, steps: int) -> float:
    """Seconds of the study's own jitted chunks run back to back (compiled beforehand)."""
    from experiments import study as st
    from experiments.models import make_model
    from experiments.train.losses import classification_loss
    from experiments.train.plans import EpochPlan
    from experiments.train.vectorized import _layout, init_group_state

    task = study.tasks[0]
    data = st._load(task, 1, {})
    model = make_model(task.model, num_classes=data.dataset.num_classes)
    make_tx = lambda hp, axis: study.make_tx(
        {**study.methods[0].spec, **hp}, st.TxContext(task, steps, axis, 10, task.batch_size)
    )
    plan = EpochPlan(len(data.dataset.x_train), task.batch_size)
    layout = _layout(classification_loss(model), make_tx, plan, 1, False)
    x0 = jax.numpy.asarray(data.dataset.x_train[:1])
    state = layout.put_state(
        init_group_state(jax.jit(lambda k: model.init(k, x0)), make_tx, study.seeds, {})
    )
    runs, length = len(study.seeds), task.log_every
    idx = np.stack([plan.indices(s, range(length))["idx"] for s in study.seeds], axis=1)
    chunk = layout.put_plan(
        {
            "idx": idx,
            "n_micro": np.ones((length, runs), np.int32),
            "active": np.zeros((length, runs, 0), bool),
            "live": np.ones(length, bool),
        }
    )
    x, y = layout.put_data(data.dataset.x_train), layout.put_data(data.dataset.y_train)
    args: tuple[Any, ...] = (
        x,
        y,
        chunk["idx"],
        chunk["n_micro"],
        chunk["active"],
        chunk["live"],
        {},
    )
    state, metrics = layout.chunk(state, *args)  # compile
    jax.block_until_ready(metrics)
    chunks = -(-steps // length)
    start = time.perf_counter()
    for _ in range(chunks):
        state, metrics = layout.chunk(state, *args)
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - start


def bench_study_overhead(
    seed_counts: Sequence[int] = (1, 5, 20),
    *,
    steps: int = 1140,
    batch_size: int = 64,
    log_every: int = 60,
) -> list[dict[str, Any]]:
    """``[{"seeds", "steps", "compute_s", "cold_s", "warm_s", "cold_ratio", "warm_ratio"}]``.

    ``steps=1140`` is 60 epochs of batch 64 on digits' training split (the quick budget).
    """
    from experiments import study as st

    rows = []
    for seeds in seed_counts:
        study = _study(seeds, steps, batch_size, log_every)
        compute = _compute_time(study, steps)
        times = []
        for _ in ("cold", "warm"):
            with tempfile.TemporaryDirectory() as workdir:
                start = time.perf_counter()
                st.run_study(study, workdir, progress=False)
                times.append(time.perf_counter() - start)
        rows.append(
            {
                "seeds": seeds,
                "steps": steps,
                "compute_s": compute,
                "cold_s": times[0],
                "warm_s": times[1],
                "cold_ratio": times[0] / compute,
                "warm_ratio": times[1] / compute,
            }
        )
    return rows


def format_study_overhead(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the rows, with the 1.3x goal."""
    lines = [
        f"Study wall time vs training compute (MLP on digits, {rows[0]['steps']} steps per "
        f"run; goal: wall <= {GOAL}x compute):",
        "",
        "| seeds | compute (s) | study cold (s) | ratio | study warm (s) | ratio "
        "| goal met (warm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seeds']} | {r['compute_s']:.2f} | {r['cold_s']:.2f} | {r['cold_ratio']:.2f} | "
            f"{r['warm_s']:.2f} | {r['warm_ratio']:.2f} | "
            f"{'yes' if r['warm_ratio'] <= GOAL else 'no'} |"
        )
    return "\n".join(lines)

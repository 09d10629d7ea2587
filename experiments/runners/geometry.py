"""The `geometry` experiment: RSI, EB and their cosine along SGD, momentum and Adam paths.

Guille-Escuret et al. (ICML 2024) measure, at every step of a training run, the mini-batch
gradient ``G(w_t)`` against the direction to the run's own end point ``w* = w_T``: RSI
``⟨G, w - w*⟩/‖w - w*‖²``, EB ``‖G‖/‖w - w*‖``, their ratio the cosine, and the locally
optimal step size ``RSI/EB²``. Their claims: the cosine stays positive ("no wrong turns"),
and the locally optimal step size traces warm-up, plateau and decay.

Every method trains through the study as usual (accuracies, curves), then the
``final_metrics`` hook runs :func:`experiments.train.replay.train_and_replay` on the same
seeds, batches and optimizer: pass 1 trains again and keeps ``w_T``, pass 2 replays it
bitwise and measures (``optlab.path_geometry``) the step's training-batch gradient, the
step's update direction and the gradient on a fixed measurement batch (the first
``geometry.measure_examples`` training examples; 0: none) at every step. The loss has no L2 term,
so G is the paper's gradient without weight decay. The study's own trained weights are
compared with pass 1's (``replay_study_diff``: equal up to rounding, a different
compilation of the same run).

The per-run metrics, and the claims on them (one-sample t-intervals over seeds):

- ``cosine_positive``: the fraction of steps whose training-batch gradient has a positive
  cosine with ``w_t − w*``. Claim: above ``geometry.positive_bound``.
- the shape of the locally optimal step size: the path is cut into
  ``geometry.windows`` equal windows of steps and the median ``RSI/EB²`` of each window
  forms the curve ``c_1 .. c_K`` (medians: the per-step values are noisy). ``lr_start`` is
  ``c_1 / max c``, ``lr_end`` is ``c_K / max c`` and ``lr_peak_at`` is the argmax's position
  in [0, 1]. Claim (warm-up and decay around an interior peak): ``lr_start`` and
  ``lr_end`` both below ``geometry.shape_bound``. ``lr_plateau``, the fraction of windows
  within a factor 2 of the peak, is reported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import study as st
from experiments.models import make_model
from experiments.optimizers import make_optimizer, validate_spec
from experiments.registry import get_experiment
from experiments.train.losses import classification_loss
from experiments.train.plans import EpochPlan
from experiments.train.replay import ReplayResult, train_and_replay

NAME = "geometry"
CLAIM = get_experiment(NAME).claim
SHAPE_METRICS = ("lr_start", "lr_end", "lr_peak_at", "lr_plateau")
CURVES = ("cosine", "rsi", "eb", "optimal_lr")


def make_tx(spec: Mapping[str, Any], ctx: st.TxContext) -> optax.GradientTransformation:
    return make_optimizer(spec, steps=ctx.steps)


def window_medians(values: np.ndarray, windows: int) -> np.ndarray:
    """``[..., S] -> [..., K]``: the median of each of ``K`` near-equal windows of steps."""
    chunks = np.array_split(np.arange(values.shape[-1]), min(windows, values.shape[-1]))
    return np.stack([np.median(values[..., c], axis=-1) for c in chunks], axis=-1)


def lr_shape(optimal_lr: np.ndarray, windows: int) -> dict[str, np.ndarray]:
    """The shape metrics of the locally optimal step size, per run (``[R, S] -> [R]``)."""
    curve = window_medians(optimal_lr, windows)
    peak = curve.max(axis=-1)
    safe = np.where(peak > 0, peak, np.nan)
    return {
        "lr_start": curve[:, 0] / safe,
        "lr_end": curve[:, -1] / safe,
        "lr_peak_at": curve.argmax(axis=-1) / max(curve.shape[-1] - 1, 1),
        "lr_plateau": (curve >= 0.5 * peak[:, None]).mean(axis=-1),
    }


def geometry_metrics(result: ReplayResult, windows: int) -> dict[str, np.ndarray]:
    """Per-run (``[R]``) summaries of a replay."""
    cos = result.gradient["cosine"]
    out = {
        "cosine_positive": (cos > 0).mean(axis=-1),
        "cosine_median": np.median(cos, axis=-1),
        "update_cosine_positive": (result.update["cosine"] > 0).mean(axis=-1),
        **lr_shape(result.gradient["optimal_lr"], windows),
    }
    if result.measure:
        out["measure_cosine_positive"] = (result.measure["cosine"] > 0).mean(axis=-1)
    return out


def replay_metrics(config: ml_collections.ConfigDict, workdir: Path | None):
    """The ``final_metrics`` hook: the two-pass replay of every group, its summaries, and
    (with a workdir) its window-median curves in ``geometry/<task>/<method>.json``."""
    geo = config.geometry
    seeds = tuple(config.seeds)

    def final_metrics(data: st.TaskData, method: st.Method, spec, params, model_state):
        del model_state
        task = data.task
        model = make_model(task.model, num_classes=data.dataset.num_classes)
        x_example = jnp.asarray(data.dataset.x_train[:1])
        ctx = st.TxContext(task, data.steps, None, data.dataset.num_classes, data.batch_size)
        n = min(geo.measure_examples, len(data.dataset.x_train))
        result = train_and_replay(
            loss_fn=classification_loss(model),
            make_tx=lambda hp, axis_name: make_tx({**spec, **hp}, ctx),
            init_fn=jax.jit(lambda key: model.init(key, x_example)),
            x=data.dataset.x_train,
            y=data.dataset.y_train,
            plan=EpochPlan(len(data.dataset.x_train), data.batch_size),
            seeds=seeds,
            steps=data.steps,
            measure_batch=(data.dataset.x_train[:n], data.dataset.y_train[:n]) if n else None,
        )
        diff = jax.tree.map(
            lambda a, b: np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(
                len(seeds), -1
            ),
            params,
            result.params,
        )
        metrics = geometry_metrics(result, geo.windows)
        metrics["replay_study_diff"] = np.max(np.concatenate(jax.tree.leaves(diff), axis=1), axis=1)
        if workdir is not None:
            curves = {
                f"{source}_{k}": window_medians(getattr(result, source)[k], geo.plot_windows)
                for source in ("gradient", "update", "measure")
                for k in CURVES
                if getattr(result, source)
            }
            path = workdir / "geometry" / task.name / f"{method.name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            content = {"steps": data.steps, "seeds": list(seeds)}
            content.update({k: np.where(np.isfinite(v), v, 0).tolist() for k, v in curves.items()})
            path.write_text(json.dumps(content))
        return metrics

    return final_metrics


def plot_geometry(study: st.Study, workdir: Path) -> list[str]:
    """Per task: cosine, RSI, EB and the locally optimal step size vs step (window medians,
    mean ± std over seeds) for the training-batch gradient; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for task in study.tasks:
        found = {
            m.name: json.loads(p.read_text())
            for m in study.methods
            if (p := workdir / "geometry" / task.name / f"{m.name}.json").exists()
        }
        if not found:
            continue
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
        fig.subplots_adjust(left=0.04, right=0.99, bottom=0.15, top=0.83, wspace=0.25)
        for ax, key in zip(axes, CURVES, strict=True):
            for name, content in found.items():
                grid = np.asarray(content[f"gradient_{key}"])
                x = (np.arange(grid.shape[1]) + 0.5) * content["steps"] / grid.shape[1]
                mean, std = grid.mean(0), grid.std(0)
                (line,) = ax.plot(x, mean, label=name)
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            ax.set_xlabel("step")
            ax.set_title({"optimal_lr": "RSI / EB² (locally optimal LR)"}.get(key, key.upper()))
            if key in ("rsi", "eb", "optimal_lr"):
                ax.set_yscale("symlog", linthresh=1e-4)
            ax.axhline(0, color="k", lw=0.5)
            ax.grid(alpha=0.3)
        axes[0].set_title("cosine (RSI / EB)")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{study.name}: {task.name}, training-batch gradient vs w - w_T")
        name = f"geometry_{task.name}.png"
        fig.savefig(workdir / name, dpi=80)
        plt.close(fig)
        files.append(name)
    return files


def _notes(config: ml_collections.ConfigDict, study_ref: list, workdir: Path | None):
    geo = config.geometry

    def notes(records: Sequence[dict[str, Any]]) -> list[str]:
        lines = [
            "Path geometry (optlab.path_geometry) from a two-pass replay "
            "(experiments.train.replay): pass 1 retrains each run and keeps w_T, pass 2 replays "
            "it bitwise (checked) and measures at every step, before the update, the "
            "training-batch gradient G(w_t) against w_t - w_T (also the update direction"
            + (
                f" and the gradient on the first {geo.measure_examples} training examples, a "
                "fixed measurement batch"
                if geo.measure_examples
                else ""
            )
            + "). No L2 term in the loss: G is the paper's gradient without "
            "weight decay; constant learning rates, so any warm-up/decay shape comes from the "
            "geometry, not a schedule.",
            f"cosine_positive: fraction of steps with cos(G, w - w_T) > 0; claim: above "
            f"{geo.positive_bound:g}. update_/measure_cosine_positive: the same for the update "
            "direction and for the fixed measurement batch.",
            f"Shape test of the locally optimal LR RSI/EB² (training batch): medians over "
            f"{geo.windows} equal windows of steps, c_1..c_K; lr_start = c_1 / max c, lr_end = "
            f"c_K / max c, lr_peak_at = argmax position in [0, 1], lr_plateau = fraction of "
            f"windows >= max c / 2. Claim 'warm-up then decay around an interior peak': "
            f"lr_start and lr_end both below {geo.shape_bound:g}. The decay at the very end is "
            "partly the bias of using w_T as w*: ‖w - w_T‖ -> 0 while the mini-batch gradient "
            "does not, so RSI/EB² -> 0.",
            "replay_study_diff: the largest |w| difference between the study's trained weights "
            "and the replay's pass 1 (same seeds, batches and step keys, a different "
            "compilation: rounding only).",
        ]
        by_method: dict[str, list[float]] = {}
        for r in records:
            by_method.setdefault(r["method"], []).append(r.get("cosine_median", math.nan))
        if by_method and records:
            lines.append(
                "Median cosine per run (mean over seeds and tasks): "
                + ", ".join(f"{m} {np.nanmean(v):.3g}" for m, v in by_method.items())
                + " (a random direction's cosine is about ±1/sqrt(#params)).",
            )
        if workdir is not None and study_ref:
            files = plot_geometry(study_ref[0], workdir)
            lines += [f"Geometry curves: ![{f}]({f})" for f in files]
        return lines

    return notes


def _claims(config: ml_collections.ConfigDict, methods: Sequence[st.Method]) -> tuple:
    geo = config.geometry
    out = []
    for m in methods:
        out.append(
            st.Claim(
                m.name,
                "",
                metric="cosine_positive",
                bound=geo.positive_bound,
                text=f"{m.name}: the gradient's cosine with w - w* is positive on more than "
                f"{100 * geo.positive_bound:g} % of the steps",
            )
        )
        for metric, what in (("lr_start", "warm-up"), ("lr_end", "decay")):
            out.append(
                st.Claim(
                    m.name,
                    "",
                    metric=metric,
                    bound=geo.shape_bound,
                    higher_is_better=False,
                    text=f"{m.name}: the locally optimal LR shows a {what} "
                    f"({metric} below {geo.shape_bound:g} of its peak)",
                )
            )
    return tuple(out)


def build_study(config: ml_collections.ConfigDict, workdir: str | Path | None = None) -> st.Study:
    tasks = st.tasks_from_config(config)
    methods = st.methods_from_config(config)
    for m in methods:
        validate_spec(m.name, m.spec)
        if m.axes:
            raise ValueError(
                f"methods.{m.name}.axes: the geometry replay runs one point per method "
                f"(a run per seed), got axes {sorted(m.axes)}."
            )
    for t in tasks:
        if t.l2 or t.workers:
            raise ValueError(
                f"tasks.{t.name}: l2 and workers must be 0 (the replay measures the plain "
                f"loss's gradient of one model per run), got l2={t.l2}, workers={t.workers}."
            )
    geo = config.geometry
    for field, low in (("windows", 3), ("plot_windows", 1), ("measure_examples", 0)):
        if int(geo[field]) < low:
            raise ValueError(f"geometry.{field} must be >= {low}, got {geo[field]}.")
    for field in ("positive_bound", "shape_bound"):
        if not 0.0 < geo[field] < 1.0:
            raise ValueError(f"geometry.{field} must lie in (0, 1), got {geo[field]}.")
    workdir = Path(workdir) if workdir is not None else None
    study_ref: list[st.Study] = []
    study = st.Study(
        name=NAME,
        claim=CLAIM,
        tasks=tasks,
        methods=methods,
        seeds=tuple(config.seeds),
        make_tx=make_tx,
        claims=_claims(config, methods),
        final_metrics=replay_metrics(config, workdir),
        table_metrics=(
            "test_accuracy",
            "cosine_positive",
            "update_cosine_positive",
            "measure_cosine_positive",
            "lr_start",
            "lr_end",
            "lr_peak_at",
            "lr_plateau",
            "replay_study_diff",
        ),
        notes=_notes(config, study_ref, workdir),
        config=config.to_dict(),
    )
    study_ref.append(study)
    return study


validate, plan, _run = st.runner_functions(build_study, takes_workdir=True)


def run(
    config: ml_collections.ConfigDict, workdir, *, devices: int = 1, **kwargs
) -> dict[str, Any]:
    if devices != 1:
        raise ValueError(f"the geometry replay runs on one device, got devices={devices}.")
    return _run(config, workdir, devices=devices, **kwargs)

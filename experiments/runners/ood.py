"""The `ood` experiment: do adaptive optimizers generalise worse out of distribution?

SGD, momentum SGD and Adam train on the same data, seeds and budget, each over its own
learning-rate grid (trained vectorized); the reported point is each optimizer's
learning rate selected on the in-distribution validation split. Out-of-distribution test
sets are built as data transforms (:mod:`experiments.data.shifts`):

- **rotated**: the clean test images rotated by ``ood.rotation`` degrees;
- **noisy**: the clean test images plus Gaussian noise of std ``ood.noise_std`` (in
  standardized units);
- **spurious** (the tasks in ``ood.spurious_tasks``): the training, validation and
  in-distribution test images carry a border marker of their label with probability
  ``ood.spurious_correlation`` (``prepare_data``); the OOD test set carries a marker
  independent of the label (the correlation broken).

Every shift gives two metrics per run: ``<shift>_accuracy`` (OOD accuracy) and
``<shift>_accuracy_drop`` (in-distribution test accuracy minus OOD accuracy). "At equal
in-distribution accuracy" is judged two ways, both stated in ``results.md``:

1. at each optimizer's validation-selected learning rate: OOD accuracy and the drop,
   paired over seeds (the study's claims);
2. across the whole grid: per seed, each of Adam's grid points is compared with the
   baseline's OOD accuracy linearly interpolated at Adam's ID accuracy along the
   baseline's (ID, OOD) curve (points outside the baseline's ID range and diverged runs are
   left out); the per-seed mean difference is judged with a t-interval (a note and a plot
   of OOD vs ID accuracy).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import optax

from experiments import stats
from experiments import study as st
from experiments.data.shifts import add_noise, rotate_images, stamp_spurious_feature
from experiments.optimizers import make_optimizer, validate_spec
from experiments.registry import get_experiment
from experiments.train.losses import make_stacked_evaluator

NAME = "ood"
CLAIM = get_experiment(NAME).claim
ADAPTIVE = "adam"
BASELINES = ("sgd", "momentum")


def make_tx(spec: Mapping[str, Any], ctx: st.TxContext) -> optax.GradientTransformation:
    return make_optimizer(spec, steps=ctx.steps)


def shifts_of(config: ml_collections.ConfigDict, task: str) -> tuple[str, ...]:
    """The OOD test sets of a task."""
    return ("spurious",) if task in config.ood.spurious_tasks else ("rotated", "noisy")


class _Hooks:
    """``prepare_data`` and ``evaluators``, sharing the OOD test sets they build."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.ood = config.ood
        self.sets: dict[str, dict[str, np.ndarray]] = {}

    def prepare_data(self, data: st.TaskData) -> st.TaskData:
        task, ds = data.task, data.dataset
        ood = self.ood
        if task.name not in ood.spurious_tasks:
            rng = np.random.default_rng([task.data_seed, 0x0D, 1])
            self.sets[task.name] = {
                "rotated": rotate_images(ds.x_test, ood.rotation, fill=float(ds.x_train.min())),
                "noisy": add_noise(ds.x_test, ood.noise_std, rng=rng),
            }
            return data
        value = float(ds.x_train.max())

        def stamp(x, y, salt, correlation):
            rng = np.random.default_rng([task.data_seed, 0x0D, salt])
            return stamp_spurious_feature(
                x, y, num_classes=ds.num_classes, correlation=correlation, value=value, rng=rng
            )

        c = ood.spurious_correlation
        self.sets[task.name] = {"spurious": stamp(ds.x_test, ds.y_test, 2, 0.0)}
        dataset = ds._replace(
            x_train=stamp(ds.x_train, ds.y_train, 3, c), x_test=stamp(ds.x_test, ds.y_test, 4, c)
        )
        x_val = stamp(data.x_val, data.y_val, 5, c) if len(data.x_val) else data.x_val
        return dataclasses.replace(data, dataset=dataset, x_val=x_val)

    def evaluators(self, data: st.TaskData, model: Any) -> dict[str, Any]:
        ds = data.dataset
        clean = make_stacked_evaluator(model, ds.x_test, ds.y_test)
        out = {}
        for name, x in self.sets[data.task.name].items():
            shifted = make_stacked_evaluator(model, x, ds.y_test)

            def evaluate(params, model_state, shifted=shifted):
                ood = shifted(params, model_state)["accuracy"]
                return {
                    "accuracy": ood,
                    "accuracy_drop": clean(params, model_state)["accuracy"] - ood,
                }

            out[name] = evaluate
        return out


def matched_id(
    records: Sequence[Mapping[str, Any]],
    task: str,
    shift: str,
    method: str,
    baseline: str,
    seeds: Sequence[int],
) -> tuple[np.ndarray, int]:
    """Per seed, the mean OOD accuracy difference ``method - baseline`` at matched ID accuracy.

    For every grid point of ``method`` whose ID test accuracy lies inside the range of the
    baseline's grid points (same seed), the baseline's OOD accuracy is interpolated
    linearly along its (ID, OOD) points sorted by ID. Returns ``(differences per seed, NaN
    where no point matched; the number of matched points)``.
    """
    key = f"{shift}_accuracy"

    def points(name, seed):
        rows = [
            r
            for r in records
            if r["task"] == task
            and r["method"] == name
            and r["seed"] == seed
            and not isinstance(r.get("diverged_at_step"), int)
            and math.isfinite(r.get("test_accuracy", math.nan))
            and math.isfinite(r.get(key, math.nan))
        ]
        pts = sorted((r["test_accuracy"], r[key]) for r in rows)
        return np.asarray(pts, np.float64).reshape(-1, 2)

    out, matched = [], 0
    for seed in seeds:
        m, b = points(method, seed), points(baseline, seed)
        if len(b) < 2 or not len(m):
            out.append(math.nan)
            continue
        inside = (m[:, 0] >= b[0, 0]) & (m[:, 0] <= b[-1, 0])
        if not inside.any():
            out.append(math.nan)
            continue
        interp = np.interp(m[inside, 0], b[:, 0], b[:, 1])
        out.append(float(np.mean(m[inside, 1] - interp)))
        matched += int(inside.sum())
    return np.asarray(out), matched


def plot_ood_vs_id(study: st.Study, workdir: Path, summaries: Sequence[Mapping[str, Any]]):
    """Per task: OOD vs ID test accuracy over each optimizer's grid (mean ± std over seeds;
    grid points with a diverged run are left out: they would sit at chance accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = ml_collections.ConfigDict(study.config)
    files = []
    for task in study.tasks:
        shifts = shifts_of(config, task.name)
        fig, axes = plt.subplots(1, len(shifts), figsize=(5 * len(shifts), 4), squeeze=False)
        fig.subplots_adjust(left=0.1, right=0.97, bottom=0.14, top=0.86, wspace=0.25)
        for ax, shift in zip(axes[0], shifts, strict=True):
            for m in study.methods:
                rows = [
                    s
                    for s in summaries
                    if s["task"] == task.name and s["method"] == m.name and not s["diverged"]
                ]
                if not rows:
                    continue
                xs = [100 * s["test_accuracy"]["mean"] for s in rows]
                ys = [100 * s[f"{shift}_accuracy"]["mean"] for s in rows]
                ax.errorbar(
                    xs,
                    ys,
                    xerr=[100 * s["test_accuracy"]["std"] for s in rows],
                    yerr=[100 * s[f"{shift}_accuracy"]["std"] for s in rows],
                    marker="o",
                    ls="",
                    capsize=2,
                    label=m.name,
                )
            ax.set_xlabel("in-distribution test accuracy (%)")
            ax.set_ylabel(f"{shift} test accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{study.name}: {task.name}, OOD vs ID accuracy over the LR grids")
        name = f"ood_vs_id_{task.name}.png"
        fig.savefig(workdir / name, dpi=80)
        plt.close(fig)
        files.append(name)
    return files


def _notes(config: ml_collections.ConfigDict, study_ref: list, workdir: Path | None):
    ood = config.ood

    def notes(records: Sequence[dict[str, Any]]) -> list[str]:
        lines = [
            f"Shifts: rotated = clean test images rotated by {ood.rotation:g} degrees "
            f"(bilinear, background fill); noisy = clean test images + N(0, "
            f"{ood.noise_std:g}^2) in standardized units; spurious (tasks "
            f"{list(ood.spurious_tasks)}) = a border marker of the label with probability "
            f"{ood.spurious_correlation:g} in train, validation and the ID test set, "
            "independent of the label in the OOD test set. <shift>_accuracy_drop = ID test "
            "accuracy minus OOD accuracy.",
            "Rule for 'equal ID accuracy': (1) the verdicts compare each optimizer at its "
            "learning rate selected on the ID validation split (OOD accuracy, and the ID-to-"
            "OOD drop); (2) matched-ID below: per seed, each Adam grid point against the "
            "baseline's OOD accuracy interpolated at Adam's ID accuracy along the baseline's "
            "(ID, OOD) grid curve (points outside the baseline's ID range and diverged runs "
            "left out), the per-seed mean difference judged by a 95 % t-interval.",
        ]
        study = study_ref[0] if study_ref else None
        if study is None:
            return lines
        names = {m.name for m in study.methods}
        for task in study.tasks:
            for shift in shifts_of(config, task.name):
                for baseline in BASELINES:
                    if ADAPTIVE not in names or baseline not in names:
                        continue
                    diffs, matched = matched_id(
                        records, task.name, shift, ADAPTIVE, baseline, study.seeds
                    )
                    result = stats.paired(diffs, np.zeros_like(diffs))
                    # "adam does worse": a negative difference supports the claim.
                    outcome = {
                        stats.HELD: stats.NOT_HELD,
                        stats.NOT_HELD: stats.HELD,
                    }.get(result.outcome, result.outcome)
                    lines.append(
                        f"Matched-ID, {task.name}/{shift}: {ADAPTIVE} - {baseline} OOD accuracy "
                        f"{100 * result.mean_diff:+.2f} points, 95 % CI "
                        f"[{100 * result.low:+.2f}, {100 * result.high:+.2f}] over {result.n} "
                        f"seeds ({matched} matched points): '{ADAPTIVE} worse OOD at equal "
                        f"ID accuracy' {outcome}."
                    )
        if workdir is not None:
            from experiments.results import summaries

            files = plot_ood_vs_id(study, workdir, summaries(study, records))
            lines += [
                f"OOD vs ID accuracy (grid points with a diverged run left out): ![{f}]({f})"
                for f in files
            ]
        return lines

    return notes


def _claims(config: ml_collections.ConfigDict, tasks, methods) -> tuple[st.Claim, ...]:
    names = {m.name for m in methods}
    out = []
    for task in tasks:
        for shift in shifts_of(config, task.name):
            for baseline in BASELINES:
                if ADAPTIVE not in names or baseline not in names:
                    continue
                out.append(
                    st.Claim(
                        baseline,
                        ADAPTIVE,
                        metric=f"{shift}_accuracy",
                        tasks=(task.name,),
                        text=f"{ADAPTIVE} is worse than {baseline} on the {shift} OOD test set",
                    )
                )
                out.append(
                    st.Claim(
                        baseline,
                        ADAPTIVE,
                        metric=f"{shift}_accuracy_drop",
                        higher_is_better=False,
                        tasks=(task.name,),
                        text=f"{ADAPTIVE} loses more accuracy than {baseline} from the ID "
                        f"to the {shift} test set",
                    )
                )
    return tuple(out)


def build_study(config: ml_collections.ConfigDict, workdir: str | Path | None = None) -> st.Study:
    tasks = st.tasks_from_config(config)
    methods = st.methods_from_config(config)
    for m in methods:
        validate_spec(m.name, m.spec)
    ood = config.ood
    unknown = sorted(set(ood.spurious_tasks) - set(config.tasks))
    if unknown:
        raise ValueError(f"ood.spurious_tasks: {unknown} are not in tasks.")
    if not 0.0 <= ood.spurious_correlation <= 1.0:
        raise ValueError(
            f"ood.spurious_correlation must lie in [0, 1], got {ood.spurious_correlation}."
        )
    if not ood.noise_std >= 0:
        raise ValueError(f"ood.noise_std must be >= 0, got {ood.noise_std}.")
    for t in tasks:
        if t.dataset == "mnist1d":
            raise ValueError(f"tasks.{t.name}: the image shifts need 2-D images, not mnist1d.")
    hooks = _Hooks(config)
    workdir = Path(workdir) if workdir is not None else None
    study_ref: list[st.Study] = []
    metrics = ["test_accuracy", "val_accuracy"]
    for t in tasks:
        metrics += [
            f"{s}_{k}" for s in shifts_of(config, t.name) for k in ("accuracy", "accuracy_drop")
        ]
    study = st.Study(
        name=NAME,
        claim=CLAIM,
        tasks=tasks,
        methods=methods,
        seeds=tuple(config.seeds),
        make_tx=make_tx,
        claims=_claims(config, tasks, methods),
        prepare_data=hooks.prepare_data,
        evaluators=hooks.evaluators,
        table_metrics=tuple(dict.fromkeys(metrics)),
        notes=_notes(config, study_ref, workdir),
        config=config.to_dict(),
    )
    study_ref.append(study)
    return study


validate, plan, run = st.runner_functions(build_study, takes_workdir=True)

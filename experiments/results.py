"""What a study concludes: selections, summaries, verdicts, ``results.json``, ``results.md``, plots.

Data flows one way: records (one per run, from :func:`experiments.study.run_study`) ->
:func:`select` (tuned axes by validation accuracy) -> :func:`summaries` (mean ± std per
point) -> :func:`verdicts` (paired per-seed t-intervals, :mod:`experiments.stats`) ->
:func:`write_results`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import stats
from experiments.study import (
    Claim,
    Record,
    Study,
    TaskData,
    _strict,
    _write_json,
    claim_text,
    point_label,
    points,
)
from experiments.train.metrics import read_metrics

__all__ = ["plot_axes", "plot_curves", "select", "summaries", "verdicts", "write_results"]


def _rows(
    records: Sequence[Record], task: str, method: str, point: Mapping[str, Any]
) -> list[Record]:
    return [
        r
        for r in records
        if r["task"] == task and r["method"] == method and r["point"] == dict(point)
    ]


def _by_seed(rows: Sequence[Record], metric: str, seeds: Sequence[int]) -> np.ndarray:
    values = {r["seed"]: r.get(metric, math.nan) for r in rows}
    return np.array([values.get(s, math.nan) for s in seeds], np.float64)


def _mean_std(values: np.ndarray) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return {"mean": float(finite.mean()), "std": std, "n": int(finite.size)}


def select(study: Study, records: Sequence[Record]) -> dict[str, dict[str, Any]]:
    """The reported point of every (task, method): tuned axes by mean validation accuracy.

    Returns ``{"task/method": {"point", "by", "val", "test", "test_best_point",
    "test_best"}}``: ``test_best_point`` is the point the test set would have picked,
    disclosed and not used.
    """
    out: dict[str, dict[str, Any]] = {}
    for task in study.tasks:
        for method in study.methods:
            default = {k: method.spec.get(k) for k in method.axes if k not in method.tune}
            candidates = [p for p in points(method) if all(p[k] == v for k, v in default.items())]
            if not method.tune:
                out[f"{task.name}/{method.name}"] = {"point": candidates[0], "by": "spec"}
                continue

            def score(p, metric):
                return _mean_std(
                    _by_seed(_rows(records, task.name, method.name, p), metric, study.seeds)
                )["mean"]

            val = [score(p, "val_accuracy") for p in candidates]
            test = [score(p, "test_accuracy") for p in candidates]
            best = int(np.nanargmax(np.nan_to_num(val, nan=-1.0)))
            best_test = int(np.nanargmax(np.nan_to_num(test, nan=-1.0)))
            out[f"{task.name}/{method.name}"] = {
                "point": candidates[best],
                "by": "val_accuracy",
                "val": val[best],
                "test": test[best],
                "test_best_point": candidates[best_test],
                "test_best": test[best_test],
            }
    return out


def _aggregate(values: np.ndarray, how: str) -> np.ndarray:
    """Per seed (rows) over the axis (columns)."""
    if how == "spread":
        return values.max(1) - values.min(1)
    if how == "drop":
        return values[:, 0] - values[:, -1]
    if how == "worst":
        return values.min(1)
    return values.mean(1)


def _axis_values(
    study: Study,
    records: Sequence[Record],
    selection: Mapping[str, Any],
    claim: Claim,
    method: str,
    task: str | None,
) -> np.ndarray:
    """``[seeds, axis points]`` of the claim's metric for one method."""
    m = study.method(method)
    if claim.over == "task":
        tasks = claim.tasks or tuple(t.name for t in study.tasks)
        cols = [
            _by_seed(
                _rows(records, t, method, selection[f"{t}/{method}"]["point"]),
                claim.metric,
                study.seeds,
            )
            for t in tasks
        ]
    else:
        assert task is not None
        base = selection[f"{task}/{method}"]["point"]
        cols = [
            _by_seed(
                _rows(records, task, method, {**base, claim.over: v}), claim.metric, study.seeds
            )
            for v in m.axes[claim.over]
        ]
    return np.stack(cols, axis=1)


def verdicts(
    study: Study, records: Sequence[Record], selection: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Every claim's paired verdict (one per task, or one for claims over tasks)."""
    out = []
    for c in study.claims:
        all_tasks = c.tasks or tuple(t.name for t in study.tasks)
        tasks: Sequence[str | None] = [None] if c.over == "task" else all_tasks
        for task in tasks:
            label = f"{task}: " if task else ""
            entry: dict[str, Any] = {
                "claim": label + claim_text(c),
                "task": task,
                "method": c.method,
                "baseline": c.baseline,
                "metric": c.metric,
                "over": c.over,
                "aggregate": c.aggregate if c.over else "",
            }
            if not c.over:
                assert task is not None  # per-task claims have a task
                a = _by_seed(
                    _rows(records, task, c.method, selection[f"{task}/{c.method}"]["point"]),
                    c.metric,
                    study.seeds,
                )
                b = (
                    np.full(len(study.seeds), c.bound)
                    if c.bound is not None
                    else _by_seed(
                        _rows(
                            records, task, c.baseline, selection[f"{task}/{c.baseline}"]["point"]
                        ),
                        c.metric,
                        study.seeds,
                    )
                )
                result = stats.paired(a, b, higher_is_better=c.higher_is_better)
                entry.update(
                    outcome=result.outcome,
                    detail=result._asdict(),
                    method_value=_mean_std(a),
                    baseline_value=_mean_std(b),
                )
            else:
                a = _axis_values(study, records, selection, c, c.method, task)
                b = (
                    np.full_like(a, c.bound)
                    if c.bound is not None
                    else _axis_values(study, records, selection, c, c.baseline, task)
                )
                if c.aggregate == "sensitivity":
                    spread = stats.paired(
                        _aggregate(a, "spread"),
                        _aggregate(b, "spread"),
                        higher_is_better=not c.higher_is_better,
                    )
                    guards = [
                        stats.paired(
                            _aggregate(a, how),
                            _aggregate(b, how),
                            higher_is_better=c.higher_is_better,
                        )
                        for how in ("worst", "mean")
                    ]
                    entry.update(
                        outcome=stats.combine(spread, guards),
                        detail=spread._asdict(),
                        guards={"worst": guards[0]._asdict(), "mean": guards[1]._asdict()},
                        method_value=_mean_std(_aggregate(a, "spread")),
                        baseline_value=_mean_std(_aggregate(b, "spread")),
                    )
                else:
                    # spread and drop: smaller is better for a higher-is-better metric.
                    smaller = c.aggregate in ("spread", "drop")
                    hib = (not c.higher_is_better) if smaller else c.higher_is_better
                    va, vb = _aggregate(a, c.aggregate), _aggregate(b, c.aggregate)
                    result = stats.paired(va, vb, higher_is_better=hib)
                    entry.update(
                        outcome=result.outcome,
                        detail=result._asdict(),
                        method_value=_mean_std(va),
                        baseline_value=_mean_std(vb),
                    )
            out.append(entry)
    return out


def summaries(study: Study, records: Sequence[Record]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of every metric, per (task, method, point)."""
    metrics = sorted(
        {k for r in records for k, v in r.items() if isinstance(v, float)} - {"wall_time_s"}
    )
    out = []
    for task in study.tasks:
        for method in study.methods:
            for p in points(method):
                rows = _rows(records, task.name, method.name, p)
                if not rows:
                    continue
                out.append(
                    {
                        "task": task.name,
                        "method": method.name,
                        "point": p,
                        "diverged": sum(
                            r["diverged_at_step"] is not None
                            and not (
                                isinstance(r["diverged_at_step"], float)
                                and math.isnan(r["diverged_at_step"])
                            )
                            for r in rows
                        ),
                        **{m: _mean_std(_by_seed(rows, m, study.seeds)) for m in metrics},
                    }
                )
    return out


def _fmt(stat: Mapping[str, Any] | None, metric: str) -> str:
    if not stat or stat.get("n", 0) == 0:
        return "-"
    if "accuracy" in metric:
        return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"
    return f"{stat['mean']:.4g} ± {stat['std']:.2g}"


def write_results(
    study: Study,
    workdir: Path,
    records: Sequence[Record],
    provenance: Mapping[str, Any],
    data: Mapping[str, TaskData],
) -> dict[str, Any]:
    """``results.json``, ``results.md`` and the plots, from the records."""
    selection = select(study, records)
    summary = summaries(study, records)
    found = verdicts(study, records, selection)
    notes = list(study.notes(records) if callable(study.notes) else study.notes)
    diverged = [r for r in records if isinstance(r["diverged_at_step"], int)]
    plots = []
    try:
        plots += plot_curves(study, workdir, selection)
        for label, x_of in study.curve_x.items():
            plots += plot_curves(study, workdir, selection, x=(label, x_of))
        plots += plot_axes(study, workdir, summary)
    except ImportError:  # pragma: no cover - matplotlib is a harness dependency
        pass
    results = {
        "experiment": study.name,
        "claim": study.claim,
        "config": dict(study.config),
        "provenance": dict(provenance),
        "tasks": {
            name: {
                "steps": d.steps,
                "train": len(d.dataset.x_train),
                "val": len(d.x_val),
                "test": len(d.dataset.x_test),
                **dataclasses.asdict(d.task),
            }
            for name, d in data.items()
        },
        "runs": list(records),
        "summaries": summary,
        "selections": selection,
        "verdicts": found,
        "notes": notes,
        "plots": plots,
    }
    _write_json(workdir / "results.json", results)
    (workdir / "results.md").write_text(_markdown(study, results, diverged, data))
    return json.loads(json.dumps(_strict(results)))


def _markdown(
    study: Study,
    results: Mapping[str, Any],
    diverged: Sequence[Record],
    data: Mapping[str, TaskData],
) -> str:
    prov = results["provenance"]
    git, devices = prov.get("git") or {}, prov.get("devices") or {}
    lines = [
        f"# {study.name}",
        "",
        f"**Claim checked.** {study.claim}",
        "",
        f"{len(results['runs'])} runs, seeds {list(study.seeds)}; wall time "
        f"{prov.get('wall_time_s', math.nan):.0f} s, of which {prov.get('train_s', 0.0):.0f} s "
        f"in training ({prov.get('groups', 0)} groups trained now); commit "
        f"`{str(git.get('commit'))[:10]}`{' (dirty)' if git.get('dirty') else ''}, "
        f"jax {prov.get('versions', {}).get('jax', '?')}, "
        f"{devices.get('used', '?')} of {devices.get('count', '?')} x {devices.get('kind', '?')}.",
        "",
    ]
    for task in study.tasks:
        d = data[task.name]
        # Language-model tasks (sequence labels) also show their perplexities.
        metrics = list(study.table_metrics) + [
            k
            for k in ("test_perplexity", "val_perplexity")
            if k not in study.table_metrics
            and any(
                s["task"] == task.name and s.get(k, {}).get("n", 0) for s in results["summaries"]
            )
        ]
        lines += [
            f"## Task `{task.name}`",
            "",
            f"`{task.dataset}` / `{task.model}`: {d.steps} steps of batch {d.batch_size}"
            + (f" per worker, {task.workers} workers ({task.partition})" if task.workers else "")
            + f"; {len(d.dataset.x_train)} training, {len(d.x_val)} validation, "
            f"{len(d.dataset.x_test)} test examples"
            + (f"; L2 {task.l2:g} in the loss" if task.l2 else "")
            + ". Mean ± std over seeds at each method's reported point.",
            "",
            "| method | point | " + " | ".join(metrics) + " | diverged |",
            "|---" * (len(metrics) + 3) + "|",
        ]
        for m in study.methods:
            sel = results["selections"][f"{task.name}/{m.name}"]
            row = next(
                (
                    s
                    for s in results["summaries"]
                    if s["task"] == task.name
                    and s["method"] == m.name
                    and s["point"] == sel["point"]
                ),
                None,
            )
            if row is None:
                continue
            row_cells = [_fmt(row.get(k), k) for k in metrics]
            tuned = " (tuned)" if m.tune else ""
            lines.append(
                f"| {m.name} | {point_label(sel['point']) or '-'}{tuned} | "
                + " | ".join(row_cells)
                + f" | {row['diverged']}/{len(study.seeds)} |"
            )
        lines.append("")
        tuned_methods = [m for m in study.methods if m.tune]
        if tuned_methods:
            lines += [
                "Selection on the validation split (the test-set choice is disclosed, not used):",
                "",
            ]
            for m in tuned_methods:
                sel = results["selections"][f"{task.name}/{m.name}"]
                lines.append(
                    f"- {m.name}: {point_label(sel['point'])} (val {_pct(sel['val'])}, test "
                    f"{_pct(sel['test'])}); the test set would have picked "
                    f"{point_label(sel['test_best_point'])} (test {_pct(sel['test_best'])})."
                )
            lines.append("")
        swept = [m for m in study.methods if any(a not in m.tune for a in m.axes)]
        for m in swept:
            for axis in [a for a in m.axes if a not in m.tune]:
                grid = [
                    s
                    for s in results["summaries"]
                    if s["task"] == task.name and s["method"] == m.name
                ]
                cells = " | ".join(f"{_fmt(s.get('test_accuracy'), 'test_accuracy')}" for s in grid)
                heads = " | ".join(f"{axis}={s['point'][axis]:g}" for s in grid)
                lines += [
                    f"`{m.name}` test accuracy across `{axis}`:",
                    "",
                    f"| {heads} |",
                    "|---" * len(grid) + "|",
                    f"| {cells} |",
                    "",
                ]
    n = len(results["verdicts"])
    counts = {
        o: sum(v["outcome"] == o for v in results["verdicts"])
        for o in (stats.HELD, stats.INCONCLUSIVE, stats.NOT_HELD)
    }
    lines += [
        "## Verdicts",
        "",
        f"{n} comparisons, each a paired t-interval (95 %) of the per-seed difference: "
        f"**held** {counts[stats.HELD]}, **inconclusive** {counts[stats.INCONCLUSIVE]}, "
        f"**did not hold** {counts[stats.NOT_HELD]}. With {n} comparisons at 95 %, about "
        f"{0.05 * n:.1f} could come out decided by chance alone.",
        "",
    ]
    for v in results["verdicts"]:
        d = v["detail"]
        scale = 100.0 if "accuracy" in v["metric"] else 1.0
        unit = " points" if scale == 100.0 else ""
        extra = ""
        if v.get("guards"):
            g = v["guards"]
            extra = (
                f"; guards: worst {g['worst']['outcome']} "
                f"({scale * g['worst']['mean_diff']:+.2f}), "
                f"mean {g['mean']['outcome']} ({scale * g['mean']['mean_diff']:+.2f})"
            )
        what = f"{v['aggregate']} of " if v["aggregate"] else ""
        lines.append(
            f"- **{v['outcome'].upper()}**: {v['claim']}. {what}{v['metric']}: "
            f"{_fmt(v['method_value'], v['metric'])} vs {_fmt(v['baseline_value'], v['metric'])}; "
            f"paired difference {scale * _nan(d['mean_diff']):+.2f}{unit}, 95 % CI "
            f"[{scale * _nan(d['low']):+.2f}, {scale * _nan(d['high']):+.2f}] over {d['n']} seeds"
            + (f" ({d['dropped']} left out: missing values)" if d["dropped"] else "")
            + extra
            + "."
        )
    lines += ["", "## Notes", ""]
    lines.append(
        "- Divergence policy: a run whose training loss turns non-finite is recorded with its "
        "step and scored at chance accuracy (1 / classes), NaN loss and NaN for every other "
        "metric (left out of paired comparisons, counted); it never stops the study."
    )
    if diverged:
        lines.append(
            "- Diverged runs: "
            + ", ".join(
                f"{r['task']}/{r['method']} {point_label(r['point'])} seed {r['seed']} "
                f"(step {r['diverged_at_step']})"
                for r in diverged[:20]
            )
            + ("" if len(diverged) <= 20 else f", and {len(diverged) - 20} more")
            + "."
        )
    lines += [f"- {n}" for n in results["notes"]]
    if results["plots"]:
        lines += ["", "## Plots", "", *[f"![{p}]({p})" for p in results["plots"]]]
    return "\n".join(lines) + "\n"


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f} %"


def plot_curves(
    study: Study,
    workdir: Path,
    selection: Mapping[str, Any],
    x: tuple[str, Any] | None = None,
) -> list[str]:
    """Per task: ``study.curve_metrics`` (training loss and test accuracy by default) vs step,
    mean ± std over seeds, per method at its reported point (log scale for losses, distances
    and variances).

    ``x = (label, x_of)`` plots against ``x_of(spec, records of one run)`` (one value per
    record, e.g. communication rounds) instead of the step, averaged over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for task in study.tasks:
        records = read_metrics(workdir / task.name / "metrics.jsonl")
        if not records:
            continue
        keys = study.curve_metrics
        fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            label = {"train_loss": "training loss"}.get(key, key.replace("_", " "))
            log = key.endswith(("loss", "distance", "variance", "variance_normalized"))
            for m in study.methods:
                label_point = point_label(selection[f"{task.name}/{m.name}"]["point"])
                rows = [
                    r
                    for r in records
                    if r.get("method") == m.name
                    and r.get("point") == label_point
                    and key in r
                    # The final record's train_* are the whole training set in eval mode,
                    # not the mini-batch windows of the curve.
                    and not (r.get("final") and key.startswith("train_"))
                ]
                if not rows:
                    continue
                steps = sorted({r["step"] for r in rows})
                grid = np.full((len(study.seeds), len(steps)), np.nan)
                xs = np.full_like(grid, np.nan)
                for r in rows:
                    if r["seed"] in study.seeds and r[key] is not None:
                        grid[study.seeds.index(r["seed"]), steps.index(r["step"])] = r[key]
                if x is not None:
                    spec = {**m.spec, **selection[f"{task.name}/{m.name}"]["point"]}
                    for seed in study.seeds:
                        run = [
                            r
                            for r in records
                            if r.get("method") == m.name
                            and r.get("point") == label_point
                            and r.get("seed") == seed
                        ]
                        for r, value in zip(run, x[1](spec, run), strict=True):
                            if r in rows:
                                xs[study.seeds.index(seed), steps.index(r["step"])] = value
                with np.errstate(all="ignore"):
                    import warnings

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        mean, std = np.nanmean(grid, 0), np.nanstd(grid, 0)
                        at = steps if x is None else np.nanmean(xs, 0)
                (line,) = ax.plot(at, mean, label=m.name)
                ax.fill_between(at, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            ax.set_xlabel("step" if x is None else x[0])
            ax.set_ylabel(label)
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{study.name}: {task.name} ({task.dataset} / {task.model})")
        fig.tight_layout()
        slug = "" if x is None else "_" + "".join(c if c.isalnum() else "_" for c in x[0])
        name = f"curves_{task.name}{slug}.png"
        fig.savefig(workdir / name, dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def plot_axes(study: Study, workdir: Path, summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per task and axis: test (and validation) accuracy vs the axis value, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    axes_names = sorted({a for m in study.methods for a in m.axes})
    for task in study.tasks:
        for axis in axes_names:
            fig, ax = plt.subplots(figsize=(6, 4))
            drawn = False
            for m in study.methods:
                if axis not in m.axes or len(m.axes) != 1:
                    continue
                rows = sorted(
                    (s for s in summary if s["task"] == task.name and s["method"] == m.name),
                    key=lambda s: s["point"][axis],
                )
                xs = [s["point"][axis] for s in rows]
                mean = [100 * _nan(s["test_accuracy"]["mean"]) for s in rows]
                std = [100 * _nan(s["test_accuracy"]["std"]) for s in rows]
                ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=m.name)
                drawn = True
            if not drawn:
                plt.close(fig)
                continue
            if all(
                isinstance(v, float) and v > 0 for m in study.methods for v in m.axes.get(axis, ())
            ):
                ax.set_xscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            ax.set_title(f"{study.name}: {task.name}, test accuracy vs {axis}")
            fig.tight_layout()
            name = f"{axis}_{task.name}.png"
            fig.savefig(workdir / name, dpi=100)
            plt.close(fig)
            files.append(name)
    return files

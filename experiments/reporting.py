"""Results of an experiment: per-seed finals, mean and spread, verdicts, tables and plots.

Verdicts are plain: a claim "A >= B" on a metric compares the means over seeds and says
whether the difference is larger than twice its standard error (Welch), so a difference
inside the seed-to-seed noise is reported as such rather than as a win.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from experiments.train.metrics import read_metrics

METRICS = ("test_accuracy", "test_loss", "train_loss", "train_accuracy")


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and count."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": len(arr)}


def summarize(runs: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRICS) -> dict:
    """``{method: {metric: {"mean", "std", "n"}}}`` over the seeds of each method."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == method]
        summary[method] = {m: mean_std([r[m] for r in rows]) for m in metrics if m in rows[0]}
    return summary


class Verdict(NamedTuple):
    """The outcome of one claim: ``held`` compares means; ``significant`` is |diff| > 2 se."""

    claim: str
    held: bool
    significant: bool
    detail: str

    def line(self) -> str:
        status = "HELD" if self.held else "DID NOT HOLD"
        noise = "" if self.significant else " (difference within seed noise)"
        return f"- **{status}**{noise}: {self.claim}. {self.detail}"


def compare(
    summary: Mapping[str, Any],
    method: str,
    baseline: str,
    *,
    metric: str = "test_accuracy",
    higher_is_better: bool = True,
    claim: str | None = None,
    scale: float = 100.0,
    unit: str = "%",
) -> Verdict:
    """The verdict on "``method`` is at least as good as ``baseline`` on ``metric``"."""
    a, b = summary[method][metric], summary[baseline][metric]
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    better = diff if higher_is_better else -diff
    claim = claim or f"{method} >= {baseline} on {metric}"

    def fmt(s):
        return f"{s['mean'] * scale:.2f} ± {s['std'] * scale:.2f}{unit}"

    detail = (
        f"{method} {fmt(a)} vs {baseline} {fmt(b)} over {a['n']}/{b['n']} seeds "
        f"(difference {diff * scale:+.2f}{unit}, {abs(diff) / se:.1f} standard errors)"
        if se > 0
        else f"{method} {fmt(a)} vs {baseline} {fmt(b)} (difference {diff * scale:+.2f}{unit})"
    )
    significant = abs(diff) > 2 * se if se > 0 else diff != 0
    return Verdict(claim, better >= 0, bool(significant), detail)


def markdown_table(summary: Mapping[str, Any], metrics: Sequence[str] = METRICS) -> str:
    """A Markdown table, one row per method, ``mean ± std`` per metric (accuracies in %)."""
    header = "| method | " + " | ".join(metrics) + " | seeds |"
    rule = "|---" * (len(metrics) + 2) + "|"
    rows = []
    for method, stats in summary.items():
        cells = []
        for m in metrics:
            s = stats.get(m)
            if s is None:
                cells.append("-")
            elif "accuracy" in m:
                cells.append(f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
            else:
                cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}")
        n = next(iter(stats.values()))["n"]
        rows.append(f"| {method} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join([header, rule, *rows])


def write_results(
    workdir: str | os.PathLike,
    *,
    experiment: str,
    claim: str,
    config: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]],
    verdicts: Sequence[Verdict] = (),
    notes: Sequence[str] = (),
    plots: Sequence[str] = (),
    description: str | None = None,
    sections: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes ``results.json`` and ``results.md``; returns the JSON content.

    Args:
      description: the line above the table (default: dataset, model, steps, batch and
        seeds read from ``config``).
      sections: further Markdown blocks, placed after the table and before the verdicts.
      extra: further top-level fields of ``results.json``.
    """
    workdir = Path(workdir)
    summary = summarize(runs)
    results = {
        "experiment": experiment,
        "claim": claim,
        "config": dict(config),
        "runs": list(runs),
        "summary": summary,
        "verdicts": [v._asdict() for v in verdicts],
        "notes": list(notes),
        **(extra or {}),
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if description is None:
        description = (
            f"Dataset `{config.get('dataset')}`, model `{config.get('model')}`, "
            f"{config.get('steps')} steps of batch {config.get('batch_size')}, "
            f"seeds {list(config.get('seeds', []))}; final metrics, mean ± std over seeds."
        )
    lines = [
        f"# {experiment}",
        "",
        f"**Claim checked.** {claim}",
        "",
        description,
        "",
        markdown_table(summary),
        "",
    ]
    for section in sections:
        lines += [section.rstrip("\n"), ""]
    lines += closing_sections(verdicts, notes, plots)
    (workdir / "results.md").write_text("\n".join(lines))
    return results


def closing_sections(
    verdicts: Sequence[Verdict], notes: Sequence[str], plots: Sequence[str]
) -> list[str]:
    """The Verdicts / Notes / Plots sections that end every ``results.md`` (empty ones left out)."""
    lines: list[str] = []
    if verdicts:
        lines += ["## Verdicts", "", *[v.line() for v in verdicts], ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if plots:
        lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    return lines


def plot_curves(
    workdir: str | os.PathLike,
    methods: Sequence[str],
    *,
    filename: str = "curves.png",
    title: str = "",
) -> str:
    """Training loss and test accuracy against step, mean ± std over seeds, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    records = read_metrics(workdir / "metrics.jsonl")
    panels = (
        ("train_loss", "training loss (window mean)", True),
        ("test_accuracy", "test accuracy", False),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, label, log_scale) in zip(axes, panels, strict=True):
        for method in methods:
            # The final record carries the end-of-run test metrics (step == steps).
            rows = [r for r in records if r.get("method") == method and key in r]
            seeds = sorted({r["seed"] for r in rows})
            if not rows:
                continue
            steps = sorted({r["step"] for r in rows})
            grid = np.full((len(seeds), len(steps)), np.nan)
            for r in rows:
                grid[seeds.index(r["seed"]), steps.index(r["step"])] = r[key]
            mean, std = np.nanmean(grid, 0), np.nanstd(grid, 0)
            (line,) = ax.plot(steps, mean, label=method)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(workdir / filename, dpi=110)
    plt.close(fig)
    return filename


def grid_spread(
    runs: Sequence[Mapping[str, Any]],
    groups: Mapping[str, Sequence[str]],
    *,
    metric: str = "test_accuracy",
) -> list[dict[str, Any]]:
    """Per-seed sensitivity of ``metric`` across a grid of settings (e.g. learning rates).

    Each group names the runs' methods that are its grid points (one method trained at
    several learning rates, say). For every seed present at every grid point, one record
    ``{"method": group, "seed", f"{metric}_range", f"{metric}_grid_mean",
    f"{metric}_grid_min"}``: the spread (max - min), mean and worst value of ``metric``
    over the grid for that seed. The records go through :func:`summarize` and
    :func:`compare` like ordinary runs (a smaller range is a less sensitive method).

    Raises:
      ValueError: if a group has fewer than two grid points or no seed common to all.
    """
    value = {(r["method"], r["seed"]): float(r[metric]) for r in runs}
    records = []
    for group, members in groups.items():
        if len(members) < 2:
            raise ValueError(f"grid {group!r} needs at least two points, got {list(members)}")
        seed_sets = [{s for (m, s) in value if m == member} for member in members]
        seeds = sorted(set.intersection(*seed_sets))
        if not seeds:
            raise ValueError(f"grid {group!r}: no seed was run at every point {list(members)}")
        for seed in seeds:
            vals = np.array([value[(member, seed)] for member in members])
            records.append(
                {
                    "method": group,
                    "seed": seed,
                    f"{metric}_range": float(vals.max() - vals.min()),
                    f"{metric}_grid_mean": float(vals.mean()),
                    f"{metric}_grid_min": float(vals.min()),
                }
            )
    return records


def _cell(stats: Mapping[str, float] | None, percent: bool) -> str:
    if stats is None:
        return "-"
    if percent:
        return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def markdown_grid(
    summary: Mapping[str, Any],
    rows: Mapping[str, Sequence[str]],
    columns: Sequence[str],
    *,
    metric: str = "test_accuracy",
    corner: str = "method",
) -> str:
    """A Markdown table of ``metric`` (mean ± std) with one row per grid.

    ``rows`` maps a row label to the summary's methods in column order (``None`` or a
    method absent from ``summary`` gives ``-``); ``columns`` are the column headers.
    """
    header = f"| {corner} | " + " | ".join(columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    lines = [header, rule]
    for label, methods in rows.items():
        if len(methods) != len(columns):
            raise ValueError(f"row {label!r} has {len(methods)} cells for {len(columns)} columns")
        cells = [
            _cell(summary.get(m, {}).get(metric) if m else None, "accuracy" in metric)
            for m in methods
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_grid(
    workdir: str | os.PathLike,
    summary: Mapping[str, Any],
    series: Mapping[str, Sequence[tuple[float, str]]],
    *,
    metric: str = "test_accuracy",
    xlabel: str = "learning rate",
    log_x: bool = True,
    filename: str = "grid.png",
    title: str = "",
) -> str:
    """``metric`` (mean ± std over seeds) against a setting, one line per series.

    ``series`` maps a label to ``(x, method)`` points, e.g. the learning rates a method was
    trained at and the names of those runs in ``summary``. Returns ``filename``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100.0 if "accuracy" in metric else 1.0
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        points = sorted((x, m) for x, m in points if m in summary)
        xs = [x for x, _ in points]
        mean = np.array([summary[m][metric]["mean"] for _, m in points]) * scale
        std = np.array([summary[m][metric]["std"] for _, m in points]) * scale
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric.replace("_", " ") + (" (%)" if scale == 100.0 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(Path(workdir) / filename, dpi=110)
    plt.close(fig)
    return filename

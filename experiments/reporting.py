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
) -> dict[str, Any]:
    """Writes ``results.json`` and ``results.md``; returns the JSON content."""
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
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# {experiment}",
        "",
        f"**Claim checked.** {claim}",
        "",
        f"Dataset `{config.get('dataset')}`, model `{config.get('model')}`, "
        f"{config.get('steps')} steps of batch {config.get('batch_size')}, "
        f"seeds {list(config.get('seeds', []))}; final metrics, mean ± std over seeds.",
        "",
        markdown_table(summary),
        "",
    ]
    if verdicts:
        lines += ["## Verdicts", "", *[v.line() for v in verdicts], ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if plots:
        lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    (workdir / "results.md").write_text("\n".join(lines))
    return results


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

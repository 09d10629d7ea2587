"""Fixed-width tables of the benchmark results (stdout) and the JSON record."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from experiments.bench.registry import BenchGoal

__all__ = [
    "evaluate_goals",
    "format_report",
    "format_table",
    "last_level_cache_bytes",
    "machine_info",
    "write_json",
]


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    return {
        "jax_version": jax.__version__,
        "optax_version": optax.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "last_level_cache_bytes": last_level_cache_bytes(),
    }


def last_level_cache_bytes() -> int | None:
    """Size of the CPU's largest cache level (Linux sysfs), or ``None`` where unknown.

    Updates whose arrays fit in it run from cache, faster than the DRAM bandwidth.
    """
    best: tuple[int, int] | None = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        try:
            nbytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        except ValueError:
            continue
        if best is None or (level, nbytes) > best:
            best = (level, nbytes)
    return None if best is None else best[1]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A plain fixed-width table; the first ``left`` columns are left-aligned, others right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 10_000:
        return f"{n / 1e3:.1f}K"
    return f"{n:,}"


def _cache_mark(row: dict[str, Any], llc: int | None) -> str:
    fits = llc is not None and row["bytes_per_param"] * row["num_params"] <= llc
    return "*" if fits else ""


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def evaluate_goals(
    goals: Sequence[BenchGoal],
    updates: Sequence[dict[str, Any]],
    train_steps: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Measured ratios of every goal, wherever both of its entries were measured.

    Returns:
      One row per (goal, size) or (goal, model): ``goal, part, where, numerator,
      denominator, max_ratio, ratio`` (of median times, the number the goal is judged on),
      ``mean_ratio`` (of mean times over all samples), ``met`` (``ratio <= max_ratio``),
      ``source``. Goals whose entries were not both measured give no row.
    """
    out: list[dict[str, Any]] = []
    for goal in goals:
        rows = updates if goal.part == "updates" else train_steps
        groups: dict[str, dict[str, dict[str, Any]]] = {}
        for r in rows:
            if goal.part == "updates":
                where = f"{_count(r['num_params'])} params"
            elif goal.models is None or r["model"] in goal.models:
                where = f"{r['model']} train step"
            else:
                continue
            groups.setdefault(where, {})[r["name"]] = r
        time_key = "time_s" if goal.part == "updates" else "step_time_s"
        for where, by_name in groups.items():
            num, den = by_name.get(goal.numerator), by_name.get(goal.denominator)
            if num is None or den is None:
                continue
            ratio = num[time_key] / den[time_key]
            mean_ratio = float(np.mean(num["times_s"]) / np.mean(den["times_s"]))
            out.append(
                {
                    "goal": goal.name,
                    "part": goal.part,
                    "where": where,
                    "numerator": goal.numerator,
                    "denominator": goal.denominator,
                    "max_ratio": float(goal.max_ratio),
                    "ratio": ratio,
                    "mean_ratio": mean_ratio,
                    "met": bool(ratio <= goal.max_ratio),
                    "source": goal.source,
                }
            )
    return out


def format_report(result: dict[str, Any]) -> str:
    """The tables (bandwidth, updates, train steps, goals) of a :func:`run_bench` result."""
    cfg = result["config"]
    bw = result["bandwidth"]
    out = [
        f"Machine: {result['machine']['backend']} / {result['machine']['device_kind']}, "
        f"{result['machine']['cpu_count']} CPUs, jax {result['machine']['jax_version']}",
        "",
        f"Memory bandwidth: {result['bandwidth_gbs']:.2f} GB/s  (x + c in place on a "
        f"{bw['array_bytes'] / 2**20:g} MiB float32 array under jit, read + write, "
        f"median of {cfg['copy_reps']}: {_ms(bw['median_s'])} ms)",
        f"  into a fresh buffer: {bw['fresh_output_gbs']:.2f} GB/s "
        f"({_ms(bw['fresh_output_median_s'])} ms; page faults on first touch, not the limit)",
    ]
    llc = result["machine"].get("last_level_cache_bytes")
    if result["updates"]:
        out += [
            "",
            f"Optimizer update: jit(tx.update) with the state donated, per-update time, median "
            f"of {cfg['reps']} interleaved samples of {cfg['update_steps_per_rep']} consecutive "
            "updates. GB/s = byte model x params / time; 'of bw' = GB/s / memory bandwidth.",
            format_table(
                [
                    "entry",
                    "params",
                    "B/param",
                    "time ms",
                    "GB/s",
                    "of bw",
                    "vs sgd",
                    "vs cpart",
                    "state B/param",
                    "counterpart",
                ],
                [
                    [
                        r["name"],
                        _count(r["num_params"]),
                        f"{r['bytes_per_param']:g}",
                        _ms(r["time_s"]),
                        f"{r['gbs']:.2f}",
                        f"{100 * r['fraction_of_bandwidth']:.0f}%{_cache_mark(r, llc)}",
                        _ratio(r["ratio_to_sgd"]),
                        _ratio(r["ratio_to_counterpart"]),
                        f"{r['state_bytes_per_param']:.2f}",
                        r["counterpart"] or "",
                    ]
                    for r in result["updates"]
                ],
            ),
        ]
        if llc and any(_cache_mark(r, llc) for r in result["updates"]):
            out.append(
                f"* every byte the update touches (B/param x params) fits in the {llc / 2**20:g} "
                "MiB last-level cache: this measures cache, not DRAM, bandwidth."
            )
    if result["train_steps"]:
        out += [
            "",
            f"Train step: make_train_step on {cfg['dataset']}, batch {cfg['batch_size']}, "
            f"median of {cfg['train_reps']} interleaved samples of {cfg['steps_per_rep']} "
            "step(s).",
            format_table(
                ["model", "entry", "params", "step ms", "vs sgd", "vs cpart", "counterpart"],
                [
                    [
                        r["model"],
                        r["name"],
                        _count(r["num_params"]),
                        _ms(r["step_time_s"]),
                        _ratio(r["ratio_to_sgd"]),
                        _ratio(r["ratio_to_counterpart"]),
                        r["counterpart"] or "",
                    ]
                    for r in result["train_steps"]
                ],
                left=2,
            ),
        ]
    goal_rows = result.get("goals") or []
    if goal_rows:
        sources = sorted({g["source"] for g in goal_rows if g["source"]})
        out += [
            "",
            "Goals: time ratio numerator / denominator, of medians (judged; met when <= goal) "
            "and of means (all samples)." + (f" From: {'; '.join(sources)}." if sources else ""),
            format_table(
                ["goal", "where", "goal", "measured", "mean", "met"],
                [
                    [
                        g["goal"],
                        g["where"],
                        f"<= {g['max_ratio']:.2f}",
                        f"{g['ratio']:.2f}",
                        f"{g['mean_ratio']:.2f}",
                        "yes" if g["met"] else "NO",
                    ]
                    for g in goal_rows
                ],
                left=2,
            ),
        ]
    out += ["", f"Elapsed: {result['elapsed_s']:.1f} s"]
    if result.get("study_overhead"):
        from experiments.bench.study_overhead import format_study_overhead

        out += ["", format_study_overhead(result["study_overhead"])]
    if result.get("communication"):
        from experiments.bench.communication import format_communication

        out += ["", format_communication(result["communication"])]
    return "\n".join(out)


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Writes ``result`` as indented JSON (atomically: temp file, then rename)."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path

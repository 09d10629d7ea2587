"""``python -m experiments bench``: argument parsing and the three measurements in order."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from experiments.bench.bandwidth import measure_bandwidth
from experiments.bench.registry import SGD_NAME, BenchEntry, BenchGoal, entries, goals
from experiments.bench.report import evaluate_goals, format_report, machine_info, write_json
from experiments.bench.study_overhead import bench_study_overhead
from experiments.bench.timing import progress
from experiments.bench.train_steps import bench_train_steps
from experiments.bench.updates import bench_updates
from experiments.models import LANGUAGE_MODELS, model_names

__all__ = ["BenchConfig", "main", "parse_args", "run_bench", "select_entries"]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to measure and how often (defaults: the full benchmark).

    Attributes:
      sizes: approximate parameter counts of the update benchmark.
      reps: timed samples per entry and size in the update benchmark.
      update_steps_per_rep: consecutive updates per timed sample (5: every sample holds one
        sync of the period-5 Lookahead entries, so they are timed at their average cost).
      copy_mib: size of the array copied to measure memory bandwidth.
      copy_reps: timed repetitions of the copy.
      models: models of the train-step benchmark (empty: skip it).
      train_reps: timed samples per entry and model in the train-step benchmark.
      steps_per_rep: consecutive train steps per timed sample.
      batch_size: train-step batch size.
      dataset: train-step dataset.
      study_seeds, study_steps: the study wall time vs compute benchmark.
      comm_workers: workers (= devices, shard_map) of the communication benchmark (0: skip).
      comm_period: H of Local SGD, DiLoCo and PALSGD there.
      comm_reps: timed samples per method there.
      comm_palsgd_steps: PALSGD steps whose gradient evaluations are counted.
    """

    sizes: tuple[int, ...] = (1_000_000, 10_000_000)
    reps: int = 50
    update_steps_per_rep: int = 5
    copy_mib: float = 512.0
    copy_reps: int = 10
    models: tuple[str, ...] = ("mlp", "cnn")
    train_reps: int = 60
    steps_per_rep: int = 5
    batch_size: int = 128
    dataset: str = "digits"
    study_seeds: tuple[int, ...] = (1, 5, 20)
    study_steps: int = 1140
    comm_workers: int = 8
    comm_period: int = 8
    comm_reps: int = 30
    comm_palsgd_steps: int = 400


QUICK = BenchConfig(
    sizes=(1_000_000,),
    reps=20,
    copy_mib=64.0,
    copy_reps=5,
    train_reps=20,
    steps_per_rep=3,
    study_seeds=(1, 5),
    study_steps=570,
    comm_reps=10,
    comm_palsgd_steps=200,
)
"""``--quick``: one size, fewer repetitions; well under a minute on 2 CPU cores."""


def _count(text: str) -> int:
    """Parses ``1000``, ``1e6``, ``10M``, ``250k`` into an int >= 1."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 1000, 1e6, 10M)")
    try:
        value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"count must be >= 1, got {text!r}")
    return int(value)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments bench",
        description=(
            "Benchmark the registered optimizer transforms side by side in one process: "
            "memory bandwidth (the physical limit), update time on model-shaped pytrees "
            "against optax.sgd and each entry's counterpart, and full train steps on the MLP "
            "and CNN. Tables go to stdout, progress to stderr, everything to a JSON file."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="1M parameters only and fewer repetitions (well under a minute)",
    )
    p.add_argument("--out", default="bench.json", help="JSON output path (default: %(default)s)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="REGEX",
        help=(
            "measure only the entries whose name matches one of these regular expressions "
            "(re.search), plus optax.sgd and their counterparts; e.g. --only lookahead"
        ),
    )
    over = p.add_argument_group("overrides (default: the --quick or full setting)")
    over.add_argument(
        "--sizes",
        nargs="+",
        type=_count,
        metavar="N",
        help="update-benchmark parameter counts, e.g. 1M 10M",
    )
    over.add_argument("--reps", type=_positive_int, help="update samples per entry")
    over.add_argument(
        "--update-steps", type=_positive_int, help="consecutive updates per update sample"
    )
    over.add_argument("--copy-mib", type=_positive_float, help="bandwidth copy size in MiB")
    over.add_argument("--copy-reps", type=_positive_int, help="bandwidth copy repetitions")
    over.add_argument(
        "--models",
        nargs="*",
        metavar="MODEL",
        choices=[m for m in model_names() if m not in LANGUAGE_MODELS],  # they train on digits
        help="train-step models, of: %(choices)s (none: skip this part)",
    )
    over.add_argument("--train-reps", type=_positive_int, help="train-step samples per entry")
    over.add_argument("--steps-per-rep", type=_positive_int, help="train steps per sample")
    over.add_argument("--batch-size", type=_positive_int, help="train-step batch size")
    over.add_argument(
        "--study-seeds",
        nargs="*",
        type=_positive_int,
        metavar="R",
        help="seed counts of the study wall-time vs compute benchmark (none: skip it)",
    )
    over.add_argument("--study-steps", type=_positive_int, help="steps per run of that study")
    over.add_argument(
        "--comm-workers",
        type=int,
        help="workers (one per device) of the communication benchmark (0: skip it)",
    )
    over.add_argument("--comm-reps", type=_positive_int, help="communication samples per method")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, str]:
    """``(config, out_path)`` from command-line arguments (``--only``: see :func:`main`)."""
    args = _parse(argv)
    cfg = QUICK if args.quick else BenchConfig()
    overrides: dict[str, Any] = {}
    for field in ("reps", "copy_mib", "copy_reps", "train_reps", "steps_per_rep", "batch_size"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    if args.study_seeds is not None:
        overrides["study_seeds"] = tuple(args.study_seeds)
    if args.study_steps is not None:
        overrides["study_steps"] = args.study_steps
    if args.comm_workers is not None:
        if args.comm_workers < 0:
            _parser().error(f"--comm-workers must be >= 0, got {args.comm_workers}")
        overrides["comm_workers"] = args.comm_workers
    if args.comm_reps is not None:
        overrides["comm_reps"] = args.comm_reps
    if args.update_steps is not None:
        overrides["update_steps_per_rep"] = args.update_steps
    if args.sizes is not None:
        overrides["sizes"] = tuple(args.sizes)
    if args.models is not None:
        overrides["models"] = tuple(args.models)
    return dataclasses.replace(cfg, **overrides), args.out


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def select_entries(
    bench_entries: Sequence[BenchEntry], patterns: Sequence[str] | None
) -> list[BenchEntry]:
    """The entries matching one of ``patterns``, with :data:`SGD_NAME` and their counterparts.

    ``None`` keeps every entry. Registration order is kept.

    Raises:
      ValueError: a pattern is not a valid regular expression, or nothing matches.
    """
    if patterns is None:
        return list(bench_entries)
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as error:
        raise ValueError(f"--only: invalid regular expression: {error}") from None
    wanted = {e.name for e in bench_entries if any(c.search(e.name) for c in compiled)}
    if not wanted:
        known = ", ".join(repr(e.name) for e in bench_entries)
        raise ValueError(f"--only {' '.join(patterns)} matches no entry; registered: {known}")
    by_name = {e.name: e for e in bench_entries}
    wanted |= {c for n in wanted if (c := by_name[n].counterpart) is not None}
    wanted.add(SGD_NAME)
    return [e for e in bench_entries if e.name in wanted]


def run_bench(
    cfg: BenchConfig,
    bench_entries: Sequence[BenchEntry],
    bench_goals: Sequence[BenchGoal] = (),
) -> dict[str, Any]:
    """Runs the measurements, evaluates the goals, returns the JSON-ready result."""
    import jax

    start = time.perf_counter()
    timings: dict[str, float] = {}

    progress(f"memory bandwidth: {cfg.copy_mib:g} MiB copy x {cfg.copy_reps}")
    t0 = time.perf_counter()
    bw = measure_bandwidth(cfg.copy_mib, reps=cfg.copy_reps)
    timings["bandwidth_s"] = time.perf_counter() - t0

    progress(f"updates: {len(bench_entries)} entries, sizes {list(cfg.sizes)}, {cfg.reps} reps")
    t0 = time.perf_counter()
    updates = bench_updates(
        bench_entries,
        cfg.sizes,
        reps=cfg.reps,
        bandwidth_gbs=bw.gbs,
        steps_per_rep=cfg.update_steps_per_rep,
    )
    timings["updates_s"] = time.perf_counter() - t0

    progress(f"train steps: models {list(cfg.models)}, {cfg.train_reps} samples")
    t0 = time.perf_counter()
    train = bench_train_steps(
        bench_entries,
        cfg.models,
        reps=cfg.train_reps,
        steps_per_rep=cfg.steps_per_rep,
        batch_size=cfg.batch_size,
        dataset=cfg.dataset,
    )
    timings["train_steps_s"] = time.perf_counter() - t0

    study = []
    if cfg.study_seeds:
        progress(f"study wall time vs compute: seeds {list(cfg.study_seeds)}")
        t0 = time.perf_counter()
        study = bench_study_overhead(cfg.study_seeds, steps=cfg.study_steps)
        timings["study_overhead_s"] = time.perf_counter() - t0

    communication: dict[str, Any] | None = None
    if cfg.comm_workers and jax.device_count() < cfg.comm_workers:
        communication = {
            "skipped": f"needs {cfg.comm_workers} devices, JAX sees {jax.device_count()} "
            "(on CPU: jax_num_cpu_devices before the first JAX operation)"
        }
        progress(f"communication: skipped, {communication['skipped']}")
    elif cfg.comm_workers:
        from experiments.bench.communication import bench_communication

        progress(f"communication: {cfg.comm_workers} workers, H={cfg.comm_period}")
        t0 = time.perf_counter()
        communication = bench_communication(
            workers=cfg.comm_workers,
            sync_period=cfg.comm_period,
            reps=cfg.comm_reps,
            palsgd_steps=cfg.comm_palsgd_steps,
        )
        timings["communication_s"] = time.perf_counter() - t0

    return {
        "machine": machine_info(),
        "config": dataclasses.asdict(cfg),
        "bandwidth_gbs": bw.gbs,
        "bandwidth": dataclasses.asdict(bw),
        "updates": updates,
        "train_steps": train,
        "goals": evaluate_goals(bench_goals, updates, train),
        "study_overhead": study,
        "communication": communication,
        "timings": timings,
        "elapsed_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m experiments bench``; returns the process exit code."""
    cfg, out = parse_args(argv)
    # The study benchmark's warm run reads its compiles from JAX's persistent cache: a
    # throwaway one unless the user configured theirs (set before the first compile).
    import tempfile

    import jax

    if cfg.comm_workers and jax.config.jax_num_cpu_devices < cfg.comm_workers:  # type: ignore[attr-defined]
        # The communication bench shards workers over devices: on a CPU host, virtual ones
        # (before the first JAX operation; a GPU/TPU host uses its own devices).
        with contextlib.suppress(RuntimeError):  # backends already up (in-process tests)
            jax.config.update("jax_num_cpu_devices", cfg.comm_workers)
    if not jax.config.jax_compilation_cache_dir:  # type: ignore[attr-defined]
        jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="optlab-bench-"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        bench_entries = select_entries(entries(), _parse(argv).only)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    if not bench_entries:
        print("no bench entries are registered", file=sys.stderr)
        return 1
    result = run_bench(cfg, bench_entries, goals())
    print(format_report(result), flush=True)
    path = write_json(result, out)
    progress(f"wrote {path}")
    return 0

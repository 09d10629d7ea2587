"""``python -m experiments``: list, run and benchmark.

    python -m experiments list
    python -m experiments run NAME [--variant quick|full] [--config.key=value ...]
                                   [--workdir DIR] [--devices N] [--no-progress]
                                   [--distributed [--coordinator HOST:PORT
                                    --num-processes P --process-id I]]
    python -m experiments bench [--quick] [--out PATH]

Usage errors (unknown experiment, unknown config key, a value of the wrong type or out of
range, missing data) print one line to stderr and exit with code 2, without a traceback.
Re-running ``run`` with the same workdir resumes where it stopped.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

USAGE_ERROR = 2


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _parse_like(text: str, current: Any, key: str) -> Any:
    """Parses ``text`` into the type of the config field's current value."""
    import ml_collections

    if isinstance(current, ml_collections.ConfigDict):
        raise UsageError(
            f"config key {key!r} is a group; set its fields, e.g. --config.{key}.FIELD=..."
        )
    try:
        if isinstance(current, bool):
            return _parse_bool(text)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            stripped = text.strip()
            if stripped.startswith(("(", "[")):
                value = ast.literal_eval(stripped)
            else:
                parts = [p.strip() for p in stripped.split(",") if p.strip()]
                element = current[0] if current else None
                value = [
                    _parse_like(p, element, key) if element is not None else _literal_or_str(p)
                    for p in parts
                ]
            return type(current)(value)
        return _literal_or_str(text)
    except (ValueError, SyntaxError) as error:
        kind = type(current).__name__
        raise UsageError(
            f"--config.{key}: expected a value of type {kind}, got {text!r}"
        ) from error


def _literal_or_str(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: Any, overrides: Sequence[str]) -> list[str]:
    """Applies ``--config.a.b=value`` overrides in place; returns the keys set."""
    keys = []
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise UsageError(
                f"unrecognized argument {item!r}; config overrides look like --config.KEY=VALUE"
            )
        key, text = item[len("--config.") :].split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node:
                raise UsageError(f"unknown config key {'.'.join(parents[: i + 1])!r}")
            node = node[part]
        if leaf not in node:
            known = ", ".join(sorted(node.keys()))
            raise UsageError(f"unknown config key {key!r}; known keys here: {known}")
        value = _parse_like(text, node[leaf], key)
        try:
            node[leaf] = value
        except TypeError as error:
            raise UsageError(f"--config.{key}: {error}") from error
        keys.append(key)
    return keys


def _config_hash(config_dict: dict) -> str:
    return hashlib.sha1(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()[:8]


def _prepare_workdir(workdir: Path, record: dict) -> bool:
    """Writes config.json, or checks that an existing one describes the same run.

    Returns whether the workdir was created now.
    """
    record = json.loads(json.dumps(record))  # tuples -> lists, as stored
    path = workdir / "config.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("config") != record["config"]:
            changed = sorted(
                k
                for k in set(previous.get("config", {})) | set(record["config"])
                if previous.get("config", {}).get(k) != record["config"].get(k)
            )
            raise UsageError(
                f"workdir {workdir} holds a run with a different config (differs in: "
                f"{', '.join(changed)}); pass a new --workdir or delete that one"
            )
        return False
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return created


def _cmd_list() -> int:
    from experiments.registry import EXPERIMENTS

    for name, experiment in sorted(EXPERIMENTS.items()):
        runner = experiment.runner_module()
        print(f"{name:16s} {runner.CLAIM}")
    return 0


def _cmd_run(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from experiments.registry import get_experiment

    try:
        experiment = get_experiment(args.name)
    except KeyError as error:
        raise UsageError(error.args[0]) from None
    try:
        config = experiment.config_module().get_config(args.variant)
    except ValueError as error:
        raise UsageError(str(error)) from None
    changed = apply_overrides(config, overrides)
    runner = experiment.runner_module()
    try:
        runner.validate(config)
    except ValueError as error:
        raise UsageError(f"invalid config: {error}") from None
    config_dict = config.to_dict()
    if args.workdir:
        workdir = Path(args.workdir)
    else:
        suffix = f"-{_config_hash(config_dict)}" if changed else ""
        workdir = Path("runs") / f"{args.name}-{args.variant}{suffix}"
    workdir = workdir.absolute()
    from experiments.distributed import barrier, is_main_process

    main_process = is_main_process()
    record = {"experiment": args.name, "variant": args.variant, "config": config_dict}
    created = False
    if main_process:  # one writer; the others check after the barrier
        created = _prepare_workdir(workdir, record)
        print(
            f"[{args.name}] variant={args.variant} devices={args.devices} workdir={workdir}",
            flush=True,
        )
    barrier("workdir")
    if not main_process:
        _prepare_workdir(workdir, record)
    from experiments.data import DatasetNotFoundError
    from experiments.errors import ConfigError

    try:
        runner.run(config, workdir, devices=args.devices, progress=not args.no_progress)
    except (ConfigError, DatasetNotFoundError) as error:
        if created:  # nothing was trained: leave no half-made workdir behind
            shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(error, ConfigError):
            raise UsageError(f"invalid config: {error}") from None
        raise
    if main_process:
        print((workdir / "results.md").read_text())
        print(f"Results, plots and metrics in {workdir}", file=sys.stderr)
    return 0


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (raised as UsageError)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see python -m experiments --help)")


def _init_distributed(args: argparse.Namespace) -> None:
    """Joins the multi-process run; on CPU, one cluster over gloo collectives."""
    import jax

    # Both only take effect before the backend starts; they only concern the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.devices is not None and args.num_processes:
        if args.devices % args.num_processes:
            raise UsageError(
                f"--devices ({args.devices}) must divide by --num-processes ({args.num_processes})"
            )
        jax.config.update("jax_num_cpu_devices", args.devices // args.num_processes)
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    if args.devices is None:
        args.devices = jax.device_count()


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m experiments", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments and the claim each checks")
    run = sub.add_parser("run", help="run an experiment (extra args: --config.KEY=VALUE)")
    run.add_argument("name")
    run.add_argument("--variant", default="quick", choices=("quick", "full"))
    run.add_argument("--workdir", default=None, help="default: runs/NAME-VARIANT[-HASH]")
    run.add_argument(
        "--devices",
        type=int,
        default=None,
        help="data-parallel devices (on CPU, that many virtual devices); default 1, "
        "or every device of every process with --distributed",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    multi = run.add_argument_group(
        "several hosts",
        "jax.distributed.initialize(); without the three options JAX detects "
        "the cluster (TPU pods, SLURM, Open MPI, ...). Start the same command on every host.",
    )
    multi.add_argument("--distributed", action="store_true", help="join a multi-process run")
    multi.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    multi.add_argument("--num-processes", type=int, default=None)
    multi.add_argument("--process-id", type=int, default=None)
    bench = sub.add_parser("bench", help="benchmarks: update and train-step throughput")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from experiments.bench import main as bench_main

        return bench_main(argv[1:])
    try:
        args, unknown = _build_parser().parse_known_args(argv)
        if args.command == "list":
            if unknown:
                raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
            return _cmd_list()
        if args.devices is not None and args.devices < 1:
            raise UsageError(f"--devices must be >= 1, got {args.devices}")
        import jax

        if args.distributed:
            _init_distributed(args)
        elif args.devices is None:
            args.devices = 1
        if args.devices > 1 and not args.distributed:
            # Only possible before the first JAX operation (in-process callers, e.g. tests
            # or notebooks, may already have initialised JAX with enough devices); it only
            # affects the CPU backend.
            with contextlib.suppress(RuntimeError):
                jax.config.update("jax_num_cpu_devices", args.devices)
        if args.devices > len(jax.devices()):
            raise UsageError(
                f"--devices {args.devices}: only {len(jax.devices())} devices are visible"
            )
        return _cmd_run(args, unknown)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(
            "interrupted; run the same command again to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    except Exception as error:  # one line for known, user-facing failures
        from experiments.data import DatasetNotFoundError
        from experiments.train import NonFiniteLossError

        if isinstance(error, DatasetNotFoundError):  # several lines: how to get the data
            print(f"error: {error}", file=sys.stderr)
            return USAGE_ERROR
        if isinstance(error, NonFiniteLossError):
            print(f"error: {error}", file=sys.stderr)
            return 1
        raise

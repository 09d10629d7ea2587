"""``python -m experiments``: list, run and benchmark.

    python -m experiments list
    python -m experiments run NAME [--variant VARIANT] [--config.KEY=VALUE ...]
                                   [--workdir DIR] [--fresh] [--dry-run]
                                   [--devices N] [--no-progress]
                                   [--distributed [--coordinator HOST:PORT
                                    --num-processes P --process-id I]]
    python -m experiments bench [--quick] [--out PATH]

``list`` prints each experiment's name, variants, measured runtime and the claim it checks
(from :mod:`experiments.registry`, without importing JAX). ``run`` builds the config of
``--variant`` (``smoke``, ``quick`` (default) or ``full``, as far as the experiment has them),
applies the ``--config.KEY=VALUE`` overrides and validates it; ``--dry-run`` then prints the
resolved config (JSON) and the runner's plan (its tasks and number of runs) and stops without
writing anything. A config with ``tasks`` gives each task its own fields; a top-level key of
the same name is only a default, so overriding it where a task sets its own is refused with
the key to set instead (``--config.tasks.TASK.KEY``).

The workdir (default ``runs/NAME-VARIANT[-HASH]``) gets ``config.json`` (experiment,
variant, config and provenance: git commit, library versions, devices, start time; see
:mod:`experiments.provenance`) only once the config is valid and the data loaded, so a
mistake leaves nothing behind. Re-running with the same workdir resumes where it stopped;
when the workdir was written by other code or versions the differences are printed to
stderr first. A different config in the same workdir is refused; ``--fresh`` deletes the
workdir (once the data is loaded) and starts over.

Progress: bars when stderr is a terminal, else (and with ``--no-progress``) the runners
print one line per run. JAX's persistent compilation cache is on, in
``$OPTLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/optlab/jax``, else ``~/.cache/optlab/jax``,
unless JAX already has a cache directory configured (e.g. ``JAX_COMPILATION_CACHE_DIR``);
``JAX_ENABLE_COMPILATION_CACHE=false`` turns it off.

Usage errors (unknown experiment or variant, unknown config key, a value of the wrong type
or out of range, an unknown dataset, missing data) print one line to stderr (missing data:
a few lines on how to get it) and exit with code 2, without a traceback.
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from experiments.registry import DEFAULT_VARIANT, VARIANTS

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


BUDGET_KEYS = ("steps", "epochs")


def check_task_overrides(config: Any, changed: Sequence[str]) -> None:
    """Refuses top-level overrides that a task of ``config.tasks`` shadows with its own value.

    A top-level key is the default of the task field of the same name; a task that sets the
    field itself would silently ignore ``--config.KEY``, so the user is told which key to set
    instead (unless they set that one as well). Only the tasks that run count (those of
    ``task_names``, all when it is empty): a task left out ignores nothing.
    """
    import ml_collections

    tasks = config.get("tasks") if isinstance(config, ml_collections.ConfigDict) else None
    if not isinstance(tasks, ml_collections.ConfigDict):
        return
    given = set(changed)
    selected = set(config.get("task_names", ()) or ()) or set(tasks)
    for key in changed:
        parts = key.split(".")
        if parts[0] == "tasks":
            # A task's epochs win over its steps: setting only the steps would be ignored.
            if len(parts) == 3 and parts[2] == "steps" and parts[1] in tasks:
                epochs = tasks[parts[1]].get("epochs")
                if epochs and f"tasks.{parts[1]}.epochs" not in given:
                    raise UsageError(
                        f"--config.{key}: task {parts[1]} trains for epochs={epochs}, which "
                        f"win over steps; add --config.tasks.{parts[1]}.epochs=0"
                    )
            continue
        # A task's budget is its steps or its epochs: either one shadows both defaults.
        fields = BUDGET_KEYS if key in BUDGET_KEYS else (key,)
        shadowing = {
            name: field
            for name, task in tasks.items()
            if name in selected
            for field in fields
            if _sets(task, field) and f"tasks.{name}.{field}" not in given
        }
        if shadowing:
            instead = ", ".join(f"--config.tasks.{name}.{f}" for name, f in shadowing.items())
            which = "task" if len(shadowing) == 1 else "tasks"
            raise UsageError(
                f"--config.{key} is only a default, and {which} {', '.join(shadowing)} "
                f"set{'s' if len(shadowing) == 1 else ''} {'/'.join(fields)} itself; set "
                f"{instead} instead"
            )


def _sets(task: Any, key: str) -> bool:
    """Whether ``task`` sets ``key`` (a dotted path) or a prefix of it to a plain value."""
    node = task
    for part in key.split("."):
        if not isinstance(node, Mapping) and not hasattr(node, "keys"):
            return True  # a plain value where the override goes deeper
        if part not in node:
            return False
        node = node[part]
    return node is not None  # None: the task takes the top-level default


def _config_hash(config_dict: dict) -> str:
    return hashlib.sha1(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()[:8]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _changed_keys(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    absent = object()
    return sorted(k for k in set(a) | set(b) if a.get(k, absent) != b.get(k, absent))


def _prepare_workdir(workdir: Path, record: dict, *, report: bool = True) -> bool:
    """Writes config.json, or checks that an existing one describes the same run.

    On a resume, prints (``report``) how the provenance differs to stderr. Returns whether
    the workdir was created now.
    """
    record = json.loads(json.dumps(record))  # tuples -> lists, as stored
    path = workdir / "config.json"
    start_over = "pass --fresh to delete it and start over, or a new --workdir"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("experiment", record["experiment"]) != record["experiment"]:
            raise UsageError(
                f"workdir {workdir} holds a run of experiment {previous['experiment']!r}; "
                f"{start_over}"
            )
        if previous.get("config") != record["config"]:
            changed = _changed_keys(previous.get("config", {}), record["config"])
            raise UsageError(
                f"workdir {workdir} holds a run with a different config (differs in: "
                f"{', '.join(changed)}); {start_over}"
            )
        if report:
            from experiments.provenance import differences

            old = previous.get("provenance")
            lines = (
                ["it records no provenance (written by an older harness)"]
                if old is None
                else differences(old, record["provenance"])
            )
            if lines:
                print(
                    f"note: resuming {workdir}, written by other code, versions or devices:",
                    file=sys.stderr,
                )
                for line in lines:
                    print(f"  {line}", file=sys.stderr)
        return False
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return created


def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0] if " " in error.args[0] else f"unknown key {error.args[0]!r}"
    else:
        text = str(error)
    return " ".join(text.split())


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where JAX's persistent compilation cache goes: see the module docstring."""
    env = os.environ if environ is None else environ
    if env.get("OPTLAB_CACHE_DIR"):
        return Path(env["OPTLAB_CACHE_DIR"]).expanduser()
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base.expanduser() / "optlab" / "jax"


def use_compilation_cache() -> Path | None:
    """Turns on JAX's persistent compilation cache in :func:`cache_dir`.

    Returns the directory, or None when JAX already had one configured (left as it is).
    Only takes effect before the process's first compilation.
    """
    import jax

    if jax.config.jax_compilation_cache_dir:  # type: ignore[attr-defined]
        return None
    path = cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def _cmd_list() -> int:
    import textwrap

    from experiments.registry import EXPERIMENTS

    for name, experiment in sorted(EXPERIMENTS.items()):
        print(f"{name}  (variants: {', '.join(experiment.variants)})")
        for label, text in (("runtime", experiment.runtime), ("claim", experiment.claim)):
            print(
                textwrap.fill(
                    f"{label}: {text}", width=100, initial_indent="    ", subsequent_indent="      "
                )
            )
    return 0


def _check_fresh(workdir: Path) -> None:
    """Refuses to let --fresh delete a directory that is not a workdir."""
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / "config.json").exists():
        raise UsageError(
            f"--fresh would delete {workdir}, which holds no config.json (not a workdir); "
            "delete it yourself or pass another --workdir"
        )
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--workdir {workdir} is a file")


def _cmd_run(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from experiments.registry import get_experiment

    try:
        experiment = get_experiment(args.name)
    except KeyError as error:
        raise UsageError(error.args[0]) from None
    if args.variant not in experiment.variants:
        raise UsageError(
            f"unknown variant {args.variant!r} of {args.name}; known: "
            f"{', '.join(experiment.variants)}"
        )
    try:
        config = experiment.config_module().get_config(args.variant)
    except ValueError as error:
        raise UsageError(_one_line(error)) from None
    changed = apply_overrides(config, overrides)
    check_task_overrides(config, changed)
    runner = experiment.runner_module()
    try:
        runner.validate(config)
    except (ValueError, KeyError) as error:
        raise UsageError(f"invalid config: {_one_line(error)}") from None
    config_dict = config.to_dict()
    if args.dry_run:
        print(json.dumps(config_dict, indent=2, default=str))
        plan: Callable[[Any], str] | None = getattr(runner, "plan", None)
        if plan is not None:
            try:
                text = plan(config)
            except (ValueError, KeyError) as error:
                raise UsageError(f"invalid config: {_one_line(error)}") from None
            print(text)
        return 0
    if args.workdir:
        workdir = Path(args.workdir)
    else:
        suffix = f"-{_config_hash(config_dict)}" if changed else ""
        workdir = Path("runs") / f"{args.name}-{args.variant}{suffix}"
    workdir = workdir.absolute()
    if args.fresh:
        _check_fresh(workdir)
    from experiments import provenance
    from experiments.distributed import barrier, is_main_process

    main_process = is_main_process()
    progress = not args.no_progress and sys.stderr.isatty()
    state = {"ready": False, "created": False}

    def on_ready() -> None:
        """Config valid, data loaded: set up the workdir (nothing was written before)."""
        state["ready"] = True
        record = {
            "experiment": args.name,
            "variant": args.variant,
            "config": config_dict,
            "provenance": provenance.collect(args.devices),
        }
        if main_process:  # one writer; the others check after the barrier
            if args.fresh and workdir.exists():
                shutil.rmtree(workdir)
            state["created"] = _prepare_workdir(workdir, record)
            print(
                f"[{args.name}] variant={args.variant} devices={args.devices} workdir={workdir}",
                flush=True,
            )
        barrier("workdir")
        if not main_process:
            _prepare_workdir(workdir, record, report=False)

    from experiments.data import DatasetNotFoundError
    from experiments.errors import ConfigError

    try:
        runner.run(config, workdir, devices=args.devices, progress=progress, on_ready=on_ready)
    except (ValueError, KeyError, DatasetNotFoundError) as error:
        if not state["ready"]:  # validation or data loading: nothing was written
            if isinstance(error, DatasetNotFoundError):
                raise  # several lines: how to get the data
            raise UsageError(f"invalid config: {_one_line(error)}") from None
        if not isinstance(error, ConfigError | DatasetNotFoundError):
            raise
        if state["created"]:  # nothing was trained: leave no half-made workdir behind
            shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(error, ConfigError):
            raise UsageError(f"invalid config: {_one_line(error)}") from None
        raise
    if not state["ready"]:
        raise RuntimeError(f"runner {experiment.runner} returned without calling on_ready()")
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
    sub.add_parser("list", help="list the experiments: variants, runtime, claim checked")
    run = sub.add_parser("run", help="run an experiment (extra args: --config.KEY=VALUE)")
    run.add_argument("name")
    run.add_argument(
        "--variant",
        default=DEFAULT_VARIANT,
        help=f"one of the experiment's variants ({', '.join(VARIANTS)}); default {DEFAULT_VARIANT}",
    )
    run.add_argument("--workdir", default=None, help="default: runs/NAME-VARIANT[-HASH]")
    run.add_argument(
        "--fresh",
        action="store_true",
        help="delete the workdir (once config and data are checked) and start over",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the runner's plan, write nothing, run nothing",
    )
    run.add_argument(
        "--devices",
        type=int,
        default=None,
        help="data-parallel devices (on CPU, that many virtual devices); default 1, "
        "or every device of every process with --distributed",
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars, one line per run (the default when stderr is not a terminal)",
    )
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

        use_compilation_cache()  # before anything compiles
        if args.distributed:
            _init_distributed(args)
        elif args.devices is None:
            args.devices = 1
        # Only possible before the first JAX operation (in-process callers, e.g. tests or
        # notebooks, may already have initialised JAX with enough devices); it only affects
        # the CPU backend. Never lowered: a caller's larger setting stays (an update after
        # initialisation would re-create the CPU backend with fewer devices).
        if (
            args.devices > 1
            and not args.distributed
            and getattr(jax.config, "jax_num_cpu_devices", -1) < args.devices
        ):
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

        if isinstance(error, DatasetNotFoundError):  # several lines: how to get the data
            print(f"error: {error}", file=sys.stderr)
            return USAGE_ERROR
        raise

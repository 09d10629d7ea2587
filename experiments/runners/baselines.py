"""The `baselines` experiment: plain optax optimizers on the default offline dataset."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ml_collections

from experiments import reporting
from experiments.distributed import is_main_process
from experiments.registry import get_experiment
from experiments.suite import load_suite_data, run_suite, validate_suite

NAME = "baselines"
CLAIM = get_experiment(NAME).claim


def validate(config: ml_collections.ConfigDict) -> None:
    validate_suite(config)


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    devices: int = 1,
    progress: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    dataset = load_suite_data(config, devices)
    if on_ready is not None:  # config and data are good; nothing is written before this
        on_ready()
    runs = run_suite(config, workdir, dataset=dataset, devices=devices, progress=progress)
    if not is_main_process():
        return {"runs": runs}
    summary = reporting.summarize(runs)
    methods = list(config.method_names)
    verdicts = [
        reporting.compare(summary, m, methods[0], claim=f"{m} >= {methods[0]} in test accuracy")
        for m in methods[1:]
    ]
    plot = reporting.plot_curves(
        workdir, methods, title=f"{NAME}: {config.dataset} / {config.model}"
    )
    return reporting.write_results(
        workdir,
        experiment=NAME,
        claim=CLAIM,
        config=config.to_dict(),
        runs=runs,
        verdicts=verdicts,
        plots=[plot],
    )

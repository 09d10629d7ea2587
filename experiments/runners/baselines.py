"""The `baselines` experiment: plain optax optimizers on the default offline dataset."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from experiments import reporting
from experiments.distributed import is_main_process
from experiments.suite import run_suite, validate_suite

NAME = "baselines"
CLAIM = (
    "Reference numbers, no paper claim: SGD, momentum SGD and Adam trained on the same data, "
    "seeds and budget; later methods are compared with these."
)


def validate(config: ml_collections.ConfigDict) -> None:
    validate_suite(config)


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    devices: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    runs = run_suite(config, workdir, devices=devices, progress=progress)
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

"""The experiments ``python -m experiments`` knows: name -> (runner module, config module)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple


class Experiment(NamedTuple):
    name: str
    runner: str
    config: str

    def runner_module(self) -> ModuleType:
        return importlib.import_module(self.runner)

    def config_module(self) -> ModuleType:
        return importlib.import_module(self.config)


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment("baselines", "experiments.runners.baselines", "experiments.configs.baselines"),
        Experiment("lookahead", "experiments.runners.lookahead", "experiments.configs.lookahead"),
        Experiment("sam", "experiments.runners.sam", "experiments.configs.sam"),
        Experiment(
            "extrapolation",
            "experiments.runners.extrapolation",
            "experiments.configs.extrapolation",
        ),
    )
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]

"""The `baselines` experiment: plain optax optimizers on the default offline dataset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import optax

from experiments import study as st
from experiments.optimizers import make_optimizer, validate_spec
from experiments.registry import EXPERIMENTS

NAME = "baselines"
CLAIM = EXPERIMENTS[NAME].claim


def make_tx(spec: Mapping[str, Any], ctx: st.TxContext) -> optax.GradientTransformation:
    return make_optimizer(spec, steps=ctx.steps)


def build_study(config: ml_collections.ConfigDict) -> st.Study:
    methods = st.methods_from_config(config)
    for m in methods:
        validate_spec(m.name, m.spec)
    claims = tuple(st.Claim(m.name, methods[0].name) for m in methods[1:])
    return st.Study(
        name=NAME,
        claim=CLAIM,
        tasks=st.tasks_from_config(config),
        methods=methods,
        seeds=tuple(config.seeds),
        make_tx=make_tx,
        claims=claims,
        config=config.to_dict(),
    )


validate, plan, run = st.runner_functions(build_study)

"""One runner per experiment, run by :mod:`experiments.cli`.

A runner is a study: ``build_study(config) -> experiments.study.Study`` (its method table,
``make_tx`` and its own measurements as hooks), plus ``validate, plan, run =
experiments.study.runner_functions(build_study)``: ``validate(config)`` raises
``ValueError``; ``plan(config) -> str`` is what ``--dry-run`` prints; ``run(config,
workdir, *, devices, progress, on_ready=None)`` calls ``on_ready()`` once the config is
validated and the data loaded, before it trains or writes anything. Its ``CLAIM`` is the
claim in :mod:`experiments.registry`.
"""

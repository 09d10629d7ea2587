"""One runner per experiment, run by :mod:`experiments.cli`.

A runner module provides ``validate(config)`` (raises ``ValueError``), ``run(config, workdir,
*, devices, progress, on_ready=None)`` (calls ``on_ready()`` once the config is validated and
the data loaded, before it trains or writes anything) and optionally ``plan(config) -> str``
(what ``--dry-run`` prints). Its ``CLAIM`` is the claim in :mod:`experiments.registry`.
"""

"""One runner per experiment: ``CLAIM`` and ``run(config, workdir, *, devices, progress)``."""

"""``python -m experiments.bench``: the same as ``python -m experiments bench``."""

from experiments.bench import main

raise SystemExit(main())

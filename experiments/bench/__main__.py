"""``python -m experiments.bench``: the same as ``python -m experiments bench``."""

from experiments.bench import main

if __name__ == "__main__":
    raise SystemExit(main())

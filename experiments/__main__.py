"""Entry point of ``python -m experiments``; see :mod:`experiments.cli`.

The harness needs the ``experiments`` extra (flax, orbax, scikit-learn, scipy, matplotlib,
ml_collections, tqdm); without it this prints one line naming the extra and exits with 2.
"""

import importlib.util
import sys

HARNESS_MODULES = (
    "flax",
    "orbax.checkpoint",
    "sklearn",
    "scipy",
    "matplotlib",
    "ml_collections",
    "tqdm",
)


def missing_harness_modules() -> list[str]:
    """The harness's dependencies that are not installed."""
    missing = []
    for name in HARNESS_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package is missing, or a stub module
            found = False
        if not found:
            missing.append(name.split(".")[0])
    return missing


def run() -> int:
    missing = missing_harness_modules()
    if missing:
        print(
            "error: python -m experiments needs the harness's dependencies (missing: "
            f'{", ".join(missing)}); install them with: pip install -e ".[experiments]"',
            file=sys.stderr,
        )
        return 2
    from experiments.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())

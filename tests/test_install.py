"""A lean library: ``import optlab`` needs only jax, optax, chex and numpy; the harness says
which extra it needs when its dependencies are missing."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LEAN = {"jax", "jaxlib", "optax", "chex", "numpy"}
HARNESS = (
    "flax",
    "orbax",
    "sklearn",
    "scipy",
    "matplotlib",
    "ml_collections",
    "tqdm",
    "tensorflow",
    "tensorflow_datasets",
    "experiments",
)


def test_import_optlab_pulls_in_nothing_beyond_the_lean_set():
    code = f"import sys, optlab\nprint(sorted(m for m in {HARNESS!r} if m in sys.modules))\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_the_package_requires_only_the_lean_set():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert names == LEAN
    harness = " ".join(project["optional-dependencies"]["experiments"])
    for dependency in (
        "flax",
        "orbax-checkpoint",
        "scikit-learn",
        "scipy",
        "ml_collections",
        "tqdm",
        "matplotlib",
    ):
        assert dependency in harness


def test_experiments_without_the_extra_is_a_one_line_error():
    """A stand-in for a lean install: the harness modules made unimportable."""
    code = (
        "import sys\n"
        "for m in ('flax', 'sklearn', 'matplotlib'):\n"
        "    sys.modules[m] = None\n"
        "sys.argv = ['experiments', 'list']\n"
        "import runpy\n"
        "runpy.run_module('experiments', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "missing: flax, sklearn, matplotlib" in lines[0]
    assert 'pip install -e ".[experiments]"' in lines[0]

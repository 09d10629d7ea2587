"""The README stays true: its example runs, and CI runs its test command verbatim."""

import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _setup_commands() -> list[str]:
    block = re.search(r"## Set-up: two commands\s+```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_setup_is_exactly_two_commands_and_ci_runs_the_test_one():
    install_and_run, install_and_test = _setup_commands()
    assert install_and_run == "pip install -e . && python -m experiments run baselines"
    assert install_and_test in (REPO / ".ci" / "run").read_text()
    assert "pytest" in install_and_test


def test_python_example_runs():
    code = re.search(r"## Use an optlab piece in your own code\s+```python\n(.*?)```", README,
                     re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    # Every simulated worker ends with the mean gradient over the 8 shards of the batch.
    g = namespace["g"]
    assert g.shape == (8, 3)
    np.testing.assert_allclose(g, np.broadcast_to(g[0], g.shape))
    np.testing.assert_allclose(g[0], np.full(3, 6.0), rtol=1e-6)  # d/dw mean((x.w)^2) at w=1, x=1

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
    expected = 'pip install -e ".[experiments]" && python -m experiments run lookahead'
    assert install_and_run == expected
    assert install_and_test in (REPO / ".ci" / "run").read_text()
    assert "pytest" in install_and_test


def test_python_example_runs():
    code = re.search(
        r"## Use an optlab piece in your own code\s+```python\n(.*?)```", README, re.S
    ).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    # The same 100 steps as a plain loop from the paper's equations: 5 fast steps of SGD with
    # weight decay, then slow <- slow + 0.5 (fast - slow) and fast <- slow.
    fast = slow = np.zeros(3)
    for t in range(1, 101):
        fast = fast - 0.1 * (2 * (fast - 3.0) + 1e-4 * fast)
        if t % 5 == 0:
            slow = slow + 0.5 * (fast - slow)
            fast = slow
    np.testing.assert_allclose(namespace["eval_params"], slow, rtol=1e-5)
    np.testing.assert_allclose(namespace["params"], fast, rtol=1e-5)  # synced at step 100
    assert np.all(np.abs(slow - 3.0) < 1e-2)  # and it converged

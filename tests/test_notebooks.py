"""Every notebook runs headless in its smallest setting, and stays paired with its .py source.

A notebook has a cell tagged ``parameters``; the test inserts the overrides of
``SMOKE_PARAMETERS`` right after it (as papermill does), so the notebook people open keeps its
real budget. A new notebook needs an entry here: the test fails without one.
"""

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SMOKE_PARAMETERS = {
    "quickstart": "STEPS = 20\nSEEDS = (0,)\nMETHODS = ('sgd', 'adam')",
    "lookahead": "STEPS = 30\nEVAL_EVERY = 3",
    "sam": "STEPS = 20\nSEEDS = (0,)\nSHARPNESS_EXAMPLES = 64\nPOWER_ITERS = 3\nTRACE_SAMPLES = 2",
    "distributed": "STEPS = 12\nSYNC_PERIOD = 4",
    "pruning_and_continual": "NUM_TASKS = 2\nSTEPS_PER_TASK = 5\nSEEDS = (0,)\n"
    "METHODS = ('spectral',)\nPRUNE_STEPS = 30",
    "diagnostics": "EPOCHS = 1\nSEEDS = (0,)\nDIVERSITY_EXAMPLES = 32\n"
    "ARCHITECTURES = ('mlp_32x1',)\nMETHODS = ('divebatch',)",
}
ALL = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def test_there_are_notebooks():
    assert "quickstart" in ALL


@pytest.mark.parametrize("name", ALL)
def test_ipynb_is_in_sync_with_its_py_source(name):
    ipynb = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert [c.source for c in ipynb.cells] == [c.source for c in source.cells], (
        f"run: jupytext --sync notebooks/{name}.py"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_notebook_executes_headless(name, tmp_path):
    assert name in SMOKE_PARAMETERS, f"add the smallest settings of {name} to SMOKE_PARAMETERS"
    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
    index = next(
        i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])
    )
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(SMOKE_PARAMETERS[name]))
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    nbformat.write(notebook, tmp_path / f"{name}.ipynb")  # the executed copy, for inspection

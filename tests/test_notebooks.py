"""Each notebook is in sync with its jupytext script and runs top to bottom."""

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["arithmetic", "english"])
def test_notebook_is_paired_and_runs(name, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    script = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert [cell.source for cell in notebook.cells] == [cell.source for cell in script.cells], (
        f"notebooks/{name}.ipynb is out of sync: run `jupytext --sync notebooks/{name}.py`"
    )
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the notebook shows no figure"
